"""The MultiModel network: modality nets around a shared encoder, I/O mixer and decoder.

    inputs --input modality--> [B, S, D] --encoder--> [B, S, D] ----------------.
    command, targets[:-1] --target modality embed--> [B, T, D] --mixer--> --decoder--> logits
                                                         (attention over the encoder output)

Shapes: B batch, S source length, T target length, D width, V vocabulary.
The body never branches on modality or task: a task reaches it only through its command token and
the modality nets it names. A target modality that is not autoregressive (class labels) reads,
as `model.label_head` says, the mean of the encoder output plus the command embedding ("pool",
the decoder skipped), or the decoder's output at the command token, the only position of a target
of length 1 ("decoder": the mixer's and decoder's attention pick what of the input to read).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import modalities
from multimodel import attention, conv, feedforward, moe, sharding

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What the network needs to know of a task: static, hashable (one jit program per task)."""

  input_modality: str
  target_modality: str
  command_id: int
  num_classes: int = 0
  label_offset: int = 0


NORMS = ("post", "pre")


def pre_norm(cfg) -> bool:
  """True for `model.norm = "pre"`."""
  if cfg.norm not in NORMS:
    raise ValueError(f"model.norm must be one of {NORMS}, got {cfg.norm!r}")
  return cfg.norm == "pre"


LABEL_HEADS = ("pool", "decoder")
CTC_UNITS = ("pieces", "chars", "chars_and_spaces")
# The labels of a CTC loss over characters (`ctc_units="chars"`): label i + 1 is CTC_ALPHABET[i],
# 0 is the blank. Letters and apostrophes: our speech transcripts hold nothing else but spaces,
# which CTC does not need in order to read the audio. `ctc_units="chars_and_spaces"` adds the
# space as the last label, so that the head's own best path is a transcript.
CTC_ALPHABET = "abcdefghijklmnopqrstuvwxyz'"


def ctc_units(cfg) -> str:
  """`model.ctc_units`, checked."""
  if cfg.ctc_units not in CTC_UNITS:
    raise ValueError(f"model.ctc_units must be one of {CTC_UNITS}, got {cfg.ctc_units!r}")
  return cfg.ctc_units


def ctc_alphabet(units: str) -> str:
  """The characters of a CTC head over `units` ("chars" or "chars_and_spaces"): label i + 1 is
  character i."""
  return CTC_ALPHABET + " " if units == "chars_and_spaces" else CTC_ALPHABET


def label_head(cfg) -> str:
  """`model.label_head`, checked."""
  if cfg.label_head not in LABEL_HEADS:
    raise ValueError(f"model.label_head must be one of {LABEL_HEADS}, got {cfg.label_head!r}")
  return cfg.label_head


def final_norm(cfg, param_dtype, rngs):
  """The layer norm at the end of a pre-norm stack (None for post-norm, whose blocks end in one)."""
  return nnx.LayerNorm(cfg.d_model, dtype=jnp.float32, param_dtype=param_dtype,
                       rngs=rngs) if pre_norm(cfg) else None


def _apply(norm, x):
  return x if norm is None else norm(x.astype(jnp.float32)).astype(x.dtype)


def compute_dtype(name: str):
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}")
  return jnp.dtype(name)


class ExpertsBlock(nnx.Module):
  """Mixture of experts (or a dense feed-forward layer) with residual, dropout and layer norm.

  norm(x + ffn(x)) (the paper's), or x + ffn(norm(x)) with `model.norm = "pre"`.
  """

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    d = cfg.d_model
    if cfg.use_moe:
      self.ffn = moe.MoE(d, cfg.hidden, cfg.num_experts, cfg.top_k,
                         capacity_factor=cfg.capacity_factor,
                         eval_capacity_factor=cfg.eval_capacity_factor, loss_coef=cfg.moe_loss_coef,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    else:
      self.ffn = feedforward.FeedForward(d, cfg.hidden, dtype=dtype, param_dtype=param_dtype,
                                         rngs=rngs)
    # Capacity of a decoding step: every token fits (a step holds only B tokens).
    self.step_capacity_factor = float(cfg.num_experts) / cfg.top_k if cfg.use_moe else None
    self.norm = nnx.LayerNorm(d, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.pre_norm = pre_norm(cfg)

  def __call__(self, x, mask=None, *, train=False, rngs=None, capacity_factor=None):
    h = _apply(self.norm, x) if self.pre_norm else x
    y, aux = self.ffn(h, mask, train=train, rngs=rngs, capacity_factor=capacity_factor)
    y = self.dropout(y, deterministic=not train, rngs=rngs)
    return (x + y if self.pre_norm else _apply(self.norm, x + y)), aux

  def step(self, x):
    return self(x, None, train=False, capacity_factor=self.step_capacity_factor)[0]


def _moe_position(num_blocks: int) -> int:
  """Index of the block after which the MoE sits: the middle of the stack."""
  return max(num_blocks // 2 - 1, 0)


class Encoder(nnx.Module):
  """Conv blocks ('same' padding) with a mixture of experts in the middle. [B, S, D] -> [B, S, D].

  A pre-norm encoder ends in a layer norm.
  """

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([
        conv.ConvBlock(cfg.d_model, cfg.kernel_size, tuple(cfg.dilations), dropout=cfg.dropout, **kw)
        for _ in range(cfg.encoder_blocks)])
    self.experts = ExpertsBlock(cfg, **kw)
    self.moe_at = _moe_position(cfg.encoder_blocks)
    self.final_norm = final_norm(cfg, param_dtype, rngs)

  def __call__(self, x, mask, *, train=False, rngs=None):
    aux = {}
    for i, block in enumerate(self.blocks):
      x = block(x, mask, train=train, rngs=rngs)
      if i == self.moe_at:
        x, aux = self.experts(x, mask, train=train, rngs=rngs)
    return conv.apply_mask(_apply(self.final_norm, x), mask), aux


class Mixer(nnx.Module):
  """I/O mixer: attention (causal self + cross to the encoder), then causal conv blocks."""

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention = attention.AttentionBlock(
        cfg.d_model, cfg.num_heads, enabled=cfg.use_attention, pre_norm=pre_norm(cfg),
        memory_timing=cfg.memory_timing, dropout=cfg.dropout, **kw)
    self.blocks = nnx.List([
        conv.ConvBlock(cfg.d_model, cfg.kernel_size, tuple(cfg.dilations), causal=True,
                       dropout=cfg.dropout, **kw) for _ in range(cfg.mixer_blocks)])

  def __call__(self, y, memory, memory_mask, *, train=False, rngs=None):
    y = self.attention(y, memory, memory_mask, train=train, rngs=rngs)
    for block in self.blocks:
      y = block(y, train=train, rngs=rngs)
    return y

  def init_state(self, memory, memory_mask, max_length):
    return {"attention": self.attention.init_state(memory, memory_mask, max_length),
            "blocks": [b.init_state(memory.shape[0], memory.dtype) for b in self.blocks]}

  def step(self, y, state, position):
    y, att = self.attention.step(y, state["attention"], position)
    blocks = []
    for block, s in zip(self.blocks, state["blocks"]):
      y, s = block.step(y, s)
      blocks.append(s)
    return y, {"attention": att, "blocks": blocks}


class Decoder(nnx.Module):
  """Blocks of (causal conv block, attention to the encoder); mixture of experts in the middle.

  A pre-norm decoder ends in a layer norm.
  """

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.List([
        conv.ConvBlock(cfg.d_model, cfg.kernel_size, tuple(cfg.dilations), causal=True,
                       dropout=cfg.dropout, **kw) for _ in range(cfg.decoder_blocks)])
    self.attentions = nnx.List([
        attention.AttentionBlock(cfg.d_model, cfg.num_heads, enabled=cfg.use_attention,
                                 pre_norm=pre_norm(cfg), memory_timing=cfg.memory_timing,
                                 dropout=cfg.dropout, **kw)
        for _ in range(cfg.decoder_blocks)])
    self.experts = ExpertsBlock(cfg, **kw)
    self.moe_at = _moe_position(cfg.decoder_blocks)
    self.final_norm = final_norm(cfg, param_dtype, rngs)

  def __call__(self, y, memory, memory_mask, target_mask, *, train=False, rngs=None):
    aux = {}
    for i, (conv_block, att) in enumerate(zip(self.convs, self.attentions)):
      y = conv_block(y, train=train, rngs=rngs)
      y = att(y, memory, memory_mask, train=train, rngs=rngs)
      if i == self.moe_at:
        y, aux = self.experts(y, target_mask, train=train, rngs=rngs)
    return _apply(self.final_norm, y), aux

  def init_state(self, memory, memory_mask, max_length):
    return {"convs": [c.init_state(memory.shape[0], memory.dtype) for c in self.convs],
            "attentions": [a.init_state(memory, memory_mask, max_length) for a in self.attentions]}

  def step(self, y, state, position):
    convs, atts = [], []
    for i, (conv_block, att) in enumerate(zip(self.convs, self.attentions)):
      y, c = conv_block.step(y, state["convs"][i])
      y, a = att.step(y, state["attentions"][i], position)
      convs.append(c)
      atts.append(a)
      if i == self.moe_at:
        y = self.experts.step(y)
    return _apply(self.final_norm, y), {"convs": convs, "attentions": atts}


class MultiModel(nnx.Module):
  """The whole network. `cfg` is the `model` section of a config."""

  def __init__(self, cfg, *, modality_names=modalities.NAMES, rngs: nnx.Rngs):
    dtype, param_dtype = compute_dtype(cfg.dtype), jnp.float32
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.d_model, self.dtype, self.label_smoothing = cfg.d_model, dtype, cfg.label_smoothing
    self.target_word_dropout = cfg.target_word_dropout
    self.ctc_weight, self.ctc_units = cfg.ctc_weight, ctc_units(cfg)
    self.label_head = label_head(cfg)
    self.modalities = nnx.Dict({name: modalities.build(name, cfg, **kw) for name in modality_names})
    init = nnx.with_partitioning(nnx.initializers.normal(1.0), (None, sharding.EMBED))
    self.commands = nnx.Param(init(rngs.params(), (cfg.num_commands, cfg.d_model), param_dtype))
    self.encoder = Encoder(cfg, **kw)
    self.mixer = Mixer(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.dropout = nnx.Dropout(cfg.dropout)
    # The CTC loss's own softmax when it is over characters (the blank and `ctc_alphabet`).
    self.ctc_head = nnx.Linear(
        cfg.d_model, 1 + len(ctc_alphabet(self.ctc_units)), dtype=dtype, param_dtype=param_dtype,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (sharding.EMBED, None))
    ) if cfg.ctc_weight > 0 and self.ctc_units != "pieces" else None

  def _modality(self, name):
    if name not in self.modalities:
      raise KeyError(f"This model has no {name!r} modality net; it has {sorted(self.modalities)}")
    return self.modalities[name]

  def command(self, task: TaskSpec) -> Array:
    """The command token's embedding, [D]."""
    return self.commands[...][task.command_id].astype(self.dtype)

  def encode(self, task: TaskSpec, inputs: Array, input_mask: Array | None = None, *,
             train: bool = False, rngs: nnx.Rngs | None = None):
    """Raw inputs -> (encoder output [B, S, D], mask bool [B, S] or None, MoE aux)."""
    x, mask = self._modality(task.input_modality).encode(inputs, input_mask, train=train, rngs=rngs)
    x = self.dropout(attention.add_timing(x), deterministic=not train, rngs=rngs)
    enc, aux = self.encoder(x, mask, train=train, rngs=rngs)
    return enc, mask, aux

  def _decoder_inputs(self, task, targets, *, train=False, rngs=None):
    """Command token then targets shifted right: [B, T] -> [B, T, D].

    In training, each target embedding is zeroed with probability `target_word_dropout`.
    """
    y = self._modality(task.target_modality).embed_targets(targets)  # [B, T, D]
    if train and self.target_word_dropout > 0:
      if rngs is None:
        raise ValueError("model.target_word_dropout > 0 needs rngs with a 'dropout' stream in "
                         "training; got rngs=None")
      keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.target_word_dropout, y.shape[:2])
      y = jnp.where(keep[..., None], y, jnp.zeros((), y.dtype))
    cmd = jnp.broadcast_to(self.command(task), (y.shape[0], 1, y.shape[2]))
    return jnp.concatenate([cmd, y[:, :-1]], axis=1)

  def __call__(self, task: TaskSpec, inputs: Array, targets: Array,
               input_mask: Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> tuple[Array, dict]:
    """Teacher-forced forward pass.

    Returns:
      logits: [B, T, V] for sequence targets, [B, num_classes] for label targets (float32).
      aux: {"encoder": MoE aux, "decoder": MoE aux} (no decoder entry for label targets read by
        `label_head="pool"`), and for audio inputs with text targets when `ctc_weight` > 0,
        "ctc": {"logits": the text softmax applied to the encoder output [B, S', V] (id 0, the
        padding id, is CTC's blank), or over characters the CTC head's [B, S', 28 or 29] (the
        blank and `ctc_alphabet`), "mask": bool [B, S']}: `objective.ctc_loss` reads it.
    """
    enc, enc_mask, enc_aux = self.encode(task, inputs, input_mask, train=train, rngs=rngs)
    target = self._modality(task.target_modality)
    if not target.autoregressive and self.label_head == "pool":
      pooled = conv.masked_mean(enc, enc_mask) + self.command(task)  # [B, D]
      return (target.logits(pooled, task.num_classes, task.label_offset),
              {"encoder": enc_aux})
    if target.autoregressive:
      y = self._decoder_inputs(task, targets, train=train, rngs=rngs)  # [B, T, D]
      target_mask = targets != 0  # [B, T]
    else:  # label_head "decoder": a target of length 1, the command token.
      y = jnp.broadcast_to(self.command(task), (enc.shape[0], 1, self.d_model))
      target_mask = jnp.ones(y.shape[:2], bool)
    y = self.dropout(y, deterministic=not train, rngs=rngs)
    y = self.mixer(y, enc, enc_mask, train=train, rngs=rngs)
    h, dec_aux = self.decoder(y, enc, enc_mask, target_mask, train=train, rngs=rngs)
    aux = {"encoder": enc_aux, "decoder": dec_aux}
    if target.autoregressive:
      if self.ctc_weight > 0 and task.input_modality == "audio":
        mask = jnp.ones(enc.shape[:2], bool) if enc_mask is None else enc_mask
        logits = (target.logits(enc) if self.ctc_head is None
                  else self.ctc_head(enc).astype(jnp.float32))
        aux["ctc"] = {"logits": logits, "mask": mask}
      return target.logits(h), aux
    return target.logits(h[:, 0], task.num_classes, task.label_offset), aux

  # Incremental decoding: state = per-layer caches; one call per output position.

  def init_decode_state(self, task: TaskSpec, enc: Array, enc_mask: Array | None,
                        max_length: int) -> dict:
    """Caches for decoding up to `max_length` positions from encoder output [B, S, D]."""
    return {"mixer": self.mixer.init_state(enc, enc_mask, max_length),
            "decoder": self.decoder.init_state(enc, enc_mask, max_length)}

  def decode_step(self, task: TaskSpec, state: dict, prev_token: Array,
                  position: Array) -> tuple[Array, dict]:
    """Logits of position `position` given the token at `position - 1`.

    Args:
      prev_token: int [B], ignored at position 0 (the command token is the first input).
      position: int scalar (may be traced).
    Returns:
      logits float32 [B, V] and the new state.
    """
    target = self._modality(task.target_modality)
    emb = target.embed_targets(prev_token[:, None])  # [B, 1, D]
    y = jnp.where(position == 0, self.command(task)[None, None, :], emb)
    y, mixer_state = self.mixer.step(y, state["mixer"], position)
    h, decoder_state = self.decoder.step(y, state["decoder"], position)
    return target.logits(h)[:, 0], {"mixer": mixer_state, "decoder": decoder_state}
