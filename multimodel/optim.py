"""The optimizer: Adam with the paper's settings, inverse-sqrt ("noam") schedule, global-norm clip."""

import jax.numpy as jnp
import optax


def noam_schedule(learning_rate: float, d_model: int, warmup_steps: int) -> optax.Schedule:
  """lr(step) = learning_rate * D^-0.5 * min(step * warmup^-1.5, step^-0.5), step counted from 1."""

  def schedule(step):
    step = jnp.asarray(step, jnp.float32) + 1.0
    return learning_rate * d_model ** -0.5 * jnp.minimum(step * warmup_steps ** -1.5,
                                                         step ** -0.5)

  return schedule


def make(train_cfg, d_model: int) -> optax.GradientTransformation:
  """Clip by global norm, then Adam(b1, b2, eps) scaled by the noam schedule."""
  schedule = noam_schedule(train_cfg.learning_rate, d_model, train_cfg.warmup_steps)
  return optax.chain(
      optax.clip_by_global_norm(train_cfg.clip_norm),
      optax.adam(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps),
  )
