"""The loss of one task's batch: shared by the train step and by evaluation.

loss = target modality's loss (mean over real target positions) + MoE balancing losses
       (+ `ctc_weight` x the CTC loss of the encoder output, for audio inputs with text targets).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from multimodel.ctc_prefix import compact
from multimodel.decode import EOS_ID
from multimodel.model import CTC_ALPHABET, MultiModel, TaskSpec, ctc_alphabet

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


def ctc_char_table(tokenizer, max_chars: int = 16, alphabet: str = CTC_ALPHABET) -> np.ndarray:
  """int32 [V, max_chars]: the `alphabet` labels of each piece's letters, lower-cased, 0-padded.

  What a piece holds outside the alphabet (digits, other scripts, its word-start mark unless the
  alphabet has the space) has no label; control and byte pieces have none at all.
  `ctc_char_labels` reads it.
  """
  index = {c: i + 1 for i, c in enumerate(alphabet)}
  table = np.zeros((tokenizer.vocab_size, max_chars), np.int32)
  for piece_id in range(tokenizer.vocab_size):
    if tokenizer.is_control_or_byte(piece_id):
      continue
    labels = [index[c] for c in tokenizer.piece(piece_id).lower() if c in index][:max_chars]
    table[piece_id, :len(labels)] = labels
  return table


def ctc_spellable(tokenizer, alphabet: str = CTC_ALPHABET) -> np.ndarray:
  """bool [V]: the pieces whose every character (lower-cased; the word-start mark aside) a CTC
  head over `alphabet` can write. Control and byte pieces are not."""
  allowed = set(alphabet) | {" "}
  return np.array([not tokenizer.is_control_or_byte(i)
                   and all(c in allowed for c in tokenizer.piece(i).lower())
                   for i in range(tokenizer.vocab_size)])


def run_ctc_char_table(model_cfg, tokenizer) -> np.ndarray | None:
  """The `ctc_char_table` a run's train step needs: None unless its CTC loss is over characters."""
  if tokenizer is None or model_cfg.ctc_weight <= 0 or model_cfg.ctc_units == "pieces":
    return None
  return ctc_char_table(tokenizer, alphabet=ctc_alphabet(model_cfg.ctc_units))


def ctc_space_label(units: str) -> int:
  """The label of the space in a CTC head over `units`; 0 (none) unless it writes spaces."""
  alphabet = ctc_alphabet(units) if units != "pieces" else ""
  return alphabet.index(" ") + 1 if " " in alphabet else 0


def ctc_char_labels(targets: Array, table: Array, space: int = 0) -> Array:
  """Piece ids [B, T] (0 = padding) -> their characters' labels [B, T * K], left-aligned, 0-padded.

  With `space` (the space's label, `ctc_space_label`), spaces only stand between words: none
  first or last, none twice in a row (a word-start piece with no letters, "\u2581" before "(",
  adds a space of its own).
  """
  labels = compact(jnp.asarray(table)[targets].reshape(targets.shape[0], -1))  # [B, T * K]
  if not space:
    return labels
  is_space = labels == space
  previous = jnp.pad(labels[:, :-1], ((0, 0), (1, 0)))  # 0 before the first.
  labels = compact(jnp.where(is_space & ((previous == space) | (previous == 0)), 0, labels))
  following = jnp.pad(labels[:, 1:], ((0, 0), (0, 1)))  # 0 after the last.
  return jnp.where((labels == space) & (following == 0), 0, labels)


def ctc_loss(ctc: dict, targets: Array, weights: Array | None = None,
             char_table: Array | None = None, space: int = 0) -> Array:
  """CTC loss per label of the encoder's own predictions (`aux["ctc"]` of the model).

  The labels are the targets without their end-of-sequence token (id 0, padding, is the blank),
  or with `char_table` (`ctc_char_table`) their characters. Joint CTC-attention training (Kim,
  Hori and Watanabe 2017): the CTC loss can only be lowered by reading the audio in order, which
  the attention decoder alone learns late, after it has learnt to predict the next token from
  the previous ones. A sequence with more labels (plus repeats, which need a blank between them)
  than frames has no alignment: it is left out (PyTorch's `zero_infinity`), since its loss would
  only be optax's stand-in for infinity.

  Args:
    ctc: {"logits": float [B, S, L], "mask": bool [B, S]}.
    targets: int [B, T], 0 = padding, ending in EOS.
    weights: float [B] or None (0 for the padding examples of a last eval batch).
    char_table: None (the labels are the pieces: L = V) or int [V, K] (`ctc_char_table`).
    space: with `char_table`, the space's label (`ctc_space_label`), or 0.
  """
  labels = jnp.where(targets == EOS_ID, 0, targets)
  if char_table is not None:
    labels = ctc_char_labels(labels, char_table, space)
  real = labels != 0
  per_seq = optax.ctc_loss(ctc["logits"], 1.0 - ctc["mask"].astype(jnp.float32), labels,
                           (~real).astype(jnp.float32), blank_id=0)  # [B]
  needed = real.sum(-1) + ((labels[:, 1:] == labels[:, :-1]) & real[:, 1:]).sum(-1)  # [B]
  keep = (needed <= ctc["mask"].sum(-1)).astype(jnp.float32)
  if weights is not None:
    keep = keep * weights
  count = real.sum(-1).astype(jnp.float32) * keep  # [B]
  return jnp.where(keep > 0, per_seq, 0.0).sum() / jnp.maximum(count.sum(), 1.0)


def loss_fn(model: MultiModel, task: TaskSpec, batch: dict, *, train: bool,
            rngs: nnx.Rngs | None = None,
            ctc_char_table: np.ndarray | None = None) -> tuple[Array, dict]:
  """(scalar loss, metrics) of one task's batch.

  batch: `inputs`, `targets`, optional `input_mask` and `example_mask` (bool [B], False for the
  padding examples of a last eval batch). Metrics hold sums (`loss`, `nll`, `correct`, `weight`,
  and `correct_top5` for label targets), so that evaluation can add them over batches, plus
  `task_loss`, `moe_loss`, `expert_load` and `expert_dropped`, and `ctc_loss` where the model
  scores one. A model whose CTC loss is over characters (`model.ctc_units`: "chars",
  "chars_and_spaces") scores it only when given the run's `ctc_char_table` (the train step is;
  evaluation does not need it).
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
  if "ctc" in aux and (model.ctc_units == "pieces" or ctc_char_table is not None):
    table = ctc_char_table if model.ctc_units != "pieces" else None
    metrics["ctc_loss"] = ctc_loss(aux["ctc"], batch["targets"], weights, table,
                                   ctc_space_label(model.ctc_units))
    extra = extra + model.ctc_weight * metrics["ctc_loss"]
  if logits.ndim == 2:  # Class labels: also count top-5 hits.
    k = min(5, logits.shape[-1])
    hit = (jax.lax.top_k(logits, k)[1] == batch["targets"][:, None]).any(-1)
    w = jnp.ones_like(sums["loss"]) if weights is None else weights
    metrics["correct_top5"] = (hit * w).sum()
  return task_loss + extra, metrics
