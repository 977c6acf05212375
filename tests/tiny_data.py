"""Tiny real builds of embedded tasks for the tests: built once per test process, then shared.

`data_dir()` builds a few examples a split of the real embedded sources (and trains the tokenizer on
them) with `data.prepare` into a temporary folder; tests point `MULTIMODEL_DATA_DIR` at it.
"""

import atexit
import functools
import os
import pathlib
import shutil
import tempfile

# Sources of every language the tokenizer must handle: en, fr, de, speech transcripts, trees.
TASKS = ("image_mnist5k", "translate_en_fr", "translate_en_de", "speech_en", "parse_en")
EXAMPLES_PER_SPLIT = 24


@functools.cache
def data_dir() -> pathlib.Path:
  """Root of the tiny prepared data (tokenizer included)."""
  from data import prepare  # pylint: disable=import-outside-toplevel
  from data import tasks  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(tempfile.mkdtemp(prefix="multimodel-tiny-data-"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)
  previous = os.environ.get("MULTIMODEL_DATA_DIR")
  os.environ["MULTIMODEL_DATA_DIR"] = str(root)
  try:
    rows = prepare.prepare(tasks.resolve(list(TASKS)), max_examples_per_split=EXAMPLES_PER_SPLIT,
                           log=lambda line: None)
  finally:
    if previous is None:
      del os.environ["MULTIMODEL_DATA_DIR"]
    else:
      os.environ["MULTIMODEL_DATA_DIR"] = previous
  problems = [r for r in rows if r.status not in ("built", "ready") and r.task != "tokenizer"]
  if problems:
    raise RuntimeError(f"Tiny build failed: {problems}")
  return root


def use(monkeypatch) -> pathlib.Path:
  """Points the data paths at the tiny build for one test; returns its root."""
  root = data_dir()
  monkeypatch.setenv("MULTIMODEL_DATA_DIR", str(root))
  return root
