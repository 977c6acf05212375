"""Cross-entropy with label smoothing over padded positions, shared by the target modalities."""

import jax
import jax.numpy as jnp

Array = jax.Array


def smoothed_cross_entropy(logits: Array, targets: Array, weights: Array,
                           label_smoothing: float) -> dict:
  """Sums of smoothed loss, plain negative log-likelihood and correct predictions.

  Args:
    logits: [..., V] float.
    targets: [...] int ids.
    weights: [...] float, 0 at padding.
  Returns:
    dict of float32 scalars: `loss` (smoothed), `nll`, `correct`, `weight` (the sum of weights).
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  # The target's log-probability as a masked sum, not a gather: its gradient is then an
  # elementwise select that fuses with the softmax's, where a gather's is a scatter into zeros.
  is_target = targets[..., None] == jnp.arange(log_probs.shape[-1])  # [..., V]
  nll = -jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
  # Smoothing: mix the one-hot target with a uniform distribution over the vocabulary.
  confidence = 1.0 - label_smoothing
  smooth = -log_probs.mean(axis=-1)
  loss = confidence * nll + label_smoothing * smooth
  correct = (jnp.argmax(log_probs, axis=-1) == targets).astype(jnp.float32)
  w = weights.astype(jnp.float32)
  return {"loss": (loss * w).sum(), "nll": (nll * w).sum(), "correct": (correct * w).sum(),
          "weight": w.sum()}
