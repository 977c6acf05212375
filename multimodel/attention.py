"""Multi-head dot-product attention with a sinusoid timing signal and padding / causal masks.

Shapes: B batch, T query length, S key length, D width, H heads, d = D / H head width.
`AttentionBlock` is the body's attention unit: causal self-attention (optional) then
cross-attention to a memory (the encoder output), each followed by a residual and a layer norm.
Its `step` decodes one position with a key/value cache of fixed size [B, T_max, H, d].
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import conv, sharding

Array = jax.Array
NEG_INF = -1e9


def timing_signal(positions: Array, channels: int, min_timescale: float = 1.0,
                  max_timescale: float = 1.0e4) -> Array:
  """Sinusoid timing signal (tensor2tensor's `get_timing_signal_1d`) at integer positions.

  Args:
    positions: [L] int positions (may be traced, e.g. the decode step).
  Returns:
    [L, channels] float32: sin in the first half of the channels, cos in the second.
  """
  num_timescales = channels // 2
  log_increment = math.log(max_timescale / min_timescale) / max(num_timescales - 1, 1)
  inv_timescales = min_timescale * jnp.exp(jnp.arange(num_timescales) * -log_increment)
  scaled = positions.astype(jnp.float32)[:, None] * inv_timescales[None, :]  # [L, D/2]
  signal = jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=1)
  return jnp.pad(signal, ((0, 0), (0, channels % 2)))


def add_timing(x: Array, offset: Array | int = 0) -> Array:
  """x [B, L, D] + timing signal at positions offset .. offset + L - 1."""
  positions = jnp.arange(x.shape[1]) + offset
  return x + timing_signal(positions, x.shape[-1]).astype(x.dtype)[None]


def causal_mask(length: int) -> Array:
  """bool [1, T, T]: query t sees keys <= t."""
  return jnp.tril(jnp.ones((length, length), bool))[None]


class MultiHeadAttention(nnx.Module):
  """Dot-product attention with H heads: queries [B, T, D] attend to keys/values [B, S, D]."""

  def __init__(self, features: int, num_heads: int, *, key_timing: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    """key_timing: add the timing signal to the memory before the key projection only."""
    if features % num_heads:
      raise ValueError(f"width {features} is not divisible by {num_heads} heads")
    self.num_heads, self.head_dim, self.dtype = num_heads, features // num_heads, dtype
    self.key_timing = key_timing
    shape = (features, num_heads, self.head_dim)

    def proj(axes):
      init = nnx.with_partitioning(
          nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=(1, 2)),
          axes)
      return nnx.Param(init(rngs.params(), shape, param_dtype))

    qkv_axes = (sharding.EMBED, sharding.HEADS, None)
    self.wq, self.wk, self.wv = proj(qkv_axes), proj(qkv_axes), proj(qkv_axes)
    out_init = nnx.with_partitioning(
        nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1), out_axis=2),
        (sharding.HEADS, None, sharding.EMBED))
    self.wo = nnx.Param(out_init(rngs.params(), (num_heads, self.head_dim, features), param_dtype))

  def project_kv(self, memory: Array) -> tuple[Array, Array]:
    """memory [B, S, D] -> keys, values [B, S, H, d]."""
    m = memory.astype(self.dtype)
    k = jnp.einsum("BSD,DHd->BSHd", add_timing(m) if self.key_timing else m,
                   self.wk[...].astype(self.dtype))
    v = jnp.einsum("BSD,DHd->BSHd", m, self.wv[...].astype(self.dtype))
    return k, v

  def attend(self, x: Array, k: Array, v: Array, mask: Array | None) -> Array:
    """x [B, T, D] queries over k, v [B, S, H, d]; mask bool broadcastable to [B, T, S]."""
    q = jnp.einsum("BTD,DHd->BTHd", x.astype(self.dtype), self.wq[...].astype(self.dtype))
    logits = jnp.einsum("BTHd,BSHd->BHTS", q, k).astype(jnp.float32) / math.sqrt(self.head_dim)
    if mask is not None:
      logits = jnp.where(mask[:, None], logits, NEG_INF)  # [B, H, T, S]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    ctx = jnp.einsum("BHTS,BSHd->BTHd", weights, v)  # [B, T, H, d]
    return jnp.einsum("BTHd,HdD->BTD", ctx, self.wo[...].astype(self.dtype))

  def __call__(self, x: Array, memory: Array, mask: Array | None = None) -> Array:
    k, v = self.project_kv(memory)
    return self.attend(x, k, v, mask)


class AttentionBlock(nnx.Module):
  """(Causal self-attention) then cross-attention to a memory; residual + layer norm after each.

  With `enabled=False` (the paper's no-attention ablation) self-attention is skipped and the
  cross-attention is replaced by the masked mean of the memory, so the decoder still sees the input.
  With `pre_norm` the layer norm moves onto the branch's input, x + f(norm(x)), instead of
  norm(x + f(x)) (see `model.norm` in the configs). With `memory_timing` the cross-attention's
  keys are projected from the memory plus the timing signal (see `model.memory_timing`).
  """

  def __init__(self, features: int, num_heads: int, *, self_attention: bool = True,
               enabled: bool = True, pre_norm: bool = False, memory_timing: bool = False,
               dropout: float = 0.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.enabled, self.has_self, self.pre_norm = enabled, self_attention and enabled, pre_norm
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if self.has_self:
      self.self_attn = MultiHeadAttention(features, num_heads, **kw)
      self.self_norm = nnx.LayerNorm(features, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    if enabled:
      self.cross_attn = MultiHeadAttention(features, num_heads, key_timing=memory_timing, **kw)
    self.cross_norm = nnx.LayerNorm(features, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.dropout = nnx.Dropout(dropout)

  def _residual(self, norm, x, branch, train, rngs):
    """x + branch with its layer norm: norm(x + branch(x)), or x + branch(norm(x)) when pre_norm."""
    normed = lambda v: norm(v.astype(jnp.float32)).astype(x.dtype)
    if self.pre_norm:
      return x + self.dropout(branch(normed(x)), deterministic=not train, rngs=rngs)
    return normed(x + self.dropout(branch(x), deterministic=not train, rngs=rngs))

  def __call__(self, x: Array, memory: Array, memory_mask: Array | None = None, *,
               train: bool = False, rngs: nnx.Rngs | None = None) -> Array:
    """x [B, T, D] (causal over T), memory [B, S, D], memory_mask bool [B, S] -> [B, T, D]."""
    if self.has_self:
      def self_branch(v):
        h = add_timing(v)
        return self.self_attn(h, h, causal_mask(v.shape[1]))
      x = self._residual(self.self_norm, x, self_branch, train, rngs)
    if not self.enabled:
      mean = conv.masked_mean(memory, memory_mask, keepdims=True)  # [B, 1, D]
      return self._residual(self.cross_norm, x, lambda v: jnp.broadcast_to(mean, v.shape),
                            train, rngs)
    mask = None if memory_mask is None else memory_mask[:, None, :]  # [B, 1, S]
    return self._residual(self.cross_norm, x,
                          lambda v: self.cross_attn(add_timing(v), memory, mask), train, rngs)

  def init_state(self, memory: Array, memory_mask: Array | None, max_length: int) -> dict:
    """Decoding state: cross keys/values of the memory once, empty self-attention cache."""
    batch = memory.shape[0]
    state = {"memory_mask": (jnp.ones(memory.shape[:2], bool) if memory_mask is None
                             else memory_mask)}
    if not self.enabled:
      state["memory_mean"] = conv.masked_mean(memory, memory_mask, keepdims=True)
      return state
    state["cross_k"], state["cross_v"] = self.cross_attn.project_kv(memory)
    if self.has_self:
      a = self.self_attn
      shape = (batch, max_length, a.num_heads, a.head_dim)
      state["self_k"] = jnp.zeros(shape, a.dtype)
      state["self_v"] = jnp.zeros(shape, a.dtype)
    return state

  def step(self, x: Array, state: dict, position: Array) -> tuple[Array, dict]:
    """One position: x [B, 1, D] at `position` (int scalar) -> ([B, 1, D], new state)."""
    state = dict(state)
    if self.has_self:
      def self_branch(u):
        h = add_timing(u, position)
        k, v = self.self_attn.project_kv(h)  # [B, 1, H, d]
        for name, new in (("self_k", k), ("self_v", v)):
          state[name] = jax.lax.dynamic_update_slice_in_dim(state[name], new, position, axis=1)
        seen = (jnp.arange(state["self_k"].shape[1]) <= position)[None, None, :]  # [1, 1, T_max]
        return self.self_attn.attend(h, state["self_k"], state["self_v"], seen)
      x = self._residual(self.self_norm, x, self_branch, False, None)
    if not self.enabled:
      mean = state["memory_mean"]
      return self._residual(self.cross_norm, x, lambda v: jnp.broadcast_to(mean, v.shape),
                            False, None), state
    def cross_branch(v):
      return self.cross_attn.attend(add_timing(v, position), state["cross_k"], state["cross_v"],
                                    state["memory_mask"][:, None, :])
    return self._residual(self.cross_norm, x, cross_branch, False, None), state
