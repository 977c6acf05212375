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
  """Appends records to metrics.jsonl and TensorBoard; only process 0 writes.

  A run resumed at step s (its last checkpoint) may have logged past s before it stopped: those
  records are dropped from metrics.jsonl, and a SessionLog START event at s + 1 makes TensorBoard
  discard its events from s + 1 on (its `purge_orphaned_data`), so that the steps trained again
  appear once.
  """

  def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if resume_step is not None and self.path.exists():
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
      self.events = EventFileWriter(str(pathlib.Path(workdir) / "tensorboard"))
      if resume_step is not None:
        self.events.add_event(event_pb2.Event(
            wall_time=time.time(), step=resume_step + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))

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
