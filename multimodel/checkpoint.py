"""Checkpoints of a run: orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each checkpoint holds three items:
  `state`: params, optimizer state, step, skipped-step count, base RNG key (arrays, sharded);
  `data`:  the input mixture's iterator state (JSON), so a resumed run sees the same batches;
  `meta`:  the config, the task names and the tokenizer (JSON; the tokenizer as base64 bytes).
Nothing is pickled: restoring never executes stored code.
"""

import base64
import json
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


class WorkdirError(RuntimeError):
  """A workdir or checkpoint that cannot be used for this run (nothing in it is touched)."""


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


def meta_for(config, task_names, tokenizer_bytes: bytes | None) -> dict:
  return {
      "config": config_to_json(config),
      "tasks": list(task_names),
      "tokenizer": None if tokenizer_bytes is None else base64.b64encode(tokenizer_bytes).decode(),
  }


def tokenizer_bytes(meta: dict) -> bytes | None:
  return None if meta.get("tokenizer") is None else base64.b64decode(meta["tokenizer"])


def _diff(saved: Any, new: Any, where: str) -> list[str]:
  if isinstance(saved, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(saved) | set(new)):
      out += _diff(saved.get(key, "<absent>"), new.get(key, "<absent>"), f"{where}.{key}")
    return out
  return [] if saved == new else [f"{where}: saved {saved!r}, new {new!r}"]


def check_compatible(saved_meta: dict, config, task_names, workdir) -> None:
  """Refuses to resume a workdir whose model shape or task list differs from this run's."""
  problems = _diff(saved_meta["config"]["model"], config_to_json(config)["model"], "model")
  if sorted(saved_meta["tasks"]) != sorted(task_names):
    problems.append(f"tasks: saved {sorted(saved_meta['tasks'])}, new {sorted(task_names)}")
  if problems:
    raise WorkdirError(
        f"{workdir} holds a run whose config is incompatible with this one; nothing was "
        "overwritten. Use another --workdir, or start from its weights with --init. Differences:\n  "
        + "\n  ".join(problems))


class Checkpoints:
  """Saves every `every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, every: int = 200):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data state, meta) of `step`; arrays placed as `abstract_state`'s shardings say."""
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def close(self) -> None:
    self.manager.close()


def find(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Resolves `--init`-style paths: a workdir (latest step), its `checkpoints/`, or one step."""
  path = pathlib.Path(path).absolute()
  for directory in (path / "checkpoints", path):
    if directory.is_dir():
      steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
      if steps:
        return directory, steps[-1]
  if path.name.isdigit() and (path / "state").is_dir():
    return path.parent, int(path.name)
  raise WorkdirError(f"No checkpoint found at {path} (expected a workdir, its checkpoints/ "
                     "folder, or a numbered checkpoint folder)")


def restore_params(path: str | pathlib.Path) -> tuple[dict, dict]:
  """The parameters of a checkpoint as a flat {path tuple: numpy array}, and its meta."""
  directory, step = find(path)
  manager = ocp.CheckpointManager(directory)
  metadata = manager.item_metadata(step)
  out = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
          lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata["state"])),
      meta=ocp.args.JsonRestore()))
  manager.close()
  flat = {tuple(str(k.key) for k in keys): value
          for keys, value in jax.tree_util.tree_flatten_with_path(out["state"]["params"])[0]}
  return flat, out["meta"]
