"""Categorical: class labels, as targets (pooled encoder -> logits) or as input tokens."""

import jax
import jax.numpy as jnp
from flax import nnx

from modalities import losses
from multimodel import sharding

Array = jax.Array


class Label(nnx.Module):
  """One label space of `num_labels` slots shared by every classification task.

  As a target: one vector per example (`model.label_head`: the masked mean of the encoder output
  plus the command embedding, or the decoder's output at the command token) goes through a dense
  layer to logits; a task with `num_classes` classes reads its own slots
  `[label_offset, label_offset + num_classes)` of them.
  As an input: labels embed like tokens.
  """

  autoregressive = False

  def __init__(self, num_labels: int, d_model: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.d_model, self.dtype, self.num_labels = d_model, dtype, num_labels
    init = nnx.with_partitioning(nnx.initializers.normal(d_model ** -0.5),
                                 (sharding.LABELS, sharding.EMBED))
    self.embedding = nnx.Param(init(rngs.params(), (num_labels, d_model), param_dtype))
    self.head = nnx.Linear(
        d_model, num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        # Zero-initialised: every task starts at the uniform prediction, loss log(num_classes).
        kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                          (sharding.EMBED, sharding.LABELS)))

  def encode(self, inputs: Array, input_mask: Array | None = None, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[Array, Array | None]:
    """inputs int [B] or [B, S] -> ([B, S, D], None)."""
    del train, rngs
    ids = inputs[:, None] if inputs.ndim == 1 else inputs
    emb = jnp.take(self.embedding[...], ids, axis=0) * self.d_model ** 0.5
    return emb.astype(self.dtype), input_mask

  def logits(self, pooled: Array, num_classes: int, label_offset: int = 0) -> Array:
    """pooled [B, D] (see the class) -> float32 [B, num_classes] (the task's slots)."""
    if label_offset + num_classes > self.num_labels:
      raise ValueError(f"label slots [{label_offset}, {label_offset + num_classes}) exceed the "
                       f"model's label space of model.num_labels={self.num_labels}")
    logits = self.head(pooled.astype(self.dtype)).astype(jnp.float32)
    return logits[:, label_offset:label_offset + num_classes]

  def loss(self, logits: Array, targets: Array, weights: Array | None,
           label_smoothing: float) -> dict:
    """logits [B, num_classes], targets int [B], weights [B] or None."""
    w = jnp.ones(targets.shape, jnp.float32) if weights is None else weights
    return losses.smoothed_cross_entropy(logits, targets, w, label_smoothing)
