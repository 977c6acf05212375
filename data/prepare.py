"""Builds the embedded tasks' data and the shared tokenizer: `python -m data.prepare`.

    python -m data.prepare [--tasks a,b] [--data_dir DIR] [--max_examples_per_split N]
                           [--retrain_tokenizer] [--vocab_size 4096] [--imports my.module]

Builds each task's TFDS source into `DIR/tfds` (default `$MULTIMODEL_DATA_DIR`, else
`~/.cache/multimodel`), skipping those already prepared, then trains the SentencePiece model on the
text of every prepared text task if there is none yet (or when asked), and prints a table of task,
split, size and seconds. A task whose source is not installed gets one line naming the file, and
the others go on; the exit code is non-zero only when a task failed for another reason.
"""

import argparse
from collections.abc import Callable, Iterator, Sequence
import dataclasses
import importlib
import os
import sys
import time

import tensorflow_datasets as tfds

from data import paths
from data import preprocess
from data import sources
from data import tasks as tasks_lib
from data import tokenizer as tokenizer_lib
from data.errors import SourceError
from data.tasks import Task

@dataclasses.dataclass
class Row:
  """One line of the summary table."""

  task: str
  split: str = "-"
  size: int | None = None
  seconds: float | None = None
  status: str = ""
  failed: bool = False


def source_error(error: BaseException) -> SourceError | None:
  """The SourceError behind `error` (TFDS may wrap what a builder raises), if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, SourceError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def build(task: Task, max_examples_per_split: int | None = None) -> str:
  """Builds the task's source unless it is prepared; returns "built" or "ready"."""
  builder = sources.builder(task)
  if builder.is_prepared():
    return "ready"
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(max_examples_per_split=max_examples_per_split))
  return "built"


def task_texts(task: Task) -> Iterator[str]:
  """The text of a task's training split: text inputs and text targets, in index order."""
  keys = [k for k, m in (("inputs", task.input_modality), ("targets", task.target_modality))
          if m == "text"]
  if not keys:
    return
  source = sources.open_split(task, "train")
  for index in range(len(source)):
    example = task.preprocess(source[index])
    for key in keys:
      yield preprocess.as_text(example[key])


def tokenizer_corpus(tasks: Sequence[Task]) -> Iterator[str]:
  """Text of the given tasks, by task name; tasks sharing a source share their text (read once)."""
  seen = set()
  for task in sorted(tasks, key=lambda t: t.name):
    if task.source not in seen:
      seen.add(task.source)
      yield from task_texts(task)


def prepare(tasks: Sequence[Task], *, max_examples_per_split: int | None = None,
            retrain_tokenizer: bool = False, vocab_size: int = tokenizer_lib.VOCAB_SIZE,
            log: Callable[[str], None] = print) -> list[Row]:
  """Builds `tasks`, then the tokenizer when missing or asked; returns the table's rows."""
  rows, prepared = [], []
  for task in tasks:
    start = time.perf_counter()
    try:
      status = build(task, max_examples_per_split)
    except Exception as e:  # pylint: disable=broad-except
      missing = source_error(e)
      if missing is not None:
        log(f"{task.name}: skipped, source not installed: {missing}")
        rows.append(Row(task.name, status=f"source not installed: {missing.path}"))
      else:
        log(f"{task.name}: FAILED: {type(e).__name__}: {e}")
        rows.append(Row(task.name, status=f"failed: {type(e).__name__}", failed=True))
      continue
    seconds = time.perf_counter() - start
    prepared.append(task)
    splits = sources.builder(task).info.splits
    for key in ("train", "eval", "test"):
      if key in task.splits and task.split(key) in splits:
        rows.append(Row(task.name, task.split(key), splits[task.split(key)].num_examples,
                        seconds if key == "train" else None, status))

  path = paths.tokenizer_path()
  text_tasks = list({t.name: t for t in tasks_lib.installed_tasks() + prepared
                     if "text" in (t.input_modality, t.target_modality)}.values())
  symbols = task_symbols(text_tasks)
  if retrain_tokenizer or not path.is_file():
    start = time.perf_counter()
    if text_tasks:
      tok = tokenizer_lib.train(tokenizer_corpus(text_tasks), vocab_size=vocab_size,
                                symbols=symbols)
      tok.save(path)
      text_sources = ", ".join(sorted({t.source for t in text_tasks}))
      rows.append(Row("tokenizer", "-", tok.vocab_size, time.perf_counter() - start,
                      f"trained on the text of {text_sources}: {path}"))
    else:
      rows.append(Row("tokenizer", status="not trained: no text task is prepared"))
  else:
    tok = tokenizer_lib.Tokenizer.load(path)
    missing = tok.missing_symbols(symbols)
    status = f"ready: {path}"
    if missing:  # Not retrained unasked: that would renumber the pieces under later runs.
      status += (f" (trained without the tasks' symbols {', '.join(missing[:3])}...; "
                 "--retrain_tokenizer gives new runs one with them)")
    if tok.vocab_size > vocab_size:  # E.g. 8192 pieces from before the default became 4096.
      status += (f" ({tok.vocab_size} pieces, more than the {vocab_size} asked for: models of "
                 f"model.vocab_size < {tok.vocab_size} refuse it; --retrain_tokenizer trains "
                 f"one of {vocab_size})")
    rows.append(Row("tokenizer", "-", tok.vocab_size, None, status))
  return rows


def task_symbols(tasks: Sequence[Task]) -> list[str]:
  """The union of the tasks' `symbols`, in a fixed order (the tokenizer's bytes depend on it)."""
  return sorted({s for task in tasks for s in task.symbols})


def format_table(rows: Sequence[Row]) -> str:
  """The summary table as text."""
  lines = [f"{'task':<24} {'split':<14} {'size':>8} {'seconds':>8}  status"]
  for r in rows:
    size = "-" if r.size is None else str(r.size)
    seconds = "-" if r.seconds is None else f"{r.seconds:.1f}"
    lines.append(f"{r.task:<24} {r.split:<14} {size:>8} {seconds:>8}  {r.status}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data.prepare",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="",
                      help="comma-separated task names (default: every embedded task)")
  parser.add_argument("--data_dir", default=None, help="root of the prepared data "
                      "(default: $MULTIMODEL_DATA_DIR, else ~/.cache/multimodel)")
  parser.add_argument("--max_examples_per_split", type=int, default=None,
                      help="build at most this many examples a split (quick trials, tests)")
  parser.add_argument("--retrain_tokenizer", action="store_true",
                      help="train the tokenizer again even if one exists")
  parser.add_argument("--vocab_size", type=int, default=tokenizer_lib.VOCAB_SIZE,
                      help="pieces of a newly trained tokenizer (one already there is kept "
                      "unless --retrain_tokenizer)")
  parser.add_argument("--imports", default="",
                      help="comma-separated modules to import first (they register your builders "
                      "and tasks)")
  args = parser.parse_args(argv)
  if args.data_dir:
    os.environ["MULTIMODEL_DATA_DIR"] = os.path.abspath(os.path.expanduser(args.data_dir))
  for module in filter(None, (m.strip() for m in args.imports.split(","))):
    importlib.import_module(module)
  try:
    tasks = tasks_lib.resolve(args.tasks) if args.tasks else tasks_lib.embedded_tasks()
  except KeyError as e:
    print(e.args[0], file=sys.stderr)
    return 2
  tfds.display_progress_bar(False)
  print(f"Preparing {len(tasks)} task(s) into {paths.data_dir()}", flush=True)
  rows = prepare(tasks, max_examples_per_split=args.max_examples_per_split,
                 retrain_tokenizer=args.retrain_tokenizer, vocab_size=args.vocab_size,
                 log=lambda line: print(line, flush=True))
  print(format_table(rows))
  return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
