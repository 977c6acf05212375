"""The model's own FLOP count: matmul and convolution FLOPs of one step, for given batch shapes.

Written from the architecture (model.py, conv.py, attention.py, moe.py, modalities/), not from a
trace, so that it can be checked against XLA's cost analysis of the compiled step
(tests/test_flops.py, benchmarks/mfu.py). A product of [m, k] by [k, n] costs 2 * m * k * n; a
convolution 2 * output elements * taps * input channels per group. Elementwise work (layer norms,
softmax, ReLU, the optimizer) is left out; the separable convs' depthwise taps are counted
(2 * k per position and channel) because they are the convolution.

Training is 3x the forward pass (one product for the forward, two for the backward: gradients of
both operands), except for products whose one operand is the raw input (the first image or audio
convolution: no input gradient, so 2x).

Mixture of experts: the expert products run on all E * C buffer slots, empty ones included
(`experts="executed"`, what the compiled step computes), or count only the N * K routed
assignments (`experts="active"`, the model FLOPs that the MFU headline uses).

Shape legend: B batch, S source length, T target length, D width, H expert hidden width,
E experts, K top-k, C expert capacity, V vocabulary.
"""

from multimodel import moe
from multimodel.model import TaskSpec

TRAIN_FACTOR = 3  # forward + backward (input and weight gradients)


def _dense(m: int, k: int, n: int) -> int:
  return 2 * m * k * n


def _conv_block(cfg, tokens: int) -> int:
  """Four separable conv steps (depthwise taps, pointwise D x D) on `tokens` positions."""
  d = cfg.d_model
  return 4 * (2 * cfg.kernel_size * tokens * d + _dense(tokens, d, d))


def _attention(cfg, batch: int, queries: int, keys: int) -> int:
  """One multi-head attention: q, k, v, o projections and the two [T, S] products."""
  d = cfg.d_model
  flops = _dense(batch * keys, d, 2 * d)  # keys and values
  flops += _dense(batch * queries, d, 2 * d)  # queries and output
  return flops + 2 * _dense(batch * queries, d, keys)  # q.k over all heads, weights.v


def _attention_block(cfg, batch: int, target_length: int, source_length: int) -> int:
  if not cfg.use_attention:
    return 0
  return (_attention(cfg, batch, target_length, target_length)
          + _attention(cfg, batch, target_length, source_length))


def _experts_block(cfg, tokens: int, *, train: bool, experts: str) -> dict[str, int]:
  """Gate and expert products of the MoE (or the dense layer) on `tokens` positions."""
  d, h = cfg.d_model, cfg.hidden
  if not cfg.use_moe:
    return {"ffn": 2 * _dense(tokens, d, h)}
  e, k = cfg.num_experts, cfg.top_k
  gate = _dense(tokens, d, 2 * e if train else e)  # logits (and noise scale in training)
  if experts == "executed":
    factor = cfg.capacity_factor if train else cfg.eval_capacity_factor
    slots = e * moe.capacity(tokens, e, k, factor)
  elif experts == "active":
    slots = tokens * k
  else:
    raise ValueError(f"experts must be 'executed' or 'active', got {experts!r}")
  combine = 2 * k * tokens * d  # gate-weighted sum of the K outputs
  return {"gate": gate, "ffn": 2 * _dense(slots, d, h) + combine}


def _conv2d(batch: int, out_h: int, out_w: int, taps: int, in_per_group: int, out_c: int) -> int:
  return 2 * batch * out_h * out_w * taps * in_per_group * out_c


def _strided(size: int) -> int:
  """Output size of a stride-2 window of 3 (or 1) with our explicit padding: ceil(size / 2)."""
  return (size + 1) // 2


def _image(cfg, batch: int, height: int, width: int) -> tuple[int, int, int]:
  """(FLOPs of the first conv, FLOPs of the rest, output positions) of the image stem."""
  im, d = cfg.image, cfg.d_model
  f = im.stem_filters
  h, w = _strided(height), _strided(width)
  first = _conv2d(batch, h, w, 9, im.channels, f)
  rest = _conv2d(batch, h, w, 9, f, 2 * f)
  widths = [2 * f] + [2 * f * 2 ** (i + 1) for i in range(im.res_blocks)]
  for i, o in zip(widths[:-1], widths[1:]):
    rest += _conv2d(batch, h, w, 9, 1, i) + _conv2d(batch, h, w, 1, i, o)  # separable conv 1
    rest += _conv2d(batch, h, w, 9, 1, o) + _conv2d(batch, h, w, 1, o, o)  # separable conv 2
    h, w = _strided(h), _strided(w)
    rest += _conv2d(batch, h, w, 1, i, o)  # strided 1x1 shortcut
  rest += _dense(batch * h * w, widths[-1], d)  # projection to D
  return first, rest, h * w


def _audio(cfg, batch: int, frames: int) -> tuple[int, int, int]:
  """(FLOPs of the first conv, FLOPs of the rest, output positions) of the audio net."""
  au, d = cfg.audio, cfg.d_model
  t, m, chans = frames, au.num_mel_bins, [1] + [au.conv_filters] * au.conv_layers
  convs = []
  for i, o in zip(chans[:-1], chans[1:]):
    t, m = _strided(t), _strided(m)
    convs.append(_conv2d(batch, t, m, 9, i, o))
  return convs[0], sum(convs[1:]) + _dense(batch * t, m * au.conv_filters, d), t


def encoder_length(cfg, input_modality: str, inputs_shape: tuple[int, ...]) -> int:
  """Positions per example that the input modality net hands to the body (S of the encoder)."""
  if input_modality in ("text", "label"):
    return inputs_shape[1] if len(inputs_shape) > 1 else 1
  if input_modality == "image":
    return _image(cfg, inputs_shape[0], *inputs_shape[1:3])[2]
  if input_modality == "audio":
    return _audio(cfg, inputs_shape[0], inputs_shape[1])[2]
  raise ValueError(f"unknown input modality {input_modality!r}")


def forward_flops(cfg, task: TaskSpec, inputs_shape: tuple[int, ...],
                  targets_shape: tuple[int, ...], *, train: bool = True,
                  experts: str = "executed") -> dict[str, int]:
  """Forward FLOPs of the teacher-forced model call, part by part.

  Args:
    cfg: the `model` section of a config.
    task: the task's spec (modalities, number of classes).
    inputs_shape: [B, S] text ids, [B, H, W, C] images or [B, S, M] log-mel frames.
    targets_shape: [B, T] text targets, or [B] class labels.
    train: training capacity factor and noisy gating (one more [D, E] product).
    experts: "executed" (all E * C buffer slots) or "active" (N * K routed assignments).

  Returns:
    {part: FLOPs}: `input` (the input modality net, first layer apart as `input_first`), `encoder`,
    `encoder_moe`, `mixer`, `decoder`, `decoder_moe`, `output` (logits or the label head).
  """
  b = inputs_shape[0]
  parts = {}
  source = encoder_length(cfg, task.input_modality, inputs_shape)
  if task.input_modality == "image":
    parts["input_first"], parts["input"], _ = _image(cfg, b, *inputs_shape[1:3])
  elif task.input_modality == "audio":
    parts["input_first"], parts["input"], _ = _audio(cfg, b, inputs_shape[1])
  else:
    parts["input_first"], parts["input"] = 0, 0  # An embedding lookup.

  enc_tokens = b * source
  parts["encoder"] = cfg.encoder_blocks * _conv_block(cfg, enc_tokens)
  parts["encoder_moe"] = sum(_experts_block(cfg, enc_tokens, train=train,
                                            experts=experts).values())
  label = task.target_modality == "label"
  if label and cfg.label_head == "pool":
    parts["output"] = _dense(b, cfg.d_model, cfg.num_labels)
    return parts

  t = 1 if label else targets_shape[1]  # label_head "decoder": the command token alone.
  dec_tokens = b * t
  parts["mixer"] = (_attention_block(cfg, b, t, source)
                    + cfg.mixer_blocks * _conv_block(cfg, dec_tokens))
  parts["decoder"] = cfg.decoder_blocks * (_conv_block(cfg, dec_tokens)
                                           + _attention_block(cfg, b, t, source))
  parts["decoder_moe"] = sum(_experts_block(cfg, dec_tokens, train=train,
                                            experts=experts).values())
  parts["output"] = _dense(dec_tokens, cfg.d_model, cfg.num_labels if label else cfg.vocab_size)
  return parts


def train_step_flops(cfg, task: TaskSpec, inputs_shape: tuple[int, ...],
                     targets_shape: tuple[int, ...], *, experts: str = "executed") -> int:
  """FLOPs of one training step (forward + backward) on one task's batch."""
  parts = forward_flops(cfg, task, inputs_shape, targets_shape, train=True, experts=experts)
  first = parts.pop("input_first")
  return (TRAIN_FACTOR - 1) * first + TRAIN_FACTOR * sum(parts.values())
