"""Exports a trained run for inference: `python -m multimodel.export` / `multimodel-export`.

    python -m multimodel.export --workdir runs/default --out exports/default \
        [--tasks image_mnist5k,translate_en_fr] [--step S] [--batch_size 1] \
        [--max_decode_length L] [--ctc_weight W] [--platforms cpu,cuda]

A task's program decodes as the run's final evaluation does (`run_decoding`): with the beams and
n-gram rule of the run's `train.eval_decode`, `eval_beam_size` and `eval_no_repeat_ngram`, where
unset the task's own (`Task.beam_size`, `Task.no_repeat_ngram`), trees by their rules, and an
audio task jointly with the CTC head at the run's `train.eval_ctc_weight` (`--ctc_weight` sets
another).

The folder holds what `multimodel.predict` needs, and nothing that executes stored code:
  params.npz        parameters only (no optimizer state): the body and the modality nets the
                    exported tasks use, float32, keyed by "/"-joined path ("encoder/blocks/0/...");
                    loads with `np.load(path, allow_pickle=False)`.
  config.json       the run's config.
  tokenizer.model   the SentencePiece model proto (runs with text tasks).
  tasks.json        per task: modalities, command, classes, preprocessing settings (image size,
                    audio features), length caps, how it decodes (`max_decode_length`,
                    `no_repeat_ngram`, `beam_size`, and `ctc_weight` for speech decoded jointly
                    with the CTC head), metrics, and the program's input shapes.
  TASK.jaxexport    per task, a serialized `jax.export` program of the prediction function
                    `(params, inputs[, input_mask]) -> predictions` (see `prediction_fn`).
  export.json       where it came from: workdir, step, batch size, platforms, jax version.

Programs have a fixed batch size B (`--batch_size`; `predict` pads the last batch) and fixed input
lengths (a task's `max_input_length` tokens or frames; shorter inputs are padded): the mixture of
experts sizes its buffers from the number of tokens, which must be static. Shapes: B batch,
S source length, T decoded length, H, W image size, M mel bins, K top classes.
"""

import argparse
import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import modalities
from data import tasks as tasks_lib
from data.tokenizer import Tokenizer
from multimodel import checkpoint, decode, evaluate, evaluation
from multimodel.model import MultiModel

FORMAT_VERSION = 1
TOP_K = 5


def needed_modalities(task_list) -> tuple[str, ...]:
  """The modality nets the tasks use, in `modalities.NAMES` order."""
  used = {m for t in task_list for m in (t.input_modality, t.target_modality)}
  return tuple(n for n in modalities.NAMES if n in used)


def input_specs(task, config, batch_size: int) -> dict:
  """{"inputs": (shape, dtype)[, "input_mask": (shape, dtype)]} of the task's program."""
  b = batch_size
  if task.input_modality == "image":
    return {"inputs": ((b, task.image_size, task.image_size, 3), "float32")}  # [B, H, W, 3]
  if task.input_modality == "text":
    return {"inputs": ((b, task.max_input_length), "int32")}  # [B, S]
  if task.input_modality == "audio":
    s, m = task.max_input_length, config.model.audio.num_mel_bins
    return {"inputs": ((b, s, m), "float32"), "input_mask": ((b, s), "bool")}  # [B, S, M], [B, S]
  return {"inputs": ((b,), "int32")}  # label input: [B]


def prediction_fn(graphdef, abstract_params, task, *, max_decode_length: int,
                  bracket_deltas: np.ndarray | None = None,
                  word_starts: np.ndarray | None = None, max_open_run: int = 0,
                  no_repeat_ngram: int = 0, beam_size: int = 1,
                  ctc: decode.JointCTC | None = None):
  """The pure function a task's program holds.

  `fn(params, inputs, input_mask=None)`, params {"/"-joined path: array} (those of
  `abstract_params`), inputs and input_mask as `input_specs` says. Returns for a label target
  {"classes": int32 [B, K], "probabilities": float32 [B, K]}, the K = min(5, num_classes) most
  likely classes, best first; for a text target {"tokens": int32 [B, T]}, decoded on the
  incremental cache (EOS = 1 ends a sequence, 0 pads after it), greedily or, with `beam_size` > 1,
  the best of that many beams (`decode.beam_search`), jointly with the CTC head when `ctc` is
  given (`decode.JointCTC`), into well-formed trees only
  when `bracket_deltas` is given (`decode.keep_brackets_balanced`), over exactly the input's
  pieces as leaves when `word_starts` is too, at most `max_open_run` brackets opened in a row
  (`decode.keep_input_leaves`), never repeating an n-gram of `no_repeat_ngram` tokens (0: off;
  `decode.ban_repeated_ngrams`).
  """
  spec = evaluation.task_spec(task)

  def fn(params, inputs, input_mask=None):
    model = nnx.merge(graphdef, checkpoint.params_from_flat(abstract_params, params))
    if task.target_modality == "label":
      targets = jnp.zeros(inputs.shape[:1], jnp.int32)  # Unused by a label target.
      logits, _ = model(spec, inputs, targets, input_mask)  # [B, num_classes]
      probabilities, classes = jax.lax.top_k(jax.nn.softmax(logits), min(TOP_K, task.num_classes))
      return {"classes": classes.astype(jnp.int32), "probabilities": probabilities}  # [B, K]
    tokens = decode.decode_with(model, spec, inputs, input_mask, max_length=max_decode_length,
                                method="beam" if beam_size > 1 else "greedy",
                                beam_size=beam_size, bracket_deltas=bracket_deltas,
                                word_starts=word_starts, max_open_run=max_open_run,
                                no_repeat_ngram=no_repeat_ngram, ctc=ctc)
    return {"tokens": tokens}  # [B, T]

  return fn


def class_names(task) -> list[str] | None:
  """The names of a label target's classes, from the TFDS features of its source, when it has
  them (None otherwise, e.g. for data that is not available here)."""
  from data import sources  # pylint: disable=import-outside-toplevel  # Imports TF.
  if task.target_modality != "label" or not isinstance(task.preprocess, tasks_lib.Fields):
    return None
  try:
    feature = sources.builder(task).info.features[task.preprocess.targets]
    names = [str(n) for n in feature.names]
  except Exception:  # pylint: disable=broad-except  # Names are a convenience, never required.
    return None
  return names if len(names) == task.num_classes else None


def run_decoding(task, train_config) -> dict:
  """{"beam_size", "no_repeat_ngram"} of a task's program: as the run's final evaluation decodes
  it (`train.eval_decode`, `eval_beam_size`, `eval_no_repeat_ngram`; unset: the task's own; a
  run whose evaluation decoded nothing ("none") gets the task's own)."""
  method = None if train_config.eval_decode == "none" else train_config.eval_decode
  method, beams = evaluation.resolve_decode(task, method, train_config.eval_beam_size)
  return {"beam_size": beams if method == "beam" else 1,
          "no_repeat_ngram": evaluation.resolve_no_repeat_ngram(
              task, train_config.eval_no_repeat_ngram)}


def task_info(task, config, *, batch_size: int, max_decode_length: int,
              platforms: list[str], ctc_weight: float = 0.0, beam_size: int = 1,
              no_repeat_ngram: int = 0) -> dict:
  """The JSON entry of a task in tasks.json."""
  audio = config.model.audio
  specs = input_specs(task, config, batch_size)
  return {
      "input_modality": task.input_modality,
      "target_modality": task.target_modality,
      "command": task.command,
      "command_id": task.command_id,
      "num_classes": task.num_classes,
      "class_names": class_names(task),
      "image_size": task.image_size,
      "sample_rate": task.sample_rate,
      "audio_features": {"sample_rate": audio.sample_rate, "frame_length": audio.frame_length,
                         "frame_step": audio.frame_step, "num_mel_bins": audio.num_mel_bins},
      "max_input_length": task.max_input_length,
      "max_target_length": task.max_target_length,
      "max_decode_length": max_decode_length if task.target_modality == "text" else None,
      "no_repeat_ngram": no_repeat_ngram if task.target_modality == "text" else None,
      "beam_size": beam_size if task.target_modality == "text" else None,
      "ctc_weight": ctc_weight if task.target_modality == "text" else None,
      "metrics": list(task.metrics),
      "batch_size": batch_size,
      "inputs": {k: {"shape": list(shape), "dtype": dtype} for k, (shape, dtype) in specs.items()},
      "outputs": (["classes", "probabilities"] if task.target_modality == "label"
                  else ["tokens"]),
      "program": f"{task.name}.jaxexport",
      "platforms": platforms,
  }


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
           task_names: list[str] | None = None, step: int | None = None, batch_size: int = 1,
           max_decode_length: int | None = None, ctc_weight: float | None = None,
           platforms: list[str] | None = None) -> pathlib.Path:
  """Writes the export folder `out` (see the module docstring) and returns its path.

  Args:
    workdir: the trained run.
    out: the folder to write (created; an earlier export there is replaced).
    task_names: tasks to export (default: every task of the run); only the modality nets they
      use are kept.
    step: checkpoint step (default: the latest).
    batch_size: B of every program.
    max_decode_length: T of the text targets (default: each task's `max_target_length`).
    ctc_weight: the CTC head's weight in the joint decoding of audio tasks with text targets, in
      [0, 1] (0: the decoder alone; default: the run's `train.eval_ctc_weight`).
    platforms: lowering platforms ("cpu", "cuda", "rocm", "tpu"; default: this machine's).
  Raises:
    checkpoint.WorkdirError: no such run or step. KeyError: a task the run was not trained on.
  """
  if batch_size < 1 or (max_decode_length is not None and max_decode_length < 1):
    raise ValueError("batch_size and max_decode_length must be >= 1")
  if ctc_weight is not None and not 0.0 <= ctc_weight <= 1.0:
    raise ValueError(f"ctc_weight must be in [0, 1], got {ctc_weight}")
  run = checkpoint.load_run(workdir, step)
  task_list = [evaluate.run_task(run, n) for n in (task_names or run.task_names)]
  platforms = list(platforms or [jax.default_backend()])
  names = needed_modalities(task_list)
  abstract = nnx.eval_shape(
      lambda: MultiModel(run.config.model, modality_names=names, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  keys = checkpoint.param_keys(abstract_params)
  params = {k: np.asarray(run.params[k]) for k in keys if k in run.params}
  checkpoint.params_from_flat(abstract_params, params)  # Every parameter there, right shapes.
  params_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}

  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes) if run.tokenizer_bytes else None
  if ctc_weight is None:
    ctc_weight = run.config.train.eval_ctc_weight
  # Every task's decoding (and its refusals) before anything in `out` changes.
  decodings = {t.name: run_decoding(t, run.config.train) for t in task_list}
  ctcs = {t.name: evaluation.joint_ctc(abstract, t, tokenizer, ctc_weight) for t in task_list}

  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  for stale in out.glob("*.jaxexport"):  # Programs of an earlier export to the same folder.
    stale.unlink()
  tasks_json = {}
  for task in task_list:
    length = max_decode_length or task.max_target_length
    ctc = ctcs[task.name]
    fn = prediction_fn(graphdef, abstract_params, task, max_decode_length=length,
                       bracket_deltas=evaluation.bracket_deltas(task, tokenizer),
                       word_starts=evaluation.word_starts(task, tokenizer),
                       max_open_run=task.max_open_run, ctc=ctc, **decodings[task.name])
    specs = [jax.ShapeDtypeStruct(shape, dtype)
             for shape, dtype in input_specs(task, run.config, batch_size).values()]
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(params_spec, *specs)
    (out / f"{task.name}.jaxexport").write_bytes(exported.serialize())
    tasks_json[task.name] = task_info(task, run.config, batch_size=batch_size,
                                      max_decode_length=length, platforms=platforms,
                                      ctc_weight=ctc.weight if ctc is not None else 0.0,
                                      **decodings[task.name])

  with open(out / "params.npz", "wb") as f:
    np.savez(f, **params)
  (out / "config.json").write_text(run.config.to_json(indent=2) + "\n")
  if run.tokenizer_bytes is not None:
    (out / "tokenizer.model").write_bytes(run.tokenizer_bytes)
  elif (out / "tokenizer.model").exists():
    (out / "tokenizer.model").unlink()
  (out / "tasks.json").write_text(json.dumps(tasks_json, indent=1) + "\n")
  (out / "export.json").write_text(json.dumps({
      "format_version": FORMAT_VERSION, "workdir": str(run.workdir), "step": run.step,
      "tasks": [t.name for t in task_list], "modalities": list(names),
      "batch_size": batch_size, "platforms": platforms, "jax_version": jax.__version__,
      "num_parameters": int(sum(v.size for v in params.values())),
  }, indent=1) + "\n")
  return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="multimodel-export",
      description="Writes a trained run's parameters and per-task jax.export programs.")
  parser.add_argument("--workdir", required=True, help="The run's folder (as given to train.py).")
  parser.add_argument("--out", required=True, help="The export folder to write.")
  parser.add_argument("--tasks", default="",
                      help="Comma-separated tasks to export (default: every task of the run).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  parser.add_argument("--batch_size", type=int, default=1, help="Batch size of the programs.")
  parser.add_argument("--max_decode_length", type=int, default=None,
                      help="Longest decoded output of text targets (default: the task's cap).")
  parser.add_argument("--ctc_weight", type=float, default=None,
                      help="Decode audio tasks jointly with the run's CTC head, weighted this much "
                           "against the decoder, in [0, 1] (0: the decoder alone; default: the "
                           "run's train.eval_ctc_weight).")
  parser.add_argument("--platforms", default="",
                      help="Comma-separated platforms to lower for, e.g. cpu,cuda (default: this "
                           "machine's).")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (2 on a usage error)."""
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  split = lambda s: [x.strip() for x in s.split(",") if x.strip()]
  try:
    out = export(args.workdir, args.out, task_names=split(args.tasks) or None, step=args.step,
                 batch_size=args.batch_size, max_decode_length=args.max_decode_length,
                 ctc_weight=args.ctc_weight, platforms=split(args.platforms) or None)
  except KeyError as e:
    print(f"error: {e.args[0]}", file=sys.stderr)
    return 2
  except (checkpoint.WorkdirError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  info = json.loads((out / "export.json").read_text())
  print(f"exported {', '.join(info['tasks'])} (step {info['step']}, "
        f"{info['num_parameters']:,} parameters, modality nets {', '.join(info['modalities'])}, "
        f"batch {info['batch_size']}, {','.join(info['platforms'])}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
