"""Run records: `WORKDIR/metrics.jsonl` (one JSON object per log step) and TensorBoard events.

TensorBoard events are written with tensorboard's own event writer (no TensorFlow import).
"""

import json
import math
import pathlib
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


def _scalars(record: dict, prefix: str = ""):
  """Flattens nested dicts of numbers into ("a/b", value) pairs; lists become "a/b/0", ..."""
  for key, value in record.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _scalars(value, name + "/")
    elif isinstance(value, (list, tuple)):
      yield from _scalars({str(i): v for i, v in enumerate(value)}, name + "/")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield name, float(value)


class MetricsWriter:
  """Appends records to metrics.jsonl and TensorBoard; only process 0 writes."""

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.events = EventFileWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **record}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    values = [summary_pb2.Summary.Value(tag=name, simple_value=value)
              for name, value in _scalars(record) if name != "step" and math.isfinite(value)]
    self.events.add_event(event_pb2.Event(wall_time=time.time(), step=step,
                                          summary=summary_pb2.Summary(value=values)))
    self.events.flush()

  def close(self) -> None:
    if self.enabled:
      self.events.close()


def read(workdir: str | pathlib.Path) -> list[dict]:
  """The records of metrics.jsonl, in order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
