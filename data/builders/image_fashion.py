"""Fashion-MNIST, full, from Debian's `dataset-fashion-mnist`: image -> clothing class.

Source: `/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`.
Test is the t10k file (10,000). Validation is 5,000 images held out of the train file, 500 a class:
within a class, the images whose pixels have the smallest SHA-256; train is the other 55,000.
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

TASK = "image_fashion"
HINT = "run `bash data/setup_sources.sh` or `apt-get install dataset-fashion-mnist` (needs root)"
SOURCE_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot")
VALIDATION_PER_CLASS = 500
SPLITS = ("train", "validation", "test")


def _read_idx(path: pathlib.Path, magic: int, count: int) -> np.ndarray:
  """Reads a gzipped IDX file: images uint8 [N, 28, 28] (magic 2051) or labels uint8 [N] (2049)."""
  if not path.is_file():
    raise SourceError(TASK, path, "not found (is dataset-fashion-mnist installed?)", HINT)
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise SourceError(TASK, path, f"unreadable ({e})", HINT) from e
  header = 16 if magic == 2051 else 8
  dims = np.frombuffer(raw[:header], ">u4") if len(raw) >= header else np.zeros(1, ">u4")
  shape = (count, 28, 28) if magic == 2051 else (count,)
  if tuple(dims) != (magic, *shape) or len(raw) != header + int(np.prod(shape)):
    raise SourceError(TASK, path, f"not an IDX file of shape {shape}", HINT)
  array = np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
  if magic == 2049 and array.max() >= len(NAMES):
    raise SourceError(TASK, path, "labels outside 0..9", HINT)
  return array


@functools.lru_cache(maxsize=2)
def _load(source_dir: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Returns split -> (images uint8 [N, 28, 28], labels uint8 [N], source indices [N])."""
  parts = {}
  for part, count in (("train", 60000), ("t10k", 10000)):
    images = _read_idx(source_dir / f"{part}-images-idx3-ubyte.gz", 2051, count)
    labels = _read_idx(source_dir / f"{part}-labels-idx1-ubyte.gz", 2049, count)
    parts[part] = images, labels
  images, labels = parts["train"]
  held_out = np.zeros(len(labels), bool)
  for label in range(len(NAMES)):
    members = np.flatnonzero(labels == label)
    order = sorted(members, key=lambda i: hashlib.sha256(images[i].tobytes()).digest())
    held_out[order[:VALIDATION_PER_CLASS]] = True
  train, validation = np.flatnonzero(~held_out), np.flatnonzero(held_out)
  test_images, test_labels = parts["t10k"]
  return {
      "train": (images[train], labels[train], train),
      "validation": (images[validation], labels[validation], validation),
      "test": (test_images, test_labels, np.arange(len(test_labels))),
  }


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields `(key, {"image": uint8 [28, 28, 1], "label": int})` of one split, in source order."""
  images, labels, indices = _load(SOURCE_DIR)[split]
  prefix = "t10k" if split == "test" else "train"
  for image, label, index in zip(images, labels, indices):
    yield f"{prefix}-{index}", {"image": image[:, :, None], "label": int(label)}


class ImageFashion(base.OfflineBuilder):
  """Fashion-MNIST: 55,000 train, 5,000 validation held out of train, 10,000 test."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=NAMES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def check_sources(self) -> None:
    _load(SOURCE_DIR)

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
