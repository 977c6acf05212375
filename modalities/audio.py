"""Audio: log-mel frames (computed by the input pipeline, `audio_features.log_mel`) -> 2-D conv
stack strided along time and frequency -> [B, S', D] with S' = ceil(S / 2^layers).

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
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
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
    x = inputs.astype(self.dtype)[..., None]  # [B, S, M, 1]
    mask = input_mask
    for conv, norm in zip(self.convs, self.norms):
      if mask is not None:
        x = x * mask[:, :, None, None].astype(x.dtype)
      x = jax.nn.relu(norm(conv(x).astype(jnp.float32))).astype(self.dtype)  # [B, S/2, M/2, F]
      mask = None if mask is None else mask[:, ::2]
    x = x.reshape(x.shape[0], x.shape[1], -1)  # [B, S', M' * F]
    return self.project(x), mask
