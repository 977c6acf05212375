"""Random access to the examples of a task's split, through `tfds.data_source` for every task.

Embedded tasks read what `python -m data.prepare` built into `data.paths.tfds_dir()`; catalogue
tasks are downloaded and prepared by TFDS on first use, as ARRAY_RECORD files (the format that gives
random access), into TFDS's own data dir.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds

from data import paths
from data.errors import SourceError
from data.tasks import Task


def builder(task: Task) -> tfds.core.DatasetBuilder:
  """The TFDS builder of the task's source (embedded builders are registered on first use)."""
  if task.embedded:
    import data.builders  # pylint: disable=import-outside-toplevel
    data.builders.import_all()
    return tfds.builder(task.source, data_dir=paths.tfds_dir())
  return tfds.builder(task.source)


def is_prepared(task: Task) -> bool:
  """True when the task's data is built and readable without a download."""
  try:
    return builder(task).is_prepared()
  except tfds.core.registered.DatasetNotFoundError:
    return False


def open_split(task: Task, split: str) -> Sequence[Mapping[str, Any]]:
  """Examples of `task.split(split)` ("train", "eval", "test" or a TFDS split name), by index.

  Raises:
    SourceError: an embedded task whose data is not prepared (names the task and the folder).
  """
  name = task.split(split)
  if task.embedded:
    b = builder(task)
    if not b.is_prepared():
      raise SourceError(task.name, b.data_dir, "prepared data not found",
                        f"run `python -m data.prepare --tasks {task.name}`")
    return b.as_data_source(split=name)
  return tfds.data_source(task.source, split=name, download=True,
                          download_and_prepare_kwargs={"file_format": "array_record"})
