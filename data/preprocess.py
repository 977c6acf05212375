"""Small dict -> dict ops that turn a task's raw example into model-ready arrays.

`for_task(task, tokenizer, features)` chains them: the task's own `preprocess` (raw TFDS example ->
{"inputs", "targets"} raw values), then one op per modality for each of the two keys:
  image -> float32 [H, W, 3] in [-1, 1] (grayscale tiled to 3 channels; resized and centre-cropped
           to the task's `image_size` when it has one);
  audio -> float32 [F, M] log-mel frames (resampled to the features' rate first);
  text  -> int32 [L] SentencePiece ids (targets end in EOS=1);
  label -> int class index.
No op pads or truncates: the pipeline drops or cuts examples over a task's caps and pads to buckets.

Shape legend: H, W image height and width, F audio frames, M mel bins, L sequence length, N samples.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, TYPE_CHECKING

import numpy as np

from data import tokenizer as tokenizer_lib
from modalities import audio_features, image_features

if TYPE_CHECKING:
  from data.tasks import Task

Example = dict[str, Any]
Op = Callable[[Example], Example]


@dataclasses.dataclass(frozen=True)
class AudioFeatures:
  """Log-mel settings; they must match `config.model.audio` (25 ms windows, 10 ms hops)."""

  sample_rate: int = 16000
  frame_length: int = 400
  frame_step: int = 160
  num_mel_bins: int = 80

  def num_frames(self, num_samples: int) -> int:
    """Frames `log_mel` makes of `num_samples` samples at `sample_rate`."""
    return 1 + max(0, num_samples - self.frame_length) // self.frame_step


def as_text(value: Any) -> str:
  """A TFDS text value (bytes, numpy bytes or str, scalar array of one) as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  return str(value)


resize_and_crop = image_features.resize_and_crop
resample = audio_features.resample


def image(value: Any, size: int | None = None) -> np.ndarray:
  """uint8 [H, W, C] (C = 1 or 3) -> float32 [H', W', 3] in [-1, 1]."""
  return image_features.normalize(np.asarray(value), size)


def audio(value: Any, sample_rate: int, features: AudioFeatures) -> np.ndarray:
  """Waveform [N] (int16, or float in [-1, 1]) at `sample_rate` -> float32 [F, M] log-mel frames."""
  wave = np.asarray(value).reshape(-1)
  if np.issubdtype(wave.dtype, np.integer):
    wave = wave.astype(np.float32) / 32768.0
  wave = resample(wave.astype(np.float32), sample_rate, features.sample_rate)
  return audio_features.log_mel(wave, features.sample_rate, features.frame_length,
                                features.frame_step, features.num_mel_bins)


def text(value: Any, tokenizer: tokenizer_lib.Tokenizer, eos: bool) -> np.ndarray:
  """Text -> int32 [L] ids, with EOS appended when `eos`."""
  ids = tokenizer.encode(as_text(value))
  if eos:
    ids.append(tokenizer_lib.EOS_ID)
  return np.asarray(ids, np.int32)


def label(value: Any, num_classes: int) -> int:
  """A class index in [0, num_classes)."""
  index = int(np.asarray(value))
  if not 0 <= index < num_classes:
    raise ValueError(f"label {index} outside [0, {num_classes})")
  return index


def modality_op(key: str, modality: str, task: "Task",
                tokenizer: tokenizer_lib.Tokenizer | None,
                features: AudioFeatures) -> Op:
  """The op that converts `example[key]` of the given modality."""
  if modality == "image":
    convert = lambda v: image(v, task.image_size)
  elif modality == "audio":
    convert = lambda v: audio(v, task.sample_rate, features)
  elif modality == "text":
    if tokenizer is None:
      raise ValueError(f"task {task.name!r} has text {key} and needs a tokenizer")
    convert = lambda v: text(v, tokenizer, eos=key == "targets")
  elif modality == "label":
    convert = lambda v: label(v, task.num_classes)
  else:
    raise ValueError(f"Unknown modality {modality!r}")

  def op(example: Example) -> Example:
    return {**example, key: convert(example[key])}
  return op


def chain(ops: list[Op]) -> Op:
  """One op applying `ops` in order."""
  def apply(example: Example) -> Example:
    for op in ops:
      example = op(example)
    return example
  return apply


def for_task(task: "Task", tokenizer: tokenizer_lib.Tokenizer | None,
             features: AudioFeatures = AudioFeatures()) -> Callable[[Mapping[str, Any]], Example]:
  """Raw TFDS example -> {"inputs": array, "targets": int32 [T] or int} for `task`."""
  return chain([
      lambda raw: dict(task.preprocess(raw)),
      modality_op("inputs", task.input_modality, task, tokenizer, features),
      modality_op("targets", task.target_modality, task, tokenizer, features),
  ])

