"""Shared by the offline builders: their base class and `package_file`."""

import abc
from collections.abc import Iterator
import importlib.util
import pathlib

import tensorflow_datasets as tfds


def package_file(package: str, relative: str) -> pathlib.Path:
  """Path of a data file inside an installed package, found without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return pathlib.Path(package) / relative  # Not installed: a relative path that names the file.
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / relative


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose splits are generated from installed files, written as ArrayRecord.

  Subclasses define `_info` and `examples`, and override `check_sources` when their sources can be
  checked before any example is generated. Abstract, and not registered with TFDS (only concrete
  subclasses are, under the snake case of their class names).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SPLITS = ("train", "validation", "test")

  def __init__(self, *, file_format=tfds.core.FileFormat.ARRAY_RECORD, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def check_sources(self) -> None:
    """Raises `SourceError` naming the file when a source is missing or corrupt (default: none)."""

  @abc.abstractmethod
  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    """Yields `(key, example)` of one split."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Offline: every source is an installed file.
    self.check_sources()  # Fails early, before any split is generated.
    return {split: self._generate_examples(split) for split in self.SPLITS}

  def _generate_examples(self, split: str):
    yield from self.examples(split)
