"""Checkpoints of a run: orbax `CheckpointManager` under `WORKDIR/checkpoints`.

Each checkpoint holds three items:
  `state`: params, optimizer state, step, skipped-step count, base RNG key, with
           `train.l2sp` > 0 the L2-SP starting point `l2sp`, and with
           `train.loss_weighting="gradnorm"` the GradNorm weights `gradnorm`, and with
           `train.lr_schedule="task"` each task's step count `task_steps` (arrays, sharded);
  `data`:  the input mixture's iterator state (JSON), so a resumed run sees the same batches;
  `meta`:  the config, the task names and the tokenizer (JSON; the tokenizer as base64 bytes).
Nothing is pickled: restoring never executes stored code. `load_run` reads what inference needs
(parameters, config, task names, tokenizer) and skips the optimizer state.
"""

import base64
import dataclasses
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


# Keys whose default changed after they were added: what a config saved without them had.
# `train.eval_no_repeat_ngram` was 0 (no rule) until each task got its own (None).
EARLIER_DEFAULTS = {"train": {"eval_no_repeat_ngram": 0}}


def with_defaults(saved: dict) -> dict:
  """A saved config (JSON) with every key added to the project since at its default.

  A key's default is the behaviour runs had before the key existed (e.g. `model.norm = "post"`,
  and `EARLIER_DEFAULTS`), so an old run resumes, loads and compares as the run it was.
  """
  from multimodel.configs import common  # pylint: disable=import-outside-toplevel

  def merge(default, value):
    if isinstance(default, dict) and isinstance(value, dict):
      return {**default, **{k: merge(default.get(k), v) for k, v in value.items()}}
    return value

  return merge(merge(config_to_json(common.make()), EARLIER_DEFAULTS), saved)


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
  """Refuses to resume a workdir whose model shape, task list or saved-state layout differs.

  The state's layout also depends on `train.freeze` (frozen parameters have no optimizer state),
  on whether `train.l2sp` is on (the L2-SP starting point is kept in the state), on
  `train.loss_weighting` (GradNorm keeps its weights in the state), on `train.lr_schedule` (the
  per-task schedule keeps each task's step count) and on `data.train_examples` (the data
  iterators' state).
  """
  new = config_to_json(config)
  saved = with_defaults(saved_meta["config"])
  problems = _diff(saved["model"], new["model"], "model")
  if sorted(saved_meta["tasks"]) != sorted(task_names):
    problems.append(f"tasks: saved {sorted(saved_meta['tasks'])}, new {sorted(task_names)}")
  saved_train, saved_data = saved["train"], saved["data"]
  if saved_train["freeze"] != new["train"]["freeze"]:
    problems.append(f"train.freeze: saved {saved_train['freeze']!r}, "
                    f"new {new['train']['freeze']!r}")
  if (saved_train["l2sp"] > 0) != (new["train"]["l2sp"] > 0):
    problems.append(f"train.l2sp: saved {saved_train['l2sp']}, new {new['train']['l2sp']}"
                    " (on and off keep different states)")
  for key in ("loss_weighting", "lr_schedule"):
    if saved_train[key] != new["train"][key]:
      problems.append(f"train.{key}: saved {saved_train[key]!r}, new {new['train'][key]!r} "
                      "(they keep different states)")
  if saved_data["train_examples"] != new["data"]["train_examples"]:
    problems.append(f"data.train_examples: saved {saved_data['train_examples']}, "
                    f"new {new['data']['train_examples']}")
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


def checkpoint_steps(directory: str | pathlib.Path) -> list[int]:
  """The steps of the finished checkpoints in a `checkpoints/` folder, ascending."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _subtree_only(state_dir: pathlib.Path, key: str = "params") -> dict[tuple, np.ndarray]:
  """The `key` subtree of a checkpoint's `state` item, as host arrays: nothing else is read.

  The optimizer state next to the parameters is skipped (orbax partial restore). Keys are the
  paths as strings, without the trailing "value" of the saved `nnx.Param` leaves.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(state_dir).tree
    if key not in tree:
      raise WorkdirError(f"The checkpoint {state_dir} holds no {key!r}; it holds {sorted(tree)}")
    saved = tree[key]
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    out = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
        item={key: saved}, restore_args={key: as_numpy}, partial_restore=True))
  finally:
    handler.close()
  flat = {}
  for keys, value in jax.tree_util.tree_flatten_with_path(out[key])[0]:
    path = tuple(str(k.key) for k in keys)
    flat[path[:-1] if path[-1] == "value" else path] = value
  return flat


def restore_params(path: str | pathlib.Path) -> tuple[dict, dict]:
  """The parameters of a checkpoint as a flat {path tuple: numpy array}, and its meta.

  `path` is anything `find` resolves. Path tuples are the `nnx` state paths as strings
  (("encoder", "blocks", "0", "norm", "scale")); the optimizer state is not read.
  """
  directory, step = find(path)
  meta = ocp.JsonCheckpointHandler().restore(directory / str(step) / "meta")
  return _subtree_only(directory / str(step) / "state"), meta


def restore_l2sp(path: str | pathlib.Path) -> tuple[dict, dict]:
  """The L2-SP starting point of a run fine-tuned with `train.l2sp` > 0: (anchor, weight).

  Both are flat {path tuple: numpy array}, like `restore_params`: the anchor w0 of every
  parameter, and its weight (1: pulled toward w0; 0: new or frozen, not pulled).
  """
  directory, step = find(path)
  flat = _subtree_only(directory / str(step) / "state", "l2sp")
  pick = lambda part: {k[1:]: v for k, v in flat.items() if k[0] == part}
  return pick("anchor"), pick("weight")


def param_keys(params: Any) -> list[str]:
  """The "/"-joined path of every leaf of a parameter tree (an `nnx.State` or a pure dict)."""
  return ["/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def params_from_flat(abstract_params: Any, flat: dict[str, Any]) -> Any:
  """`abstract_params`' tree with the arrays of `flat` ({"/"-joined path: array}) as leaves.

  Works on concrete and traced arrays alike (exported programs call it on their inputs).

  Raises:
    WorkdirError: `flat` lacks a parameter of the tree or has one of another shape.
  """
  keys = param_keys(abstract_params)
  leaves = jax.tree.leaves(abstract_params)
  missing = [k for k in keys if k not in flat]
  wrong = [f"{k}: saved {tuple(flat[k].shape)}, model {tuple(a.shape)}"
           for k, a in zip(keys, leaves) if k in flat and tuple(flat[k].shape) != tuple(a.shape)]
  if missing or wrong:
    raise WorkdirError(f"The saved parameters do not fit this model: {len(missing)} missing "
                       f"({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}), "
                       f"{len(wrong)} of another shape ({'; '.join(wrong[:5])})")
  return jax.tree.unflatten(jax.tree.structure(abstract_params), [flat[k] for k in keys])


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config had (the config holds no lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_json(config: dict) -> ml_collections.ConfigDict:
  """The locked config of a checkpoint's meta (inverse of `config_to_json`), keys added since at
  their defaults."""
  out = ml_collections.ConfigDict(_tuples(with_defaults(config)))
  out.lock()
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  """What inference needs of one checkpoint of a run: parameters (no optimizer state) and meta.

  Attributes:
    workdir: the run's folder.
    step: the checkpoint's step.
    params: {"/"-joined parameter path: numpy array}, e.g. "modalities/text/embedding".
    config: the run's locked config.
    task_names: the tasks the run was trained on.
    tokenizer_bytes: the SentencePiece model proto (None for a run without text tasks).
  """

  workdir: pathlib.Path
  step: int
  params: dict[str, np.ndarray]
  config: ml_collections.ConfigDict
  task_names: list[str]
  tokenizer_bytes: bytes | None


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> Run:
  """Loads checkpoint `step` (default: the latest) of the run in `workdir` for inference.

  Raises:
    WorkdirError: no such workdir, no checkpoint in it, or no checkpoint of `step` (the message
      lists the steps there are).
  """
  workdir = pathlib.Path(workdir).absolute()
  if not workdir.is_dir():
    raise WorkdirError(f"No run at {workdir}: the folder does not exist")
  directory = workdir / "checkpoints"
  available = checkpoint_steps(directory)
  if not available:
    raise WorkdirError(f"{workdir} holds no checkpoint (expected numbered folders in {directory})")
  step = available[-1] if step is None else int(step)
  if step not in available:
    raise WorkdirError(f"{workdir} has no checkpoint of step {step}; its steps: {available}")
  flat, meta = restore_params(directory / str(step))
  return Run(workdir=workdir, step=step, params={"/".join(k): v for k, v in flat.items()},
             config=config_from_json(meta["config"]), task_names=list(meta["tasks"]),
             tokenizer_bytes=tokenizer_bytes(meta))
