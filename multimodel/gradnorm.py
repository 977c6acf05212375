"""GradNorm loss weighting of the all-tasks step (Chen et al., ICML 2018).

The all-tasks step minimises sum_i w_i L_i. GradNorm learns the weights w so that each task's
weighted gradient on a shared layer W, G_i = w_i ||grad_W L_i||, approaches the same norm, scaled
up for the tasks that train slowest: target_i = mean_j(G_j) * r_i ** alpha, with r_i the task's
loss ratio L_i(t) / L_i(0) over the mean of those ratios. alpha > 0 favours the lagging tasks more;
alpha = 0 only equalises the gradient norms.

W is the encoder's last conv block (`SHARED`): the last layer every task passes through. The decoder
comes later, but class-label targets skip it (they read the pooled encoder output), so a label
task's gradient there is zero and GradNorm could not weigh it.

The state (kept in the train state, hence in checkpoints) is:
  `weights`       float32 [T], w in the order of the sorted task names; starts at 1, sums to T;
  `initial_loss`  float32 [T], L_i(0): NaN until the first finite step, which sets it.
"""

import jax
import jax.numpy as jnp

MIN_WEIGHT = 1e-3  # Floor of a weight before renormalising: no task's loss is ever switched off.


def init(num_tasks: int) -> dict:
  """The state before the first step: every weight 1, no initial loss yet."""
  return {"weights": jnp.ones((num_tasks,), jnp.float32),
          "initial_loss": jnp.full((num_tasks,), jnp.nan, jnp.float32)}


def shared_mask(keys: list[str], encoder_blocks: int) -> list[bool]:
  """Which parameters (by "/"-joined path, in tree order) form W: the encoder's last conv block."""
  prefix = f"encoder/blocks/{encoder_blocks - 1}/"
  mask = [k.startswith(prefix) for k in keys]
  if not any(mask):
    raise ValueError(f"GradNorm: no parameter path starts with {prefix!r}, the shared layer W")
  return mask


def update_weights(weights: jax.Array, norms: jax.Array, losses: jax.Array,
                   initial_losses: jax.Array, *, alpha: float, lr: float) -> jax.Array:
  """One gradient step of GradNorm's loss sum_i |G_i - target_i| on the weights.

  The target counts as a constant (as in the paper), so d/dw_i = sign(G_i - target_i) * norms_i.

  Args:
    weights: w [T], the weights of this step's loss.
    norms: [T], ||grad_W L_i||, the norm of task i's unweighted gradient on W.
    losses: [T], L_i(t), this step's losses.
    initial_losses: [T], L_i(0).
    alpha: the asymmetry.
    lr: the learning rate of the weights.

  Returns:
    The new weights [T]: each clipped at `MIN_WEIGHT`, then scaled so that they sum to T.
  """
  grad_norms = weights * norms  # G_i
  ratios = losses / initial_losses
  target = jnp.mean(grad_norms) * (ratios / jnp.mean(ratios)) ** alpha
  new = jnp.maximum(weights - lr * jnp.sign(grad_norms - target) * norms, MIN_WEIGHT)
  return new * (weights.shape[0] / jnp.sum(new))
