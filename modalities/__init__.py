"""Modality nets: one per modality (not per task). They own everything modality-specific.

An input modality maps a task's raw batch `inputs` into the body's width:
  `encode(inputs, input_mask, *, train, rngs) -> (x [B, S, D], mask bool [B, S] or None)`.
A target modality embeds targets for the decoder and turns the body's output into predictions:
  `autoregressive: bool` (False: one prediction per example, from the pooled encoder or the
  decoder's output at the command token, as `model.label_head` says);
  `embed_targets(targets [B, T]) -> [B, T, D]` (autoregressive only);
  `logits(h, num_classes, label_offset) -> [B, T, V]` or `[B, num_classes]`;
  `loss(logits, targets, weights, label_smoothing) -> dict of sums` (`loss`, `nll`, `correct`,
  `weight`): sums over real positions, so the trainer and the evaluator divide the same way.
"""

from modalities.audio import Audio
from modalities.categorical import Label
from modalities.image import Image
from modalities.text import Text

NAMES = ("text", "image", "audio", "label")


def build(name: str, cfg, *, dtype, param_dtype, rngs):
  """The modality net called `name` for the model config `cfg` (the `model` section)."""
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  d = cfg.d_model
  if name == "text":
    return Text(cfg.vocab_size, d, tie_embeddings=cfg.tie_embeddings, **kw)
  if name == "image":
    return Image(d, channels=cfg.image.channels, stem_filters=cfg.image.stem_filters,
                 res_blocks=cfg.image.res_blocks, **kw)
  if name == "audio":
    return Audio(d, num_mel_bins=cfg.audio.num_mel_bins, filters=cfg.audio.conv_filters,
                 layers=cfg.audio.conv_layers, normalize=cfg.audio.normalize,
                 **dict(cfg.audio.spec_augment), **kw)
  if name == "label":
    return Label(cfg.num_labels, d, **kw)
  raise ValueError(f"Unknown modality {name!r}; valid modalities: {NAMES}")
