"""Per-task evaluation of a jointly trained model: one task at a time.

Teacher-forced metrics for every task (the paper's measures): per-token log-perplexity and
accuracy; top-1/top-5 for classification. Sequence tasks are also decoded (greedy or beam) and
scored with the task's own metrics (BLEU, chrF, WER, CER, exact match, bracket F1).

`input_gain` says how much the model reads its inputs: the log-perplexity of the targets given
another example's input (the batch's inputs rolled by one; examples of a batch have inputs of
similar length) minus that given their own, in nats per target token. A model that predicts its
targets without looking at the input scores 0.
"""

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import pipeline, preprocess, sources
from data.buckets import InputConfig
from data.tasks import Task
from data.tokenizer import Tokenizer
from multimodel import objective
from multimodel.model import TaskSpec, ctc_alphabet


def task_spec(task: Task) -> TaskSpec:
  return TaskSpec(task.input_modality, task.target_modality, task.command_id, task.num_classes,
                  task.label_offset)


def bracket_deltas(task: Task, tokenizer: Tokenizer | None) -> np.ndarray | None:
  """The decoder's bracket table of a task whose outputs are trees, else None."""
  return tokenizer.bracket_deltas() if task.balanced_brackets and tokenizer else None


def word_starts(task: Task, tokenizer: Tokenizer | None) -> np.ndarray | None:
  """The decoder's word-start table of a task whose trees' leaves are its input, else None."""
  return tokenizer.word_starts() if task.leaves_are_input and tokenizer else None


def resolve_no_repeat_ngram(task: Task, no_repeat_ngram: int | None) -> int:
  """The n-gram size a task is decoded with: `no_repeat_ngram` when given, else the task's own;
  0 for trees (`balanced_brackets`), whose brackets repeat by right."""
  if task.balanced_brackets:
    return 0
  return task.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram


def resolve_decode(task: Task, decode: str | None, beam_size: int | None) -> tuple[str, int]:
  """How a task's sequences are decoded: (`decode`, `beam_size`) where given, else the task's
  own ("beam" of `Task.beam_size` beams, or "greedy" when it keeps 1)."""
  own = task.beam_size
  if decode is None:
    decode = "beam" if own > 1 else "greedy"
  if beam_size is None:
    beam_size = own if own > 1 else 4
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  return decode, beam_size


def joint_ctc(model, task: Task, tokenizer: Tokenizer | None, ctc_weight: float):
  """The `decode.JointCTC` of an audio task with text targets decoded jointly with the model's
  CTC head over letters (`ctc_weight` > 0), else None.

  Raises:
    ValueError: `ctc_weight` > 0 for such a task and a model without a CTC head over letters.
  """
  if not ctc_weight or not (task.input_modality == "audio" and task.target_modality == "text"):
    return None
  units = getattr(model, "ctc_units", "pieces")
  if getattr(model, "ctc_head", None) is None or units == "pieces":
    raise ValueError(f"joint CTC decoding (CTC weight {ctc_weight}) needs a CTC head over "
                     f"letters; this model has model.ctc_units={units!r} and "
                     f"{'a' if getattr(model, 'ctc_head', None) is not None else 'no'} "
                     f"letter head (model.ctc_weight > 0 and ctc_units 'chars' or "
                     f"'chars_and_spaces' make one)")
  from multimodel import decode as decode_lib  # pylint: disable=import-outside-toplevel
  alphabet = ctc_alphabet(units)
  return decode_lib.JointCTC(
      ctc_weight, jnp.asarray(objective.ctc_char_table(tokenizer, alphabet=alphabet)),
      objective.ctc_space_label(units),
      spellable=jnp.asarray(objective.ctc_spellable(tokenizer, alphabet)))


def _model_keys(batch: dict) -> dict:
  return {k: v for k, v in batch.items() if k != "example_index"}


def evaluate_task(graphdef, params, task: Task, tokenizer: Tokenizer | None,
                  input_config: InputConfig, *, split: str = "test", max_examples: int = 0,
                  decode: str | None = None, beam_size: int | None = None,
                  no_repeat_ngram: int | None = None, ctc_weight: float = 0.0) -> dict:
  """Metrics of one task on `split` (its first `max_examples`, 0 = all) and its outputs.

  Sequence targets are decoded with `decode` ("greedy", "beam" of `beam_size`, or "none"; None:
  the task's own, `Task.beam_size`: `resolve_decode`), never
  repeating an n-gram of size `no_repeat_ngram` (None: the task's own `Task.no_repeat_ngram`; 0: no
  such rule; `decode.ban_repeated_ngrams`; never for trees, whose brackets repeat by right);
  a task with `balanced_brackets` only into well-formed trees (`decode.keep_brackets_balanced`),
  over exactly its input's words with `leaves_are_input` (`decode.keep_input_leaves`).

  With `ctc_weight` > 0, an audio task with text targets is decoded jointly with the model's CTC
  head over letters (`decode.JointCTC`: beams ranked by (1 - w) log P_decoder + w log P_CTC of the
  prefix's letters; "greedy" is a joint search of one beam); other tasks are not affected.

  A model whose CTC head writes spaces (`model.ctc_units="chars_and_spaces"`) also has the head's
  best path scored on audio tasks as `ctc_wer` and `ctc_cer` (and kept as "ctc_prediction").

  `results["decoded"]` lists {"index", "prediction", "reference"} per example: detokenised text
  for sequence targets (when decoding), class indices for label targets; `results["decode"]`,
  `results["beam_size"]`, `results["no_repeat_ngram"]` and `results["ctc_weight"]` say how
  sequences were decoded ("none" and 0 when they were not; a beam size of 1 for greedy).
  """
  spec = task_spec(task)
  no_repeat_ngram = resolve_no_repeat_ngram(task, no_repeat_ngram)
  decode, beam_size = resolve_decode(task, decode, beam_size)
  model = nnx.merge(graphdef, params)
  units = getattr(model, "ctc_units", "pieces")
  reads_speech = (task.input_modality == "audio" and task.target_modality == "text"
                  and decode != "none")
  ctc_writes_text = (" " in ctc_alphabet(units) if units != "pieces" else False) and reads_speech
  ctc = joint_ctc(model, task, tokenizer, ctc_weight) if reads_speech else None
  del model

  @jax.jit
  def sums(params, batch):
    model = nnx.merge(graphdef, params)
    _, metrics = objective.loss_fn(model, spec, batch, train=False)
    keys = ("nll", "correct", "weight", "correct_top5")
    out = {k: metrics[k] for k in keys if k in metrics}
    rolled = {k: jnp.roll(batch[k], 1, axis=0) for k in ("inputs", "input_mask") if k in batch}
    _, other = objective.loss_fn(model, spec, dict(batch, **rolled), train=False)
    out["nll_other_input"] = other["nll"]
    if task.target_modality == "label":  # The predicted classes are the classifier's outputs.
      logits, _ = model(spec, batch["inputs"], batch["targets"], batch.get("input_mask"))
      out["predictions"] = jnp.argmax(logits, axis=-1)  # [B]
    if ctc_writes_text:  # The CTC head's best label per frame.
      enc, enc_mask, _ = model.encode(spec, batch["inputs"], batch.get("input_mask"))
      out["ctc_labels"] = jnp.argmax(model.ctc_head(enc), axis=-1)  # [B, S']
      out["ctc_mask"] = jnp.ones(enc.shape[:2], bool) if enc_mask is None else enc_mask
    return out

  totals, decoded, start = {}, [], time.time()
  decoder = None
  if decode != "none" and task.target_modality == "text":
    from multimodel import decode as decode_lib  # Decoding is only needed for sequence targets.
    decoder = decode_lib.make_decoder(graphdef, spec, method=decode, beam_size=beam_size,
                                      max_length=task.max_target_length,
                                      no_repeat_ngram=no_repeat_ngram,
                                      bracket_deltas=bracket_deltas(task, tokenizer),
                                      word_starts=word_starts(task, tokenizer),
                                      max_open_run=task.max_open_run, ctc=ctc)
  source = sources.open_split(task, split) if decoder is not None else None
  for batch in pipeline.eval_batches(task, tokenizer, input_config, split=split,
                                     max_examples=max_examples or None):
    out = jax.device_get(sums(params, _model_keys(batch)))
    predictions = out.pop("predictions", None)
    ctc_labels, ctc_mask = out.pop("ctc_labels", None), out.pop("ctc_mask", None)
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    if predictions is not None:
      decoded += [{"index": int(index), "prediction": int(predictions[row]),
                   "reference": int(batch["targets"][row])}
                  for row, index in enumerate(batch["example_index"]) if index >= 0]
    if decoder is not None:
      tokens = np.asarray(decoder(params, batch["inputs"], batch.get("input_mask")))
      for row, index in enumerate(batch["example_index"]):
        if index >= 0:
          reference = preprocess.as_text(task.preprocess(source[int(index)])["targets"])
          decoded.append({"index": int(index), "prediction": tokenizer.decode(tokens[row]),
                          "reference": reference})
          if ctc_labels is not None:
            decoded[-1]["ctc_prediction"] = decode_lib.ctc_best_path(
                ctc_labels[row], ctc_mask[row], ctc_alphabet(units))
  weight = max(totals.get("weight", 0.0), 1.0)
  results = {"log_perplexity": totals.get("nll", math.nan) / weight,
             "token_accuracy": totals.get("correct", math.nan) / weight,
             "examples": int(totals.get("weight", 0)) if task.target_modality == "label" else None}
  results["input_gain"] = (totals.get("nll_other_input", math.nan) / weight
                           - results["log_perplexity"])
  if task.target_modality == "label":
    results["accuracy"] = results["token_accuracy"]
    results["top5"] = totals.get("correct_top5", math.nan) / weight
  if decoded:
    from multimodel import metrics as metrics_lib
    decoded.sort(key=lambda d: d["index"])
    hyps, refs = [d["prediction"] for d in decoded], [d["reference"] for d in decoded]
    for name in task.metrics:
      if name in metrics_lib.SEQUENCE_METRICS:
        results[name] = metrics_lib.SEQUENCE_METRICS[name](hyps, refs)
        if ctc_writes_text and name in ("wer", "cer"):  # The CTC head's transcripts, scored alike.
          results[f"ctc_{name}"] = metrics_lib.SEQUENCE_METRICS[name](
              [d["ctc_prediction"] for d in decoded], refs)
    results["examples"] = len(decoded)
  results["decode"] = decode if decoder is not None else "none"
  results["beam_size"] = beam_size if decoder is not None and decode == "beam" else 1
  results["no_repeat_ngram"] = no_repeat_ngram if decoder is not None else 0
  results["ctc_weight"] = ctc.weight if ctc is not None else 0.0
  results["seconds"] = time.time() - start
  results["decoded"] = decoded
  return results


def evaluate_tasks(graphdef, params, task_list, tokenizer, input_config, *, split="test",
                   max_examples=0, decode=None, beam_size=None, no_repeat_ngram=None,
                   ctc_weight=0.0, workdir=None) -> dict:
  """{task name: metrics}; with a workdir, also `WORKDIR/eval/TASK-SPLIT.json` for each task.
  The arguments are `evaluate_task`'s (None: each task's own decoding)."""
  results = {}
  for task in task_list:
    results[task.name] = evaluate_task(graphdef, params, task, tokenizer, input_config,
                                       split=split, max_examples=max_examples, decode=decode,
                                       beam_size=beam_size, no_repeat_ngram=no_repeat_ngram,
                                       ctc_weight=ctc_weight)
    if workdir is not None:
      out = pathlib.Path(workdir) / "eval" / f"{task.name}-{split}.json"
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_text(json.dumps({"task": task.name, "split": split, **results[task.name]},
                                indent=1) + "\n")
  return results


HEADLINE = ("accuracy", "top5", "bleu", "chrf", "wer", "cer", "ctc_wer", "ctc_cer", "exact_match",
            "bracket_f1", "token_accuracy", "log_perplexity", "input_gain")


def format_table(results: dict) -> str:
  """One table: task, metric, value (the task's own metrics first, then the paper's)."""
  rows = [("task", "metric", "value")]
  for task, metrics in results.items():
    for name in HEADLINE:
      value = metrics.get(name)
      if isinstance(value, float) and not math.isnan(value):
        rows.append((task, name, f"{value:.4f}"))
  widths = [max(len(r[i]) for r in rows) for i in range(3)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
