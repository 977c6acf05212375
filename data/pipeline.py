"""Batches of one task: an infinite, deterministic, resumable training iterator and a one-pass eval.

Training (`TaskIterator`): each epoch visits the split in a fresh permutation drawn from
(seed, task name, epoch), reading examples by index from the random-access data source (no tf.data);
each example is preprocessed (`data.preprocess`) and put into the buffer of its bucket rung
(`data.buckets`); a buffer that reaches its rung's batch size becomes a batch. Examples over the
task's length caps are skipped (the inputs of tasks with label targets are cut to the cap instead).
The iterator's state (`get_state`) is a small JSON-serialisable dict: epoch, position in the epoch's
permutation, and the indices of the examples waiting in the buffers; after `set_state` the iterator
yields exactly the batches an uninterrupted one would.

Evaluation (`eval_batches`): one pass over a split in index order, same bucket shapes; over-long
sequences are cut to the caps; the last batch of each rung is padded. Evaluation batches carry two
more keys: `example_mask` bool [B] (False on padding rows: metrics must ignore them) and
`example_index` int32 [B] (index of the example in the split, -1 on padding rows; evaluators use it
to read the untruncated reference).

Every batch follows the batch contract of docs/design.md (see `buckets.batch_spec`).

Shape legend: B batch, S source length, T target length, H, W image size, M mel bins.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any
import zlib

import numpy as np

from data import buckets as buckets_lib
from data import preprocess
from data import sources
from data.buckets import InputConfig
from data.tasks import Task
from data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
Example = dict[str, Any]


def _length(value: Any, modality: str) -> int:
  """Sequence length of a converted value (0 for images and labels)."""
  return len(value) if modality in ("text", "audio") else 0


class _Examples:
  """Converts examples of a task read by index from its source."""

  def __init__(self, task: Task, tokenizer: Tokenizer | None, config: InputConfig,
               source: Sequence[Mapping[str, Any]]):
    self.task, self.source = task, source
    self.convert = preprocess.for_task(task, tokenizer, config.features)
    self.buckets = buckets_lib.for_task(task, config)
    self.config = config

  def read(self, index: int) -> Example:
    return self.convert(self.source[index])

  def rung(self, example: Example) -> int | None:
    return self.buckets.rung(_length(example["inputs"], self.task.input_modality),
                             _length(example["targets"], self.task.target_modality))

  def truncate(self, example: Example) -> Example:
    """Cuts text and audio sequences to the task's caps (evaluation keeps every example)."""
    out = dict(example)
    if self.task.input_modality in ("text", "audio"):
      out["inputs"] = example["inputs"][:self.task.max_input_length]
    if self.task.target_modality == "text":
      out["targets"] = example["targets"][:self.task.max_target_length]
    return out

  def collate(self, examples: Sequence[Example], rung: int, indices: Sequence[int] | None = None,
              evaluation: bool = False) -> Batch:
    """Pads `examples` into a batch of the rung's exact shape; missing rows are padding."""
    spec = buckets_lib.batch_spec(self.task, self.buckets, rung, self.config, evaluation)
    batch = {key: np.zeros(shape, dtype) for key, (shape, dtype) in spec.items()}
    for row, example in enumerate(examples):
      for key in ("inputs", "targets"):
        value = example[key]
        if np.ndim(value) == 0 or key == "inputs" and self.task.input_modality == "image":
          batch[key][row] = value
        else:
          batch[key][row, :len(value)] = value
      if "input_mask" in batch:
        batch["input_mask"][row, :len(example["inputs"])] = True
    if evaluation:
      batch["example_mask"][:len(examples)] = True
      batch["example_index"][:] = -1
      batch["example_index"][:len(examples)] = indices
    return batch


def _task_seed(name: str) -> int:
  return zlib.crc32(name.encode("utf-8"))


class _First(Sequence):
  """The first `n` examples of a random-access source (all of them when it has fewer)."""

  def __init__(self, source: Sequence[Mapping[str, Any]], n: int):
    self.source, self.n = source, min(n, len(source))

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    if not -self.n <= index < self.n:
      raise IndexError(f"index {index} out of range for the first {self.n} examples")
    return self.source[index % self.n]


class TaskIterator:
  """Infinite deterministic training batches of one task (see the module docstring)."""

  def __init__(self, task: Task, tokenizer: Tokenizer | None, config: InputConfig = InputConfig(),
               seed: int = 0, split: str = "train",
               source: Sequence[Mapping[str, Any]] | None = None, max_examples: int = 0):
    """Opens the task's split (or uses `source`, any random-access sequence of raw examples).

    `max_examples` > 0 keeps only the split's first `max_examples` examples (in index order), the
    same ones for every seed: a fixed small training set.
    """
    self.task, self.seed = task, seed
    source = sources.open_split(task, split) if source is None else source
    if max_examples > 0:
      source = _First(source, max_examples)
    self._examples = _Examples(task, tokenizer, config, source)
    self.size = len(self._examples.source)
    if self.size == 0:
      raise ValueError(f"task {task.name!r}: split {task.split(split)!r} is empty")
    self.buckets = self._examples.buckets
    self.skipped = 0  # Examples skipped for exceeding the length caps (not part of the state).
    self._epoch, self._position = 0, 0
    self._order = self._permutation(0)
    self._buffers: list[list[tuple[int, Example]]] = [[] for _ in range(len(self.buckets))]

  def _permutation(self, epoch: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, _task_seed(self.task.name), epoch])
    return rng.permutation(self.size)

  def _next_example(self) -> tuple[int, Example]:
    index = int(self._order[self._position])
    self._position += 1
    if self._position == self.size:
      self._epoch, self._position = self._epoch + 1, 0
      self._order = self._permutation(self._epoch)
    return index, self._examples.read(index)

  def __iter__(self) -> "TaskIterator":
    return self

  def __next__(self) -> Batch:
    skipped_in_a_row = 0
    while True:
      index, example = self._next_example()
      if self.task.target_modality == "label":  # A classifier still learns from the first part.
        example = self._examples.truncate(example)
      rung = self._examples.rung(example)
      if rung is None:
        self.skipped += 1
        skipped_in_a_row += 1
        if skipped_in_a_row > self.size:
          raise ValueError(f"task {self.task.name!r}: every example exceeds the length caps "
                           f"({self.task.max_input_length}, {self.task.max_target_length})")
        continue
      skipped_in_a_row = 0
      buffer = self._buffers[rung]
      buffer.append((index, example))
      if len(buffer) == self.buckets.batch_sizes[rung]:
        self._buffers[rung] = []
        return self._examples.collate([e for _, e in buffer], rung)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position of the iterator."""
    return {
        "task": self.task.name,
        "size": self.size,
        "seed": self.seed,
        "epoch": self._epoch,
        "position": self._position,
        "buffers": [[i for i, _ in buffer] for buffer in self._buffers],
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state` result (of an iterator over the same task, data and config)."""
    expected = {"task": self.task.name, "size": self.size, "seed": self.seed}
    found = {key: state.get(key) for key in expected}
    if found != expected or len(state["buffers"]) != len(self.buckets):
      raise ValueError(f"Iterator state of {found} (with {len(state['buffers'])} buckets) does not "
                       f"fit this iterator {expected} (with {len(self.buckets)} buckets)")
    self._epoch, self._position = int(state["epoch"]), int(state["position"])
    self._order = self._permutation(self._epoch)
    self._buffers = []
    for indices in state["buffers"]:
      self._buffers.append([(int(i), self._examples.read(int(i))) for i in indices])

  def batch_specs(self) -> list[buckets_lib.Spec]:
    """The (shape, dtype) of every key, for each batch shape this iterator can yield."""
    return [buckets_lib.batch_spec(self.task, self.buckets, r, self._examples.config)
            for r in range(len(self.buckets))]


def eval_batches(task: Task, tokenizer: Tokenizer | None, config: InputConfig = InputConfig(),
                 split: str = "eval", max_examples: int | None = None,
                 source: Sequence[Mapping[str, Any]] | None = None) -> Iterator[Batch]:
  """One pass over a split in index order (the first `max_examples`), padded batches at the end.

  Batches are yielded rung by rung as they fill, then the partial batches in rung order; each holds
  `example_mask` and `example_index` (see the module docstring).
  """
  examples = _Examples(task, tokenizer, config,
                       sources.open_split(task, split) if source is None else source)
  size = len(examples.source) if max_examples is None else min(max_examples, len(examples.source))
  sizes = examples.buckets.batch_sizes
  buffers: list[list[tuple[int, Example]]] = [[] for _ in sizes]

  def flush(rung: int) -> Batch:
    buffer, buffers[rung] = buffers[rung], []
    return examples.collate([e for _, e in buffer], rung, [i for i, _ in buffer], evaluation=True)

  for index in range(size):
    example = examples.truncate(examples.read(index))
    rung = examples.rung(example)
    buffers[rung].append((index, example))
    if len(buffers[rung]) == sizes[rung]:
      yield flush(rung)
  for rung in range(len(sizes)):
    if buffers[rung]:
      yield flush(rung)
