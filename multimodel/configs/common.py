"""Defaults shared by every config, and `make()` which applies a variant's overrides and locks.

Legend used across the project for shapes: B batch, S source length, T target length, D width,
H heads, E experts, K top-k, V vocabulary, C expert capacity.
"""

import copy

import ml_collections

MODEL = dict(
    d_model=128,  # D: width of the shared body.
    hidden=512,  # Hidden width of the feed-forward experts (and of the dense layer when MoE is off).
    num_heads=4,  # H
    encoder_blocks=2,  # Conv blocks in the encoder; the MoE sits after block encoder_blocks // 2.
    mixer_blocks=1,  # Causal conv blocks in the I/O mixer (after its attention).
    decoder_blocks=2,  # Decoder blocks of (causal conv block + attention); MoE in the middle.
    kernel_size=3,  # Separable-conv kernel along the sequence.
    dilations=(1, 1, 2, 4),  # Dilation of each of the 4 conv steps of a conv block.
    dropout=0.1,
    use_attention=True,  # Ablation switch: False removes every attention layer.
    use_moe=True,  # Ablation switch: False replaces every MoE with a dense feed-forward layer.
    num_experts=8,  # E
    top_k=2,  # K
    moe_loss_coef=1e-2,
    capacity_factor=1.25,  # Expert buffer C = ceil(capacity_factor * tokens * K / E) in training.
    eval_capacity_factor=2.0,  # Same, for evaluation and decoding.
    vocab_size=8192,  # V: the shared SentencePiece vocabulary (id 0 = pad, 1 = end of sequence).
    tie_embeddings=True,  # Text logits reuse the text embedding matrix.
    num_labels=1000,  # Size of the shared label space of categorical targets.
    num_commands=32,  # Slots of the command-token embedding table.
    label_smoothing=0.1,
    dtype="float32",  # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
    image=dict(
        channels=3,  # Input channels the stem expects (grayscale images are tiled to RGB).
        stem_filters=32,  # Filters of the first of the two entry convolutions (the second doubles it).
        res_blocks=1,  # Residual separable-conv blocks, each halving H and W (paper: 3, i.e. 16x).
    ),
    audio=dict(
        sample_rate=16000,
        frame_length=400,  # 25 ms at 16 kHz.
        frame_step=160,  # 10 ms at 16 kHz.
        num_mel_bins=80,
        conv_filters=64,
        conv_layers=2,  # Strided 2-D convs, each halving time and frequency.
    ),
)


def make(model=None, train=None, data=None):
  """Returns the locked config: defaults updated by the variant's overrides.

  Args:
    model: overrides of `MODEL` (nested dicts update nested sections).
    train: the training section (issue-level defaults live with the trainer).
    data: the data section.
  """
  model_cfg = copy.deepcopy(MODEL)
  for key, value in (model or {}).items():
    if key not in model_cfg:
      raise KeyError(f"Unknown model config key {key!r}; valid keys: {sorted(model_cfg)}")
    if isinstance(value, dict):
      unknown = set(value) - set(model_cfg[key])
      if unknown:
        raise KeyError(f"Unknown keys {sorted(unknown)} in model.{key}; valid: {sorted(model_cfg[key])}")
      model_cfg[key].update(value)
    else:
      model_cfg[key] = value
  config = ml_collections.ConfigDict(
      {"model": model_cfg, "train": dict(train or {}), "data": dict(data or {})}
  )
  config.lock()
  return config
