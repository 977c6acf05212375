"""Evaluates one task of a trained run: `python -m multimodel.evaluate` / `multimodel-eval`.

    python -m multimodel.evaluate --workdir runs/default --task translate_en_fr \
        [--split test] [--step 2000] [--decode greedy|beam|none] [--beam_size 4] \
        [--no_repeat_ngram 3] [--ctc_weight 0.3] [--max_examples 100] [--data_dir DIR]

Reads checkpoint `--step` (default: the latest) of the run: its parameters only (no optimizer
state), the config and the tokenizer stored with it. Rebuilds the model from that config and runs
`evaluation.evaluate_task`: teacher-forced log-perplexity and token accuracy (top-1 and top-5 for
classifiers), and for sequence targets the task's own metrics on decoded outputs. Prints the table
and writes `WORKDIR/eval/TASK-SPLIT.json` with every metric and every output (decoded text, or the
predicted class of a classifier).

Exit status 2 with a one-line error for a missing workdir or step, an unknown task or one the run
was not trained on, and data that is not prepared.
"""

import argparse
import importlib
import json
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import modalities
from data import tasks as tasks_lib
from data.buckets import InputConfig
from data.errors import SourceError
from data.tokenizer import Tokenizer
from multimodel import checkpoint
from multimodel.model import MultiModel

SPLITS_HELP = "'train', 'eval', 'test' (the task's split names) or a TFDS split name"


def model_from_run(run: checkpoint.Run, modality_names: tuple[str, ...] | None = None):
  """(graphdef, params) of the run's model, holding the checkpoint's parameters.

  Args:
    run: from `checkpoint.load_run`.
    modality_names: modality nets to build (default: all of them, as in training). A subset
      model only reads the parameters of its own nets.
  Returns:
    graphdef and params (`nnx.State` of `nnx.Param`) for `nnx.merge` or the evaluators.
  """
  names = tuple(modality_names or modalities.NAMES)
  abstract = nnx.eval_shape(
      lambda: MultiModel(run.config.model, modality_names=names, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  params = checkpoint.params_from_flat(abstract_params, run.params)
  return graphdef, jax.tree.map(jnp.asarray, params)


def import_task_modules(config) -> None:
  """Imports the modules of `config.data.imports` (they register the run's custom tasks)."""
  for module in filter(None, (m.strip() for m in config.data.imports.split(","))):
    importlib.import_module(module)


def run_task(run: checkpoint.Run, name: str):
  """The registered `Task` called `name`, which the run must have been trained on.

  Raises:
    KeyError: an unknown task, or one the run was not trained on (lists the run's tasks).
  """
  import_task_modules(run.config)
  trained = ", ".join(run.task_names)
  if name not in run.task_names:
    known = "" if name in tasks_lib.TASKS else "unknown task; "
    raise KeyError(f"{known}the run in {run.workdir} was not trained on {name!r}; "
                   f"its tasks: {trained}")
  if name not in tasks_lib.TASKS:
    raise KeyError(f"task {name!r} of the run in {run.workdir} is not registered here (a custom "
                   f"task whose module is not importable?); registered tasks: "
                   f"{', '.join(sorted(tasks_lib.TASKS))}")
  return tasks_lib.TASKS[name]


def load_for_task(workdir: str | pathlib.Path, task_name: str, step: int | None = None,
                  data_dir: str | None = None):
  """(run, task, tokenizer or None, graphdef, params) to evaluate `task_name` with checkpoint
  `step` (default: the latest) of the run in `workdir`; its data read from `data_dir`, else the
  run's `data.data_dir`, else the default (`MULTIMODEL_DATA_DIR` is set to the one given)."""
  run = checkpoint.load_run(workdir, step)
  task = run_task(run, task_name)
  data_dir = data_dir or run.config.data.data_dir
  if data_dir:
    os.environ["MULTIMODEL_DATA_DIR"] = str(data_dir)
  tokenizer = None if run.tokenizer_bytes is None else Tokenizer.from_bytes(run.tokenizer_bytes)
  graphdef, params = model_from_run(run)
  return run, task, tokenizer, graphdef, params


def evaluate(workdir: str | pathlib.Path, task_name: str, *, split: str = "test",
             step: int | None = None, decode: str | None = None, beam_size: int | None = None,
             no_repeat_ngram: int | None = None, max_examples: int = 0,
             data_dir: str | None = None,
             ctc_weight: float | None = None) -> tuple[dict, pathlib.Path]:
  """Evaluates `task_name` on `split` with checkpoint `step` of the run in `workdir`.

  `decode` and `beam_size` say how sequences are decoded (None: the task's own, `Task.beam_size`);
  `ctc_weight` is the weight of the CTC head in joint decoding of an audio task
  (`evaluation.evaluate_task`; None: the run's `train.eval_ctc_weight`).

  Returns:
    the report (task, split, step, every metric, "decoded": the outputs) and the path of the JSON
    file it was written to, `WORKDIR/eval/TASK-SPLIT.json`.
  """

  from multimodel import evaluation  # pylint: disable=import-outside-toplevel  # Imports TF.

  run, task, tokenizer, graphdef, params = load_for_task(workdir, task_name, step, data_dir)
  results = evaluation.evaluate_task(
      graphdef, params, task, tokenizer, InputConfig.from_config(run.config), split=split,
      max_examples=max_examples, decode=decode, beam_size=beam_size,
      no_repeat_ngram=no_repeat_ngram,
      ctc_weight=run.config.train.eval_ctc_weight if ctc_weight is None else ctc_weight)
  report = {"task": task.name, "split": split, "step": run.step, "max_examples": max_examples,
            **results}
  out = run.workdir / "eval" / f"{task.name}-{split}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1) + "\n")
  return report, out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="multimodel-eval", description="Evaluates one task of a trained run.")
  parser.add_argument("--workdir", required=True, help="The run's folder (as given to train.py).")
  parser.add_argument("--task", required=True, help="A task the run was trained on.")
  parser.add_argument("--split", default="test", help=SPLITS_HELP + " (default: test).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: latest).")
  parser.add_argument("--decode", default=None, choices=("greedy", "beam", "none"),
                      help="Decoding of sequence targets ('none': teacher-forced metrics only; "
                           "default: the task's own, beam search for parse_en, else greedy).")
  parser.add_argument("--beam_size", type=int, default=None,
                      help="Beams of beam search (default: the task's own, or 4); without "
                           "--decode it changes only the tasks decoded with beams (parse_en).")
  parser.add_argument("--no_repeat_ngram", type=int, default=None,
                      help="Never repeat an n-gram of this size in an output (0: off; default: "
                           "the task's own: 3 for translation and speech).")
  parser.add_argument("--ctc_weight", type=float, default=None,
                      help="Decode an audio task jointly with the run's CTC head over letters, "
                           "weighted this much against the decoder, in [0, 1] (0: the decoder "
                           "alone; default: the run's train.eval_ctc_weight).")
  parser.add_argument("--max_examples", type=int, default=0,
                      help="Evaluate the first N examples of the split (0: all).")
  parser.add_argument("--data_dir", default=None,
                      help="Prepared data (default: the run's data_dir, else $MULTIMODEL_DATA_DIR "
                           "or ~/.cache/multimodel).")
  args = parser.parse_args(argv)
  beams_bad = args.beam_size is not None and args.beam_size < 1
  if beams_bad or args.max_examples < 0 or (args.no_repeat_ngram or 0) < 0:
    parser.error("--beam_size must be >= 1, --max_examples and --no_repeat_ngram >= 0")
  if args.ctc_weight is not None and not 0.0 <= args.ctc_weight <= 1.0:
    parser.error(f"--ctc_weight must be in [0, 1], got {args.ctc_weight}")
  return args


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (2 on a usage or data error)."""
  args = parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

  from multimodel import evaluation  # pylint: disable=import-outside-toplevel  # Imports TF.

  try:
    report, path = evaluate(args.workdir, args.task, split=args.split, step=args.step,
                            decode=args.decode, beam_size=args.beam_size,
                            no_repeat_ngram=args.no_repeat_ngram,
                            max_examples=args.max_examples, data_dir=args.data_dir,
                            ctc_weight=args.ctc_weight)
  except KeyError as e:
    print(f"error: {e.args[0]}", file=sys.stderr)
    return 2
  except (checkpoint.WorkdirError, SourceError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  examples = "" if report["examples"] is None else f"{report['examples']} examples, "
  print(f"{report['task']} ({report['split']} split, step {report['step']}, {examples}"
        f"{report['seconds']:.1f} s)")
  print(evaluation.format_table({report["task"]: report}))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
