"""Where prepared data lives: `$MULTIMODEL_DATA_DIR` (default `~/.cache/multimodel`)."""

import os
import pathlib


def data_dir() -> pathlib.Path:
  """Root of everything `python -m data.prepare` writes."""
  return pathlib.Path(os.environ.get("MULTIMODEL_DATA_DIR", "~/.cache/multimodel")).expanduser()


def tfds_dir() -> pathlib.Path:
  """`data_dir` argument of our TFDS builders."""
  return data_dir() / "tfds"


def tokenizer_path() -> pathlib.Path:
  """The shared SentencePiece model."""
  return data_dir() / "tokenizer" / "spm.model"
