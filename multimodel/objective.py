"""The loss of one task's batch: shared by the train step and by evaluation.

loss = target modality's loss (mean over real target positions) + MoE balancing losses.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel.model import MultiModel, TaskSpec

Array = jax.Array


def moe_losses(aux: dict) -> Array:
  """Sum of the balancing losses of every MoE layer in a model's aux output."""
  return sum((layer["loss"] for layer in aux.values() if "loss" in layer),
             jnp.zeros((), jnp.float32))


def expert_loads(aux: dict) -> dict:
  """{layer name: load [E]} of every MoE layer that reports one."""
  return {name: layer["load"] for name, layer in aux.items() if "load" in layer}


def dropped_fractions(aux: dict) -> dict:
  """{layer name: share of (token, expert) assignments dropped for capacity}."""
  return {name: layer["dropped_fraction"] for name, layer in aux.items()
          if "dropped_fraction" in layer}


def loss_fn(model: MultiModel, task: TaskSpec, batch: dict, *, train: bool,
            rngs: nnx.Rngs | None = None) -> tuple[Array, dict]:
  """(scalar loss, metrics) of one task's batch.

  batch: `inputs`, `targets`, optional `input_mask` and `example_mask` (bool [B], False for the
  padding examples of a last eval batch). Metrics hold sums (`loss`, `nll`, `correct`, `weight`,
  and `correct_top5` for label targets), so that evaluation can add them over batches, plus
  `task_loss`, `moe_loss`, `expert_load` and `expert_dropped`.
  """
  logits, aux = model(task, batch["inputs"], batch["targets"], batch.get("input_mask"),
                      train=train, rngs=rngs)
  example_mask = batch.get("example_mask")
  weights = None if example_mask is None else example_mask.astype(jnp.float32)
  target = model.modalities[task.target_modality]
  sums = target.loss(logits, batch["targets"], weights, model.label_smoothing)
  task_loss = sums["loss"] / jnp.maximum(sums["weight"], 1.0)
  moe_loss = moe_losses(aux)
  metrics = dict(sums, task_loss=task_loss, moe_loss=moe_loss, expert_load=expert_loads(aux),
                 expert_dropped=dropped_fractions(aux))
  if logits.ndim == 2:  # Class labels: also count top-5 hits.
    k = min(5, logits.shape[-1])
    hit = (jax.lax.top_k(logits, k)[1] == batch["targets"][:, None]).any(-1)
    w = jnp.ones_like(sums["loss"]) if weights is None else weights
    metrics["correct_top5"] = (hit * w).sum()
  return task_loss + moe_loss, metrics
