"""Audio: log-mel frames (computed by the input pipeline, `audio_features.log_mel`) -> per-utterance
mean and variance normalisation of each mel bin (optional) -> in training, SpecAugment's masks
(optional) -> 2-D conv stack strided along time and frequency -> [B, S', D] with
S' = ceil(S / 2^layers).

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
               normalize: bool = False, freq_masks: int = 0, freq_width: int = 0,
               time_masks: int = 0, time_ratio: float = 0.0, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.normalize = normalize
    self.masks = (freq_masks, freq_width, time_masks, time_ratio)
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
    """inputs [B, S, M] log-mel, input_mask bool [B, S] -> ([B, S', D], mask [B, S']).

    In training (with `rngs` holding a `dropout` stream) the frames get SpecAugment's masks when
    the module has any (`spec_augment`).
    """
    x = inputs.astype(jnp.float32)
    if self.normalize:
      x = normalize_utterance(x, input_mask)
    freq_masks, freq_width, time_masks, time_ratio = self.masks
    if train and rngs is not None and (freq_masks or time_masks):
      x = spec_augment(rngs.dropout(), x, input_mask, freq_masks=freq_masks,
                       freq_width=freq_width, time_masks=time_masks, time_ratio=time_ratio)
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


def spec_augment(key: Array, x: Array, mask: Array | None = None, *, freq_masks: int = 2,
                 freq_width: int = 27, time_masks: int = 2, time_ratio: float = 0.05) -> Array:
  """SpecAugment's frequency and time masking (Park et al. 2019), without time warping.

  Each utterance gets `freq_masks` bands of f ~ U{0..freq_width} consecutive mel bins and
  `time_masks` spans of t ~ U{0..floor(time_ratio * its length)} consecutive real frames, each at
  a uniform position, set to the utterance's mean (0 after `normalize_utterance`). The time masks
  scale with each utterance's length, as in the adaptive masking of Park et al. 2020, so that a
  one-second prompt and a twenty-second verse lose the same share. Padded frames stay as they are.

  Args:
    key: PRNG key.
    x: [B, S, M] float log-mel frames.
    mask: bool [B, S], True at real frames (None: all real).
  Returns:
    [B, S, M] with the masked bins and frames at the utterance's mean.
  """
  batch, frames, bins = x.shape
  if mask is None:
    mask = jnp.ones((batch, frames), bool)
  k_fw, k_f0, k_tw, k_t0 = jax.random.split(key, 4)

  def bands(k_width, k_start, count, max_width, size, positions):
    """bool [B, len(positions)]: inside any of `count` random bands per example."""
    width = jnp.floor(jax.random.uniform(k_width, (batch, count)) * (max_width[:, None] + 1))
    start = jnp.floor(jax.random.uniform(k_start, (batch, count)) * (size[:, None] - width + 1))
    inside = (positions >= start[..., None]) & (positions < (start + width)[..., None])
    return inside.any(axis=1)  # [B, len(positions)]

  length = mask.sum(axis=1).astype(jnp.float32)  # [B]
  freq = bands(k_fw, k_f0, freq_masks, jnp.full((batch,), float(freq_width)),
               jnp.full((batch,), float(bins)), jnp.arange(bins))  # [B, M]
  time = bands(k_tw, k_t0, time_masks, jnp.floor(time_ratio * length), length,
               jnp.arange(frames))  # [B, S]
  w = mask[:, :, None].astype(x.dtype)  # [B, S, 1]
  mean = (x * w).sum(axis=(1, 2), keepdims=True) / jnp.maximum(w.sum(axis=(1, 2), keepdims=True)
                                                                * bins, 1.0)  # [B, 1, 1]
  masked = (freq[:, None, :] | time[:, :, None]) & mask[:, :, None]  # [B, S, M]
  return jnp.where(masked, mean, x)
