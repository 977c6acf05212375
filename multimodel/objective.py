"""The loss of one task's batch: shared by the train step and by evaluation.

loss = target modality's loss (mean over real target positions) + MoE balancing losses
       (+ `ctc_weight` x the CTC loss of the encoder output, for audio inputs with text targets).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from multimodel.decode import EOS_ID
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


def ctc_loss(ctc: dict, targets: Array, weights: Array | None = None) -> Array:
  """CTC loss per target token of the encoder's own predictions (`aux["ctc"]` of the model).

  The targets without their end-of-sequence token are the label sequences; id 0 (padding) is the
  blank. Joint CTC-attention training (Kim, Hori and Watanabe 2017): the CTC loss can only be
  lowered by reading the audio in order, which the attention decoder alone learns late, after it
  has learnt to predict the next token from the previous ones.

  Args:
    ctc: {"logits": float [B, S, V], "mask": bool [B, S]}.
    targets: int [B, T], 0 = padding, ending in EOS.
    weights: float [B] or None (0 for the padding examples of a last eval batch).
  """
  labels = jnp.where(targets == EOS_ID, 0, targets)
  per_seq = optax.ctc_loss(ctc["logits"], 1.0 - ctc["mask"].astype(jnp.float32), labels,
                           (labels == 0).astype(jnp.float32), blank_id=0)  # [B]
  tokens = (labels != 0).sum(-1).astype(jnp.float32)  # [B]
  if weights is not None:
    per_seq, tokens = per_seq * weights, tokens * weights
  return per_seq.sum() / jnp.maximum(tokens.sum(), 1.0)


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
  extra = moe_loss
  if "ctc" in aux:
    metrics["ctc_loss"] = ctc_loss(aux["ctc"], batch["targets"], weights)
    extra = extra + model.ctc_weight * metrics["ctc_loss"]
  if logits.ndim == 2:  # Class labels: also count top-5 hits.
    k = min(5, logits.shape[-1])
    hit = (jax.lax.top_k(logits, k)[1] == batch["targets"][:, None]).any(-1)
    w = jnp.ones_like(sums["loss"]) if weights is None else weights
    metrics["correct_top5"] = (hit * w).sum()
  return task_loss + extra, metrics
