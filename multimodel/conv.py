"""Separable convolutions along the sequence, conv steps and conv blocks.

Shapes: B batch, L sequence length, D width, k kernel size. Every module here works on [B, L, D];
images reach the body flattened to [B, H*W, D] by their modality net.

A causal module (decoder) pads on the left only, so position t sees positions <= t; it also has a
`step` that consumes one position and a small state (the last (k-1)*dilation inputs), so decoding
costs O(1) per position.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import sharding

Array = jax.Array
State = Any  # Per-module decoding state: an array or a list of arrays.


def apply_mask(x: Array, mask: Array | None) -> Array:
  """Zeroes padded positions: x [B, L, D], mask bool [B, L] or None."""
  return x if mask is None else x * mask[..., None].astype(x.dtype)


def masked_mean(x: Array, mask: Array | None, keepdims: bool = False) -> Array:
  """Mean over real positions: x [B, L, D], mask bool [B, L] or None -> [B, D] ([B, 1, D])."""
  if mask is None:
    return x.mean(axis=1, keepdims=keepdims)
  m = mask[..., None].astype(x.dtype)
  return (x * m).sum(1, keepdims=keepdims) / jnp.maximum(m.sum(1, keepdims=keepdims), 1.0)


class SeparableConv(nnx.Module):
  """Depthwise conv (k taps, dilation) along L, then a pointwise projection D_in -> D_out."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, dilation: int = 1,
               causal: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.kernel_size, self.dilation, self.causal, self.dtype = kernel_size, dilation, causal, dtype
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(in_axis=0, out_axis=()),
                                 (sharding.CONV, sharding.EMBED))
    # Depthwise taps: fan-in of each output channel is k.
    self.depthwise = nnx.Param(init(rngs.params(), (kernel_size, in_features), param_dtype))
    self.pointwise = nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (sharding.EMBED, sharding.EMBED)))

  @property
  def receptive(self) -> int:
    """Positions of context a tap window spans minus one: (k - 1) * dilation."""
    return (self.kernel_size - 1) * self.dilation

  def _taps(self, padded: Array, length: int) -> Array:
    """Sum over taps of shifted inputs: padded [B, L + receptive, D] -> [B, L, D]."""
    w = self.depthwise[...].astype(self.dtype)  # [k, D]
    out = 0.0
    for j in range(self.kernel_size):  # k is 3 to 5: a few shifted multiply-adds.
      start = j * self.dilation
      out = out + padded[:, start:start + length] * w[j]
    return out

  def __call__(self, x: Array) -> Array:
    """x [B, L, D_in] -> [B, L, D_out]; zero padding ('same' or left-only when causal)."""
    r = self.receptive
    left = r if self.causal else r // 2
    padded = jnp.pad(x.astype(self.dtype), ((0, 0), (left, r - left), (0, 0)))
    return self.pointwise(self._taps(padded, x.shape[1]))

  def init_state(self, batch: int, dtype=None) -> Array:
    """Decoding state: the last `receptive` inputs, zeros before the sequence starts."""
    return jnp.zeros((batch, self.receptive, self.depthwise[...].shape[1]), dtype or self.dtype)

  def step(self, x: Array, state: Array) -> tuple[Array, Array]:
    """One causal position: x [B, 1, D_in], state [B, r, D_in] -> ([B, 1, D_out], new state)."""
    assert self.causal, "step() is defined for causal convolutions only"
    window = jnp.concatenate([state, x.astype(state.dtype)], axis=1)  # [B, r + 1, D_in]
    return self.pointwise(self._taps(window, 1)), window[:, 1:]


class ConvStep(nnx.Module):
  """ReLU -> separable conv -> layer norm, on [B, L, D]. Padded positions are zeroed first."""

  def __init__(self, features: int, kernel_size: int, *, dilation: int = 1, causal: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = SeparableConv(features, features, kernel_size, dilation=dilation, causal=causal,
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(features, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, mask: Array | None = None) -> Array:
    y = self.conv(apply_mask(jax.nn.relu(x), mask))
    return self.norm(y.astype(jnp.float32)).astype(x.dtype)

  def init_state(self, batch: int, dtype=None) -> Array:
    return self.conv.init_state(batch, dtype)

  def step(self, x: Array, state: Array) -> tuple[Array, Array]:
    y, state = self.conv.step(jax.nn.relu(x), state)
    return self.norm(y.astype(jnp.float32)).astype(x.dtype), state


class ConvBlock(nnx.Module):
  """Four conv steps; the block input is added to the outputs of steps 2 and 4.

  Then dropout on the block's change. [B, L, D] -> [B, L, D].
  """

  def __init__(self, features: int, kernel_size: int, dilations=(1, 1, 2, 4), *,
               causal: bool = False, dropout: float = 0.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if len(dilations) != 4:
      raise ValueError(f"A conv block has 4 conv steps; got dilations {dilations}")
    self.steps = nnx.List([
        ConvStep(features, kernel_size, dilation=d, causal=causal, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs) for d in dilations])
    self.dropout = nnx.Dropout(dropout)

  def _run(self, x, run_step):
    h = run_step(0, x)
    y = x + run_step(1, h)  # residual after step 2
    h = run_step(2, y)
    return y + run_step(3, h)  # residual after step 4

  def __call__(self, x: Array, mask: Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None) -> Array:
    y = self._run(x, lambda i, h: self.steps[i](h, mask))
    return x + self.dropout(y - x, deterministic=not train, rngs=rngs)

  def init_state(self, batch: int, dtype=None) -> list[Array]:
    return [s.init_state(batch, dtype) for s in self.steps]

  def step(self, x: Array, state: list[Array]) -> tuple[Array, list[Array]]:
    """One position (inference only, no dropout): x [B, 1, D]."""
    new_state = list(state)

    def run_step(i, h):
      out, new_state[i] = self.steps[i].step(h, state[i])
      return out

    return self._run(x, run_step), new_state
