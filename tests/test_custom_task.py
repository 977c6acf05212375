"""Runs the worked examples of docs/adding_a_task.md exactly as written there."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import tensorflow_datasets as tfds

from data import pipeline
from data import tasks
from data import tokenizer as tokenizer_lib
from tests import tiny_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_task.md"


def _blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def _files() -> dict[str, str]:
  """The doc's Python files: code blocks whose first line is `# file: NAME`."""
  files = {}
  for block in _blocks("python"):
    first, _, rest = block.partition("\n")
    if first.startswith("# file: "):
      files[first[len("# file: "):].strip()] = rest
  return files


def _commands() -> list[list[str]]:
  """The doc's shell commands, in order (continuation lines joined)."""
  return [shlex.split(block.replace("\\\n", " ")) for block in _blocks("sh")]


def test_worked_example_runs_as_documented(tmp_path):
  files = _files()
  assert {"unicode_names.py", "peek.py", "catalogue_task.py"} <= set(files)
  for name in ("unicode_names.py", "peek.py"):
    (tmp_path / name).write_text(files[name])
  env = dict(os.environ, MULTIMODEL_DATA_DIR=str(tmp_path / "data"),
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  commands = _commands()
  assert [c[:2] for c in commands] == [["python", "-m"], ["python", "peek.py"], ["python", "train.py"]]
  # The doc runs from the project root; the test runs in a scratch folder.
  commands[2][1] = str(ROOT / "train.py")
  commands[2][commands[2].index("--config") + 1] = str(ROOT / "multimodel/configs/tiny.py")
  outputs = []
  for command in commands:
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs.append(result.stdout)

  prepared, peeked, trained = outputs
  assert re.search(r"^unicode_names\s+exact_match\s+[0-9.]+$", trained, re.M), trained
  assert (tmp_path / "runs" / "unicode" / "checkpoints" / "20").is_dir()
  sizes = {m[0]: int(m[1]) for m in re.findall(r"^unicode_names\s+(\w+)\s+(\d+)", prepared, re.M)}
  assert set(sizes) == {"train", "validation", "test"} and sizes["train"] > 800, prepared
  assert re.search(r"^tokenizer .* trained", prepared, re.M), prepared
  shapes, example = peeked.strip().splitlines()[-2:]
  assert re.fullmatch(r"\{'inputs': \(\(\d+, (16|32)\), 'int32'\), "
                      r"'targets': \(\(\d+, (16|32)\), 'int32'\)\}", shapes), shapes
  char, name = re.fullmatch(r"'(.*)' -> '(.*)'", example).groups()
  import unicodedata  # pylint: disable=import-outside-toplevel
  assert unicodedata.name(char).lower() == name


def test_catalogue_example_registers_a_working_task(monkeypatch):
  tiny_data.use(monkeypatch)
  namespace = {"__name__": "catalogue_task"}
  try:
    code = compile(_files()["catalogue_task.py"], "catalogue_task.py", "exec")
    exec(code, namespace)  # pylint: disable=exec-used
    task = tasks.get("ag_news")
    tok = tokenizer_lib.Tokenizer.load()
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
      batch = next(pipeline.TaskIterator(task, tok, pipeline.InputConfig(tokens_per_batch=256)))
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].ndim == 2
    assert batch["targets"].dtype == np.int32 and batch["targets"].max() < 4
  finally:
    tasks.TASKS.pop("ag_news", None)
