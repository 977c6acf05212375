"""Audio: log-mel frames (computed by the input pipeline, `audio_features.log_mel`) -> per-utterance
mean and variance normalisation of each mel bin (optional) -> 2-D conv stack strided along time and
frequency -> [B, S', D] with S' = ceil(S / 2^layers).

Padded frames are zeroed before every conv and the convs pad explicitly, so outputs at real frames
never depend on how much padding follows.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import sharding

Array = jax.Array


class Audio(nnx.Module):
  """Audio input modality: inputs [B, S, M] float, input_mask bool [B, S]."""

  def __init__(self, d_model: int, *, num_mel_bins: int = 80, filters: int = 64, layers: int = 2,
               normalize: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.normalize = normalize
    chans = [1] + [filters] * layers
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                 (sharding.CONV, sharding.CONV, None, None))
    self.convs = nnx.List([
        nnx.Conv(i, o, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=dtype,
                 param_dtype=param_dtype, kernel_init=init, rngs=rngs)
        for i, o in zip(chans[:-1], chans[1:])])
    self.norms = nnx.List([nnx.LayerNorm(filters, dtype=jnp.float32, param_dtype=param_dtype,
                                         rngs=rngs) for _ in range(layers)])
    mel = num_mel_bins
    for _ in range(layers):
      mel = -(-mel // 2)
    self.project = nnx.Linear(
        mel * filters, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, sharding.EMBED)))

  def encode(self, inputs: Array, input_mask: Array | None = None, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[Array, Array | None]:
    """inputs [B, S, M] log-mel, input_mask bool [B, S] -> ([B, S', D], mask [B, S'])."""
    del train, rngs
    x = inputs.astype(jnp.float32)
    if self.normalize:
      x = normalize_utterance(x, input_mask)
    x = x.astype(self.dtype)[..., None]  # [B, S, M, 1]
    mask = input_mask
    for conv, norm in zip(self.convs, self.norms):
      if mask is not None:
        x = x * mask[:, :, None, None].astype(x.dtype)
      x = jax.nn.relu(norm(conv(x).astype(jnp.float32))).astype(self.dtype)  # [B, S/2, M/2, F]
      mask = None if mask is None else mask[:, ::2]
    x = x.reshape(x.shape[0], x.shape[1], -1)  # [B, S', M' * F]
    return self.project(x), mask


def normalize_utterance(x: Array, mask: Array | None = None, eps: float = 1e-5) -> Array:
  """Each mel bin of each utterance to zero mean and unit variance over its real frames.

  Cepstral mean and variance normalisation on log-mel frames: it removes the recording's level
  and channel (a microphone's response, a constant per mel bin in the log domain) and leaves the
  changes over time that carry the words. Raw log-mel values are about -14 to +8, mostly negative,
  and differ in level between sources. Padded frames come out 0.

  Args:
    x: [B, S, M] float log-mel frames.
    mask: bool [B, S], True at real frames (None: all real).
  """
  if mask is None:
    mask = jnp.ones(x.shape[:2], bool)
  w = mask[:, :, None].astype(x.dtype)  # [B, S, 1]
  count = jnp.maximum(w.sum(axis=1, keepdims=True), 1.0)  # [B, 1, 1]
  mean = (x * w).sum(axis=1, keepdims=True) / count  # [B, 1, M]
  var = (jnp.square(x - mean) * w).sum(axis=1, keepdims=True) / count
  return (x - mean) * jax.lax.rsqrt(var + eps) * w
