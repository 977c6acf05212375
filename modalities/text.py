"""Text: subword ids of the one shared SentencePiece vocabulary (0 = pad, 1 = end of sequence)."""

import jax
import jax.numpy as jnp
from flax import nnx

from modalities import losses
from multimodel import sharding

Array = jax.Array


@jax.custom_vjp
def tied_logits(h: Array, embedding: Array) -> Array:
  """h [B, T, D] . embedding [V, D] -> logits [B, T, V] (the output projection tied to the input).

  Differentiated by hand only to choose the layout of the embedding's gradient: autodiff asks for
  g^T h, and XLA on CPU then writes g [B, T, V], the largest array of a text step, transposed
  into a new buffer; (h^T g)^T transposes the small [D, V] product instead (docs/performance.md).
  """
  return jnp.einsum("BTD,VD->BTV", h, embedding)


def _tied_logits_fwd(h, embedding):
  return tied_logits(h, embedding), (h, embedding)


def _tied_logits_bwd(residuals, g):
  h, embedding = residuals
  dh = jnp.einsum("BTV,VD->BTD", g, embedding)  # [B, T, D]
  d_embedding = jnp.einsum("BTD,BTV->DV", h, g).T  # [D, V] -> [V, D]
  return dh, d_embedding


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


class Text(nnx.Module):
  """Embeds ids (scaled by sqrt(D)); logits over the vocabulary (tied to the embedding by default).

  One instance serves as input and target modality of every text task.
  """

  autoregressive = True

  def __init__(self, vocab_size: int, d_model: int, *, tie_embeddings: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.d_model, self.dtype = d_model, dtype
    init = nnx.with_partitioning(nnx.initializers.normal(d_model ** -0.5),
                                 (sharding.VOCAB, sharding.EMBED))
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype))  # [V, D]
    if tie_embeddings:
      self.output = None
    else:  # Assigned once: nnx keeps an attribute first set to None static.
      out_init = nnx.with_partitioning(nnx.initializers.normal(d_model ** -0.5),
                                       (sharding.EMBED, sharding.VOCAB))
      self.output = nnx.Param(out_init(rngs.params(), (d_model, vocab_size), param_dtype))

  def _embed(self, ids: Array) -> Array:
    emb = jnp.take(self.embedding[...], ids, axis=0)  # [B, L, D]
    return (emb * self.d_model ** 0.5).astype(self.dtype)

  def encode(self, inputs: Array, input_mask: Array | None = None, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[Array, Array]:
    """inputs int [B, S] -> ([B, S, D], mask bool [B, S] = ids != 0)."""
    del input_mask, train, rngs
    return self._embed(inputs), inputs != 0

  def embed_targets(self, targets: Array) -> Array:
    """targets int [B, T] -> [B, T, D]."""
    return self._embed(targets)

  def logits(self, h: Array, num_classes: int = 0, label_offset: int = 0) -> Array:
    """h [B, T, D] -> float32 [B, T, V]."""
    del num_classes, label_offset
    if self.output is None:
      w = self.embedding[...].astype(self.dtype)  # [V, D]
      return tied_logits(h.astype(self.dtype), w).astype(jnp.float32)
    return jnp.einsum("BTD,DV->BTV", h.astype(self.dtype),
                      self.output[...].astype(self.dtype)).astype(jnp.float32)

  def loss(self, logits: Array, targets: Array, weights: Array | None,
           label_smoothing: float) -> dict:
    """Padded cross-entropy: logits [B, T, V], targets [B, T] (0 = pad), weights [B] or None."""
    w = (targets != 0).astype(jnp.float32)
    if weights is not None:
      w = w * weights[:, None]
    return losses.smoothed_cross_entropy(logits, targets, w, label_smoothing)
