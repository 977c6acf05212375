"""The optimizer: Adam with the paper's settings, inverse-sqrt ("noam") schedule, global-norm clip.

The schedule may end in a linear cool-down (`train.cooldown_steps`): over the run's last N steps
the noam rate is multiplied by a factor that falls linearly to zero after the last step, the
"warmup-stable-decay" shape of Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training
Beyond Fixed Training Durations"), which in their language-model runs closes most of the gap
between an inverse-sqrt schedule and one annealed to the run's length. In our main job it helps
the image classifiers and costs translation (docs/results.md, "Annealing the end of the run").

Fine-tuning adds two things (docs/transfer.md): frozen parameters (`train.freeze`, chosen by
`freeze_mask`), which `make` leaves out of the optimizer, and the L2-SP penalty (`l2sp_penalty`),
which the train step adds to the loss.
"""

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def noam_schedule(learning_rate: float, d_model: int, warmup_steps: int, total_steps: int = 0,
                  cooldown_steps: int = 0) -> optax.Schedule:
  """lr(step) = learning_rate * D^-0.5 * min(step * warmup^-1.5, step^-0.5), step counted from 1.

  With `cooldown_steps` = N > 0, times min(1, (total_steps - step) / N) with step counted from 0:
  1 up to step total_steps - N, then falling linearly to 1 / N at the last step, total_steps - 1.
  """

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    rate = learning_rate * d_model ** -0.5 * jnp.minimum((step + 1.0) * warmup_steps ** -1.5,
                                                         (step + 1.0) ** -0.5)
    if cooldown_steps > 0:
      rate = rate * jnp.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
    return rate

  return schedule


def noam_rate(learning_rate: float, d_model: int, warmup_steps: int, step: int,
              total_steps: int = 0, cooldown_steps: int = 0) -> float:
  """`noam_schedule(...)(step)` in plain Python, for logging: no device work, nothing compiled."""
  rate = learning_rate * d_model ** -0.5 * min((step + 1.0) * warmup_steps ** -1.5,
                                               (step + 1.0) ** -0.5)
  if cooldown_steps > 0:
    rate *= min(max((total_steps - step) / cooldown_steps, 0.0), 1.0)
  return rate


LR_SCHEDULES = ("global", "task")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one multiplication by a scalar factor: g * min(1, max / |g|).

  The same clip (equal up to rounding: optax divides by the norm, then multiplies by `max_norm`),
  with the same empty state, so checkpoints of either restore into the other. optax selects
  between g and its clipped copy per element; XLA's CPU backend writes that copy out in full and
  every Adam loop then reads it back, where a scalar factor fuses into those loops: the `paper`
  config's update takes 99-138 ms instead of 294-308 (docs/performance.md, "Page faults and the
  optimizer's update").
  """

  def update_fn(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))  # 1 for a zero gradient.
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def schedule_args(train_cfg) -> tuple:
  """(learning_rate, warmup, total steps, cool-down steps) of the run's noam schedule, checked.

  Raises:
    ValueError: `train.cooldown_steps` negative, longer than the run, or with a per-task schedule
      (the cool-down counts the run's steps, which a per-task schedule does not).
  """
  steps, cooldown = int(train_cfg.steps), int(train_cfg.cooldown_steps)
  if not 0 <= cooldown <= steps:
    raise ValueError(f"train.cooldown_steps must be between 0 (off) and train.steps={steps}, got "
                     f"{cooldown}")
  if cooldown and train_cfg.lr_schedule != "global":
    raise ValueError(f"train.cooldown_steps={cooldown} counts the run's steps: it needs "
                     f"train.lr_schedule='global', got {train_cfg.lr_schedule!r}")
  return train_cfg.learning_rate, train_cfg.warmup_steps, steps, cooldown


def schedule(train_cfg, d_model: int) -> optax.Schedule:
  """The run's noam schedule (`train.learning_rate`, `warmup_steps`, `steps`, `cooldown_steps`)."""
  learning_rate, warmup, steps, cooldown = schedule_args(train_cfg)
  return noam_schedule(learning_rate, d_model, warmup, steps, cooldown)


def rate(train_cfg, d_model: int, step: int) -> float:
  """`schedule(train_cfg, d_model)(step)` in plain Python, for logging."""
  learning_rate, warmup, steps, cooldown = schedule_args(train_cfg)
  return noam_rate(learning_rate, d_model, warmup, step, steps, cooldown)


def per_task_schedule(train_cfg) -> bool:
  """True when the schedule counts each task's own steps (`train.lr_schedule="task"`)."""
  if train_cfg.lr_schedule not in LR_SCHEDULES:
    raise ValueError(f"train.lr_schedule={train_cfg.lr_schedule!r}; valid values: {LR_SCHEDULES}")
  return train_cfg.lr_schedule == "task"


def make(train_cfg, d_model: int, frozen: Any = None) -> optax.GradientTransformation:
  """Clip by global norm, then Adam(b1, b2, eps) scaled by the noam schedule.

  With `train.lr_schedule="task"` the transformation stops at Adam's direction: the train step
  scales it by minus the schedule at the count of the step's task (`apply_learning_rate`), the
  same product optax's `scale_by_learning_rate` takes at its own count.

  Args:
    train_cfg: the `train` section of a config.
    d_model: D, the scale of the noam schedule.
    frozen: None, or a tree of bools shaped like the parameters: True leaves get zero updates
      and no Adam moments (the clip's global norm is over the trainable gradients only).
  """
  adam = dict(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2, eps=train_cfg.adam_eps)
  tx = optax.chain(
      clip_by_global_norm(train_cfg.clip_norm),
      optax.scale_by_adam(**adam) if per_task_schedule(train_cfg)
      else optax.adam(schedule(train_cfg, d_model), **adam),
  )
  if frozen is None or not any(jax.tree.leaves(frozen)):
    return tx
  labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def apply_learning_rate(directions: Any, rate: jax.Array) -> Any:
  """Adam's directions -> updates: times -rate, as optax's `scale_by_learning_rate` does."""
  return jax.tree.map(lambda d: jnp.array(-rate, dtype=d.dtype) * d, directions)


def _examples_of_paths(keys: Sequence[str]) -> str:
  """A short listing of parameter paths: the first of each group (modality nets one by one)."""
  firsts = {}
  for key in keys:
    parts = key.split("/")
    firsts.setdefault("/".join(parts[:2] if parts[0] == "modalities" else parts[:1]), key)
  return f"valid paths include {', '.join(firsts.values())} ({len(keys)} paths in all)"


def freeze_mask(keys: Sequence[str], spec: str) -> list[bool]:
  """Which parameters `train.freeze` freezes, in the order of `keys`.

  Args:
    keys: the "/"-joined parameter paths (`checkpoint.param_keys`).
    spec: comma-separated regular expressions, each matched in full against a path
      ("encoder/.*" freezes every encoder parameter; "encoder" alone matches none).

  Raises:
    ValueError: a pattern that is not a regular expression, one that matches no parameter (the
      message lists valid paths), or patterns that freeze every parameter.
  """
  patterns = []
  for text in filter(None, (p.strip() for p in spec.split(","))):
    try:
      patterns.append(re.compile(text))
    except re.error as e:
      raise ValueError(f"train.freeze: {text!r} is not a valid regular expression: {e}") from None
  if not patterns:
    return [False] * len(keys)
  unmatched = [p.pattern for p in patterns if not any(p.fullmatch(k) for k in keys)]
  if unmatched:
    raise ValueError(f"train.freeze: pattern(s) {unmatched} match no parameter path (a pattern "
                     f"must match a whole path, e.g. 'encoder/.*'); {_examples_of_paths(keys)}")
  mask = [any(p.fullmatch(k) for p in patterns) for k in keys]
  if all(mask):
    raise ValueError(f"train.freeze={spec!r} freezes every parameter: nothing would train")
  return mask


def l2sp_penalty(params: Any, anchor: Any, weight: Any, alpha: float) -> jax.Array:
  """alpha / 2 * sum_i weight_i * ||w_i - w0_i||^2 (L2-SP, Li et al. 2018), a float32 scalar.

  Args:
    params: the parameters w (a tree).
    anchor: the starting point w0, a tree like `params`.
    weight: a tree like `params` of scalars: 1 for the anchored leaves, 0 for the others.
    alpha: the coefficient.
  """
  terms = jax.tree.map(
      lambda w, w0, c: c * jnp.sum(jnp.square(w.astype(jnp.float32) - w0.astype(jnp.float32))),
      params, anchor, weight)
  return 0.5 * alpha * sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))
