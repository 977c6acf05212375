"""Bucket shapes: the small fixed set of batch shapes of each task, and their batch sizes.

A task's sequences (text inputs, audio inputs, text targets) each have a ladder of bucket lengths
capped at the task's maximum; the ladders are aligned rung by rung, and an example goes to the
lowest rung where every one of its sequences fits. So a task has at most `len(ladder)` batch shapes
and joint training compiles a bounded number of programs. Batch sizes come from a token budget:
`tokens_per_batch // longest sequence of the rung` (an audio frame counts
`1 / audio_frames_per_token` of a token: the audio net strides time), rounded down to a multiple of
`batch_multiple` and at least `batch_multiple`; tasks with image inputs or no sequence at all use
`image_batch_size`.

Shape legend: B batch, S source length, T target length, H, W image size, M mel bins.
"""

from collections.abc import Sequence
import dataclasses

import numpy as np

from data.preprocess import AudioFeatures
from data.tasks import Task


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Settings of the input pipeline (the `data` section of the config holds the same names)."""

  tokens_per_batch: int = 2048  # Token budget of a batch of sequences (padding included).
  batch_multiple: int = 8  # Batch sizes are multiples of this (device sharding of the batch axis).
  image_batch_size: int = 32  # Batch size of tasks with image inputs (and of label -> label tasks).
  text_buckets: tuple[int, ...] = (16, 32, 64, 128, 256)
  audio_buckets: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # In 10 ms frames.
  audio_frames_per_token: int = 4  # Time downsampling of the audio net (2 strided convs).
  single_bucket: bool = False  # Only the longest rung of every task: one batch shape per task.
  features: AudioFeatures = AudioFeatures()

  @classmethod
  def from_config(cls, config) -> "InputConfig":
    """The settings of a project config: `config.data.<field>` where set; audio: `model.audio`.

    The all-tasks step (`train.step_mode="all_tasks"`) always gets `single_bucket`: its program
    takes a batch of every task, so per-task buckets would compile one per combination of them.
    """
    data, kwargs = config.data, {}
    for field in dataclasses.fields(cls):
      if field.name != "features" and field.name in data:
        value = data[field.name]
        kwargs[field.name] = tuple(value) if isinstance(field.default, tuple) else value
    if config.train.get("step_mode") == "all_tasks":
      kwargs["single_bucket"] = True
    audio = config.model.audio
    kwargs["features"] = AudioFeatures(audio.sample_rate, audio.frame_length, audio.frame_step,
                                       audio.num_mel_bins)
    return cls(**kwargs)


def ladder(lengths: Sequence[int], cap: int) -> tuple[int, ...]:
  """The bucket lengths below `cap`, then `cap` itself."""
  return tuple(b for b in lengths if b < cap) + (cap,)


@dataclasses.dataclass(frozen=True)
class Buckets:
  """The batch shapes of one task, rung by rung (empty length tuples: no sequence on that side)."""

  input_lengths: tuple[int, ...]
  target_lengths: tuple[int, ...]
  batch_sizes: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.batch_sizes)

  def rung(self, input_length: int, target_length: int) -> int | None:
    """Lowest rung where both lengths fit; None when one exceeds the task's cap."""
    rung = 0
    for lengths, length in ((self.input_lengths, input_length),
                            (self.target_lengths, target_length)):
      if lengths:
        fits = np.flatnonzero(np.asarray(lengths) >= length)
        if not fits.size:
          return None
        rung = max(rung, int(fits[0]))
    return rung


def for_task(task: Task, config: InputConfig) -> Buckets:
  """The bucket shapes and batch sizes of `task`."""
  inputs, targets = (), ()
  if task.input_modality in ("text", "audio"):
    default = config.text_buckets if task.input_modality == "text" else config.audio_buckets
    inputs = ladder(task.input_buckets or default, task.max_input_length)
  if task.target_modality == "text":
    targets = ladder(task.target_buckets or config.text_buckets, task.max_target_length)
  if config.single_bucket:
    inputs, targets = inputs[-1:], targets[-1:]
  rungs = max(len(inputs), len(targets), 1)
  inputs = inputs + inputs[-1:] * (rungs - len(inputs)) if inputs else ()
  targets = targets + targets[-1:] * (rungs - len(targets)) if targets else ()

  m = config.batch_multiple
  if task.batch_size:
    sizes = (task.batch_size,) * rungs
  elif task.input_modality == "image" or not (inputs or targets):
    sizes = (config.image_batch_size,) * rungs
  else:
    sizes = []
    for r in range(rungs):
      cost = targets[r] if targets else 1
      if inputs:
        per_token = config.audio_frames_per_token if task.input_modality == "audio" else 1
        cost = max(cost, -(-inputs[r] // per_token))
      sizes.append(max(m, config.tokens_per_batch // cost // m * m))
    sizes = tuple(sizes)
  return Buckets(inputs, targets, sizes)


Spec = dict[str, tuple[tuple[int, ...], np.dtype]]


def matches(batch: dict[str, np.ndarray], spec: Spec) -> bool:
  """True when `batch` has exactly the keys, shapes and dtypes of `spec`."""
  return set(batch) == set(spec) and all(
      batch[k].shape == shape and batch[k].dtype == dtype for k, (shape, dtype) in spec.items())


def batch_spec(task: Task, buckets: Buckets, rung: int, config: InputConfig,
               evaluation: bool = False) -> Spec:
  """Key -> (shape, dtype) of a batch of `task` at `rung` (the batch contract of docs/design.md).

  Evaluation batches add `example_mask` bool [B] (False on padding rows) and `example_index`
  int32 [B] (the example's index in the split, -1 on padding rows).
  """
  b = buckets.batch_sizes[rung]
  spec = {}
  if task.input_modality == "text":
    spec["inputs"] = ((b, buckets.input_lengths[rung]), np.dtype(np.int32))  # [B, S]
  elif task.input_modality == "image":
    size = task.image_size
    spec["inputs"] = ((b, size, size, 3), np.dtype(np.float32))  # [B, H, W, 3]
  elif task.input_modality == "audio":
    s = buckets.input_lengths[rung]
    spec["inputs"] = ((b, s, config.features.num_mel_bins), np.dtype(np.float32))  # [B, S, M]
    spec["input_mask"] = ((b, s), np.dtype(bool))  # [B, S]
  else:  # label
    spec["inputs"] = ((b,), np.dtype(np.int32))  # [B]
  if task.target_modality == "text":
    spec["targets"] = ((b, buckets.target_lengths[rung]), np.dtype(np.int32))  # [B, T]
  else:
    spec["targets"] = ((b,), np.dtype(np.int32))  # [B]
  if evaluation:
    spec["example_mask"] = ((b,), np.dtype(bool))
    spec["example_index"] = ((b,), np.dtype(np.int32))
  return spec
