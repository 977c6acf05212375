"""Joint training: `train_and_evaluate(config, workdir)`.

One function in banner sections (mesh, workdir, input, model and optimizer, update step, resume,
loop, final evaluation). The update step is a pure jitted function of (state, batch, rng) with
donated state and explicit shardings; the loss is `objective.loss_fn`, shared with evaluation.

Resume order: the workdir's latest checkpoint, then `init` (weights only), then scratch.
Fine-tuning from `init` (docs/transfer.md): `train.freeze` names parameters that never change and
`train.l2sp` pulls the copied parameters toward their starting point; both are part of the step.
With `train.loss_weighting="gradnorm"` the all-tasks step learns its loss weights
(`multimodel/gradnorm.py`); they are part of the state, hence of checkpoints.
"""

import dataclasses
import functools
import importlib
import logging
import os
import pathlib
import signal
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from data import mixture as mixture_lib
from data import tasks as tasks_lib
from data.buckets import InputConfig
from data.tokenizer import Tokenizer
from multimodel import (checkpoint, evaluation, gradnorm as gradnorm_lib, objective, optim,
                        sharding, writer)
from multimodel.model import MultiModel, TaskSpec

log = logging.getLogger(__name__)


LOSS_WEIGHTINGS = ("mixture", "gradnorm")  # Values of `train.loss_weighting`.


class NonFiniteError(RuntimeError):
  """Too many steps in a row had a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Devices.

def maybe_initialize_distributed() -> None:
  """`jax.distributed.initialize()` when a cluster launcher's variables are set."""
  cluster_vars = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                  "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
  if any(v in os.environ for v in cluster_vars) and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh(train_cfg) -> jax.sharding.Mesh:
  """Mesh with axes ("data", "expert") over every device."""
  devices = jax.devices()
  expert = train_cfg.mesh_expert
  data = train_cfg.mesh_data if train_cfg.mesh_data > 0 else len(devices) // expert
  if data * expert != len(devices):
    raise ValueError(f"mesh data={data} x expert={expert} does not cover the {len(devices)} devices")
  # Auto axes: XLA propagates shardings inside the step from the explicit in/out shardings.
  return jax.make_mesh((data, expert), ("data", "expert"), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def param_shardings(abstract_params, mesh, rules=sharding.DEFAULT_RULES):
  """NamedShardings of the parameters from their logical axes and the rules."""
  with nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(abstract_params)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def shard_batch(batch: Mapping[str, np.ndarray], mesh) -> dict:
  """Host arrays -> global arrays split along the batch axis over "data"."""
  data_sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
          for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# The update step.

def new_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
  """The state `train_step` takes, at step 0: params, optimizer state, step and skipped-step
  counters, and the run's RNG key data (the trainer adds the state of its optional features)."""
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "skipped": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(jax.random.key(seed))}


def train_step(state: dict, batches: dict, rng: jax.Array, weights: jax.Array | None, *,
               graphdef, tx: optax.GradientTransformation,
               tasks: tuple[tuple[str, TaskSpec], ...], frozen: tuple[bool, ...] | None = None,
               l2sp: float = 0.0, gradnorm: tuple | None = None,
               task_schedule: tuple | None = None,
               ctc_char_table: np.ndarray | None = None) -> tuple[dict, dict]:
  """One optimizer step on the weighted sum of the losses of `tasks` (one task: weight 1).

  A step whose loss or gradient is not finite leaves params, optimizer state and GradNorm weights
  unchanged and counts itself in `state["skipped"]`.

  Args:
    weights: [len(tasks)] loss weights; None with `gradnorm`, which uses the state's weights.
    frozen: per parameter leaf (in tree order), True when it is frozen: it is returned unchanged,
      bit for bit, and its gradient is left out of the gradient norm (`tx` gives it no update).
    l2sp: alpha of the L2-SP penalty alpha / 2 * sum_i c_i ||w_i - w0_i||^2, with w0 and c from
      `state["l2sp"]` ("anchor" and "weight"); added to the loss and reported as `l2sp_loss`.
    gradnorm: None, or (alpha, lr, shared) of GradNorm (`multimodel/gradnorm.py`), `shared`
      marking the parameter leaves of W: the loss weights are `state["gradnorm"]["weights"]`
      (tasks in sorted order), and the step updates them (the loss uses those from before).
    task_schedule: None (`tx` applies the learning rate at its own count), or (schedule, ids) of
      `train.lr_schedule="task"`: `tx` gives Adam's directions, the rate is `schedule` at the
      count `state["task_steps"]` (one per task of the run, sorted) holds for the step's tasks
      `ids` (equal counts with the all-tasks step), and those counts advance.
    ctc_char_table: the run's `objective.ctc_char_table` when its CTC loss is over characters.
  """

  def task_loss(params, i):
    name, spec = tasks[i]
    return objective.loss_fn(nnx.merge(graphdef, params), spec, batches[name], train=True,
                             rngs=nnx.Rngs(dropout=jax.random.fold_in(rng, i)),
                             ctc_char_table=ctc_char_table)

  def l2sp_penalty(params):
    return optim.l2sp_penalty(params, state["l2sp"]["anchor"], state["l2sp"]["weight"], l2sp)

  def total_loss(params):
    total, metrics = 0.0, {}
    for i, (name, _) in enumerate(tasks):
      loss, metrics[name] = task_loss(params, i)
      total = total + weights[i] * loss
    penalty = None
    if l2sp:
      penalty = l2sp_penalty(params)
      total = total + penalty
    return total, (metrics, penalty)

  params = state["params"]
  if gradnorm is None:
    (loss, (metrics, penalty)), grads = jax.value_and_grad(total_loss, has_aux=True)(params)
  else:
    # One gradient per task (each task runs its own forward pass anyway, so this costs about the
    # gradient of the sum); the step's gradient is their weighted sum.
    alpha, lr, shared = gradnorm
    weights = state["gradnorm"]["weights"]
    loss, grads, metrics, losses, norms = 0.0, None, {}, [], []
    for i, (name, _) in enumerate(tasks):
      (task_loss_i, metrics[name]), g = jax.value_and_grad(
          functools.partial(task_loss, i=i), has_aux=True)(params)
      losses.append(task_loss_i)
      norms.append(optax.tree.norm([x for x, s in zip(jax.tree.leaves(g), shared) if s]))
      loss = loss + weights[i] * task_loss_i
      weighted = jax.tree.map(lambda x: weights[i] * x, g)
      grads = weighted if grads is None else jax.tree.map(jnp.add, grads, weighted)
    penalty = None
    if l2sp:
      penalty, penalty_grads = jax.value_and_grad(l2sp_penalty)(params)
      loss, grads = loss + penalty, jax.tree.map(jnp.add, grads, penalty_grads)
    losses, norms = jnp.stack(losses), jnp.stack(norms)
    initial = state["gradnorm"]["initial_loss"]
    initial = jnp.where(jnp.isnan(initial), losses, initial)  # Set by the first finite step.
    task_weights = {"weights": gradnorm_lib.update_weights(weights, norms, losses, initial,
                                                           alpha=alpha, lr=lr),
                    "initial_loss": initial}
  if len(tasks) > 1:
    for i, (name, _) in enumerate(tasks):
      metrics[name]["task_weight"] = weights[i]
  trained = [g for i, g in enumerate(jax.tree.leaves(grads)) if not (frozen and frozen[i])]
  grad_norm = optax.tree.norm(trained)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if gradnorm is not None:  # A non-finite gradient on a frozen W must not reach the weights.
    finite = finite & jnp.isfinite(norms).all()
  if task_schedule is not None:
    schedule, ids = task_schedule
    ids = jnp.asarray(ids)

  def update(params_and_opt_state):
    params, opt_state = params_and_opt_state
    updates, opt_state = tx.update(grads, opt_state, params)
    if task_schedule is not None:
      updates = optim.apply_learning_rate(updates, schedule(state["task_steps"][ids].max()))
    new_params = optax.apply_updates(params, updates)
    if frozen:  # The old arrays themselves: not even the sign of a zero can change.
      old, new = jax.tree.leaves(params), jax.tree.leaves(new_params)
      new_params = jax.tree.unflatten(jax.tree.structure(new_params),
                                      [o if f else n for o, n, f in zip(old, new, frozen)])
    return new_params, opt_state

  # A branch, not a select of old and new: with both alive, XLA copies the Adam moments before
  # updating them in place (docs/performance.md, "Page faults and the optimizer's update").
  new_params, opt_state = jax.lax.cond(finite, update, lambda old: old,
                                       (params, state["opt_state"]))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = dict(state, params=new_params, opt_state=opt_state, step=state["step"] + 1,
                   skipped=state["skipped"] + (~finite).astype(jnp.int32))
  if gradnorm is not None:
    new_state["gradnorm"] = keep(task_weights, state["gradnorm"])
  if task_schedule is not None:
    new_state["task_steps"] = keep(state["task_steps"].at[ids].add(1), state["task_steps"])
  out = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "tasks": metrics}
  if penalty is not None:
    out["l2sp_loss"] = penalty
  return new_state, out


# ---------------------------------------------------------------------------------------------
# Host-side bookkeeping of metrics between log steps.

@dataclasses.dataclass
class _Window:
  """Sums of per-task metrics since the last log step."""

  sums: dict = dataclasses.field(default_factory=dict)
  examples: int = 0
  l2sp: list = dataclasses.field(default_factory=list)
  start: float = dataclasses.field(default_factory=time.time)

  def add(self, task_metrics: dict, examples: int, grad_norm: float,
          l2sp_loss: float | None = None) -> None:
    """One finite step: its tasks' metrics, its examples, its gradient's global norm (before
    clipping; credited to each of the step's tasks)."""
    self.examples += examples
    if l2sp_loss is not None:
      self.l2sp.append(float(l2sp_loss))
    for task, m in task_metrics.items():
      s = self.sums.setdefault(task, {"steps": 0, "loss": 0.0, "nll": 0.0, "correct": 0.0,
                                      "weight": 0.0, "moe_loss": 0.0, "grad_norm": 0.0,
                                      "load": {}, "dropped": {}})
      s["steps"] += 1
      s["grad_norm"] += float(grad_norm)
      for key in ("task_weight", "ctc_loss"):  # All-tasks step's weight; audio tasks' CTC.
        if key in m:
          s[key] = s.get(key, 0.0) + float(m[key])
      s["loss"] += float(m["task_loss"])
      s["moe_loss"] += float(m["moe_loss"])
      for key in ("nll", "correct", "weight"):
        s[key] += float(m[key])
      for layer, load in m["expert_load"].items():
        s["load"][layer] = s["load"].get(layer, 0.0) + np.asarray(load, np.float64)
      for layer, dropped in m["expert_dropped"].items():
        s["dropped"][layer] = s["dropped"].get(layer, 0.0) + float(dropped)

  def record(self) -> dict:
    seconds = max(time.time() - self.start, 1e-9)
    out = {"examples_per_second": self.examples / seconds, "loss": {}, "log_perplexity": {},
           "token_accuracy": {}, "moe_loss": {}, "grad_norm": {}, "expert_load": {},
           "expert_dropped": {}, "steps": {}}
    if self.l2sp:
      out["l2sp_loss"] = sum(self.l2sp) / len(self.l2sp)
    for task, s in self.sums.items():
      n, w = s["steps"], max(s["weight"], 1.0)
      out["loss"][task] = s["loss"] / n
      out["log_perplexity"][task] = s["nll"] / w
      out["token_accuracy"][task] = s["correct"] / w
      out["moe_loss"][task] = s["moe_loss"] / n
      out["grad_norm"][task] = s["grad_norm"] / n
      out["steps"][task] = n
      for key in ("task_weight", "ctc_loss"):
        if key in s:
          out.setdefault(key, {})[task] = s[key] / n
      out["expert_load"][task] = {k: (v / n).round(5).tolist() for k, v in s["load"].items()}
      out["expert_dropped"][task] = {k: round(v / n, 5) for k, v in s["dropped"].items()}
    return out


def _examples(batches: dict) -> int:
  return sum(len(b["targets"]) for b in batches.values())


# ---------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, *, init: str | None = None,
                       mixture: mixture_lib.Mixture | None = None,
                       progress: bool = True) -> dict:
  """Trains `config` in `workdir` (resuming it if it holds a run); returns the final results.

  Args:
    config: a locked project config (see `multimodel/configs`).
    workdir: everything of the run goes here: config, checkpoints, metrics, plots, eval.
    init: a checkpoint (or workdir) to warm-start the weights from, when `workdir` is new.
    mixture: a ready input mixture (tests, custom data); by default built from `config.data`.
    progress: show a progress bar.
  """
  train_cfg = config.train
  workdir = pathlib.Path(workdir).absolute()
  maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  if train_cfg.compilation_cache and not jax.config.jax_compilation_cache_dir:
    # Resumed runs and repeated configs reuse compiled steps instead of compiling them again.
    jax.config.update("jax_compilation_cache_dir",
                      str(pathlib.Path(train_cfg.compilation_cache).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

  # ---- Workdir: refuse an incompatible run before anything is written. ----
  for module in filter(None, (m.strip() for m in config.data.imports.split(","))):
    importlib.import_module(module)  # Registers custom tasks.
  if config.data.data_dir:
    os.environ["MULTIMODEL_DATA_DIR"] = config.data.data_dir
  task_list = tasks_lib.resolve(_task_names(config)) if mixture is None else list(
      mixture.tasks.values())
  task_names = [t.name for t in task_list]

  # Fine-tuning settings (they need only the config).
  abstract_model = nnx.eval_shape(lambda: MultiModel(config.model, rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  frozen = optim.freeze_mask(checkpoint.param_keys(abstract_params), train_cfg.freeze)
  if train_cfg.l2sp < 0:
    raise ValueError(f"train.l2sp must be >= 0, got {train_cfg.l2sp}")
  if train_cfg.eval_decode not in (None, "greedy", "beam", "none") or (
      train_cfg.eval_beam_size is not None and train_cfg.eval_beam_size < 1):
    raise ValueError(f"train.eval_decode must be 'greedy', 'beam' or 'none' (unset: each task's "
                     f"own), got {train_cfg.eval_decode!r}; train.eval_beam_size >= 1 (unset: "
                     f"the task's own), got {train_cfg.eval_beam_size}")
  if (train_cfg.eval_no_repeat_ngram or 0) < 0:  # Checked now, not after training.
    raise ValueError(f"train.eval_no_repeat_ngram must be >= 0 (0: off; unset: each task's own), "
                     f"got {train_cfg.eval_no_repeat_ngram}")
  if not 0.0 <= train_cfg.eval_ctc_weight <= 1.0 or (train_cfg.eval_ctc_weight > 0 and (
      config.model.ctc_weight <= 0 or config.model.ctc_units == "pieces")):
    raise ValueError(f"train.eval_ctc_weight={train_cfg.eval_ctc_weight} must be in [0, 1], and "
                     f"above 0 only with a CTC head over letters (model.ctc_weight > 0, got "
                     f"{config.model.ctc_weight}; model.ctc_units 'chars' or 'chars_and_spaces', "
                     f"got {config.model.ctc_units!r})")
  if (train_cfg.l2sp > 0 and not init
      and not checkpoint.checkpoint_steps(workdir / "checkpoints")):
    raise ValueError(f"train.l2sp={train_cfg.l2sp} pulls the weights toward those of the --init "
                     "checkpoint, and no --init was given")
  use_gradnorm = _check_loss_weighting(train_cfg, train_cfg.step_mode if mixture is None
                                       else mixture.mode)
  per_task_lr = optim.per_task_schedule(train_cfg)
  optim.schedule_args(train_cfg)  # A bad cool-down fails now, not at the first step.

  ckpts = checkpoint.Checkpoints(workdir, keep=train_cfg.keep_checkpoints,
                                 every=train_cfg.checkpoint_every)
  latest = ckpts.latest_step()
  saved_meta = ckpts.meta(latest) if latest is not None else None
  if saved_meta is not None:
    checkpoint.check_compatible(saved_meta, config, task_names, workdir)
  init_params, init_meta = checkpoint.restore_params(init) if init and latest is None else (
      None, None)

  # ---- Input. ----
  tokenizer = _tokenizer(task_list, saved_meta or init_meta)
  if mixture is None:
    mixture = mixture_lib.Mixture(
        task_list, tokenizer, InputConfig.from_config(config), strategy=config.data.mixture,
        mode=train_cfg.step_mode, temperature=config.data.temperature,
        tau=config.data.adaptive_tau, loss_decay=config.data.adaptive_decay,
        weights=_weights(config.data.weights),
        seed=train_cfg.seed, train_examples=config.data.train_examples)
  if tokenizer is not None and config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {tokenizer.vocab_size} pieces; "
                     f"set --config.model.vocab_size={tokenizer.vocab_size}, or train a "
                     f"tokenizer of {config.model.vocab_size} pieces for new runs: python -m "
                     f"data.prepare --retrain_tokenizer --vocab_size {config.model.vocab_size}")
  meta = checkpoint.meta_for(config, task_names, tokenizer and tokenizer.to_bytes())

  # ---- Mesh, model and optimizer. ----
  mesh = make_mesh(train_cfg)
  params_structure = jax.tree.structure(abstract_params)
  tx = optim.make(train_cfg, config.model.d_model,
                  frozen=jax.tree.unflatten(params_structure, frozen))
  params_sharding = param_shardings(abstract_params, mesh)
  replicated = NamedSharding(mesh, P())

  def init_state():
    model = MultiModel(config.model, rngs=nnx.Rngs(train_cfg.seed))
    params = nnx.state(model, nnx.Param)
    state = new_state(params, tx, train_cfg.seed)
    if train_cfg.l2sp > 0:  # Filled by the warm start; kept in checkpoints for exact resume.
      state["l2sp"] = {"anchor": jax.tree.map(jnp.zeros_like, params),
                       "weight": jax.tree.map(lambda _: jnp.zeros((), jnp.float32), params)}
    if use_gradnorm:  # Not copied by a warm start: it starts afresh for this run's tasks.
      state["gradnorm"] = gradnorm_lib.init(len(task_names))
    if per_task_lr:  # Steps of each task (sorted names) so far: where its schedule stands.
      state["task_steps"] = jnp.zeros(len(task_names), jnp.int32)
    return state

  abstract_state = jax.eval_shape(init_state)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  state_sharding["params"] = params_sharding
  state_sharding["opt_state"] = _opt_state_sharding(abstract_state["opt_state"], params_sharding,
                                                    replicated)
  if "l2sp" in abstract_state:
    state_sharding["l2sp"]["anchor"] = params_sharding
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sharding)

  # ---- Resume: workdir checkpoint, then --init weights, then scratch. ----
  if latest is not None:
    state, data_state, _ = ckpts.restore(latest, abstract_state)
    mixture.set_state(data_state)
    log.info("Resumed %s at step %d", workdir, latest)
  else:
    state = jax.jit(init_state, out_shardings=state_sharding)()
    if init:
      state = _warm_start(state, init, init_params, params_sharding, frozen, state_sharding)
    if is_main:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  # ---- Update step: one jitted program per (task set, bucket shape). ----
  step_fns = {}
  # GradNorm's W: the encoder's last conv block, the last layer that every task passes through.
  gradnorm = (float(train_cfg.gradnorm_alpha), float(train_cfg.gradnorm_lr), tuple(
      gradnorm_lib.shared_mask(checkpoint.param_keys(abstract_params),
                               config.model.encoder_blocks))) if use_gradnorm else None

  sorted_names = sorted(task_names)
  schedule = optim.schedule(train_cfg, config.model.d_model)
  char_table = objective.run_ctc_char_table(config.model, tokenizer)

  def step_fn(names: tuple[str, ...]):
    if names not in step_fns:
      specs = tuple((n, evaluation.task_spec(mixture.tasks[n])) for n in names)
      task_schedule = (schedule, tuple(sorted_names.index(n) for n in names)) if per_task_lr \
          else None
      step_fns[names] = jax.jit(
          functools.partial(train_step, graphdef=graphdef, tx=tx, tasks=specs,
                            frozen=tuple(frozen) if any(frozen) else None,
                            l2sp=float(train_cfg.l2sp), gradnorm=gradnorm,
                            task_schedule=task_schedule, ctc_char_table=char_table),
          in_shardings=(state_sharding, NamedSharding(mesh, P("data")), replicated, replicated),
          out_shardings=(state_sharding, replicated), donate_argnums=(0,))
    return step_fns[names]

  # ---- Loop. ----
  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  base_rng = jax.random.wrap_key_data(np.asarray(jax.device_get(state["rng"])))  # Not donated.
  step = int(jax.device_get(state["step"]))
  metrics_writer = writer.MetricsWriter(workdir, enabled=is_main, resume_step=step or None)
  total = train_cfg.steps
  bar = _progress(total, step, progress and is_main)
  window, in_a_row = _Window(), 0
  try:
    while step < total:
      item = next(mixture)
      batches = dict([item]) if isinstance(item, tuple) else dict(item)
      names = tuple(sorted(batches))
      weights = None if gradnorm else _step_weights(mixture, names)
      rng = jax.random.fold_in(base_rng, step)
      state, metrics = step_fn(names)(state, {n: shard_batch(b, mesh) for n, b in batches.items()},
                                      rng, weights)
      metrics = jax.device_get(metrics)
      step += 1
      if metrics["finite"]:
        in_a_row = 0
        window.add(metrics["tasks"], _examples(batches), metrics["grad_norm"],
                   metrics.get("l2sp_loss"))
        for name in names:
          mixture.report_loss(name, float(metrics["tasks"][name]["task_loss"]))
      else:
        in_a_row += 1
        log.warning("step %d: non-finite loss or gradient on task(s) %s; step skipped",
                    step, ",".join(names))
        if in_a_row >= train_cfg.max_nonfinite_in_row:
          raise NonFiniteError(
              f"{in_a_row} steps in a row had a non-finite loss or gradient; the last at step "
              f"{step} on task(s) {', '.join(names)}. Parameters and checkpoints hold the last "
              "finite state.")
      bar.update(1)
      bar.set_postfix(loss=f"{float(metrics['loss']):.3f}", task=names[0] if len(names) == 1
                      else "all")
      if step % train_cfg.log_every == 0 or step == total:
        record = window.record()
        record["learning_rate"] = _logged_rates(train_cfg, config.model.d_model, step, (
            dict(zip(sorted_names, jax.device_get(state["task_steps"]).tolist()))
            if per_task_lr else None))
        record["skipped_steps"] = int(jax.device_get(state["skipped"]))
        record["mixture"] = mixture.probabilities()
        metrics_writer.write(step, record)
        bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                        ex_per_s=f"{record['examples_per_second']:.1f}")
        window = _Window()
      if ckpts.should_save(step) or step == total or stop["signal"]:
        ckpts.save(step, state, mixture.get_state(), meta)
      if stop["signal"]:
        log.warning("Stopped by signal %s at step %d; checkpoint saved.", stop["signal"], step)
        raise SystemExit(128 + stop["signal"])
  finally:
    bar.close()
    metrics_writer.close()
    signal.signal(signal.SIGTERM, previous)

  # ---- Final evaluation, one task at a time. ----
  results = {}
  if train_cfg.eval_max_examples >= 0:
    params = state["params"]
    results = evaluation.evaluate_tasks(
        graphdef, params, list(mixture.tasks.values()), tokenizer, InputConfig.from_config(config),
        split=train_cfg.eval_split, max_examples=train_cfg.eval_max_examples,
        decode=train_cfg.eval_decode, beam_size=train_cfg.eval_beam_size,
        no_repeat_ngram=train_cfg.eval_no_repeat_ngram,
        ctc_weight=train_cfg.eval_ctc_weight, workdir=workdir if is_main else None)
    if is_main:
      print(evaluation.format_table(results), flush=True)
  if is_main and train_cfg.plot:
    from multimodel import plot  # matplotlib only when plotting
    plot.plot_run(workdir)
  ckpts.close()
  return results


# ---------------------------------------------------------------------------------------------
# Helpers of train_and_evaluate.

def _task_names(config) -> list[str]:
  spec = config.data.tasks
  if spec in ("", "installed"):
    names = [t.name for t in tasks_lib.installed_tasks()]
    if not names:
      raise ValueError("No embedded task is prepared: run `python -m data.prepare` first, or name "
                       "tasks with --config.data.tasks=a,b")
    return names
  return [n.strip() for n in spec.split(",") if n.strip()]


def _weights(spec: str) -> dict[str, float]:
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, value = item.partition("=")
    try:
      out[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"data.weights: expected 'task=number', got {item!r}") from None
  return out


def _tokenizer(task_list, saved_meta) -> Tokenizer | None:
  """The run's tokenizer: the one saved in the workdir's checkpoint, else the prepared one."""
  uses_text = any("text" in (t.input_modality, t.target_modality) for t in task_list)
  if saved_meta is not None and saved_meta.get("tokenizer"):
    return Tokenizer.from_bytes(checkpoint.tokenizer_bytes(saved_meta))
  return Tokenizer.load() if uses_text else None


def _check_loss_weighting(train_cfg, step_mode: str) -> bool:
  """Validates `train.loss_weighting` and its settings; True when it is "gradnorm"."""
  if train_cfg.loss_weighting not in LOSS_WEIGHTINGS:
    raise ValueError(f"train.loss_weighting={train_cfg.loss_weighting!r}; valid values: "
                     f"{LOSS_WEIGHTINGS}")
  if train_cfg.loss_weighting != "gradnorm":
    return False
  if step_mode != "all_tasks":
    raise ValueError(f"train.loss_weighting='gradnorm' weighs the tasks summed in one step, so it "
                     f"needs train.step_mode='all_tasks', got train.step_mode={step_mode!r}")
  if train_cfg.gradnorm_alpha < 0 or train_cfg.gradnorm_lr <= 0:
    raise ValueError(f"GradNorm needs train.gradnorm_alpha >= 0 and train.gradnorm_lr > 0, got "
                     f"{train_cfg.gradnorm_alpha} and {train_cfg.gradnorm_lr}")
  return True


def _logged_rates(train_cfg, d_model: int, step: int, task_steps: dict[str, int] | None):
  """The learning rate of the last step; with `lr_schedule="task"` that of each task's last step
  ({task: rate}, tasks not yet trained left out). Plain Python: nothing compiles."""
  if task_steps is None:
    return optim.rate(train_cfg, d_model, step - 1)
  rate = functools.partial(optim.noam_rate, train_cfg.learning_rate, d_model,
                           train_cfg.warmup_steps)
  return {name: rate(count - 1) for name, count in task_steps.items() if count > 0}


def _step_weights(mixture, names) -> jnp.ndarray:
  """Loss weights of a step: 1 for one task; the mixture's rates for the all-tasks step."""
  if len(names) == 1:
    return jnp.ones((1,), jnp.float32)
  probs = mixture.probabilities()
  w = np.array([probs[n] for n in names], np.float32)
  return jnp.asarray(w / w.sum() * len(names))


def _opt_state_sharding(abstract_opt_state, params_sharding, replicated):
  """Optimizer moments are sharded like the parameters; scalars (counts) are replicated.

  Moments of frozen parameters are `optax.MaskedNode`s (no arrays) and stay so.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)

  def like_params(subtree):
    if isinstance(subtree, nnx.State) and (
        jax.tree.structure(subtree, is_leaf=masked).num_leaves
        == jax.tree.structure(params_sharding).num_leaves):
      return jax.tree.map(lambda s, a: a if masked(a) else s, params_sharding, subtree,
                          is_leaf=masked)
    return jax.tree.map(lambda _: replicated, subtree)

  return jax.tree.map(like_params, abstract_opt_state,
                      is_leaf=lambda x: isinstance(x, nnx.State))


def _warm_start(state, init, saved, params_sharding, frozen, state_sharding):
  """Copies every parameter of the `init` checkpoint whose path and shape match this model's.

  `saved` holds the checkpoint's parameters ({path tuple: array}). With L2-SP on, the copied
  parameters that are not frozen become its anchor w0 (weight 1); the others get weight 0.
  """
  saved = {"/".join(key): value for key, value in saved.items()}
  params = state["params"]
  keys, leaves = checkpoint.param_keys(params), jax.tree.leaves(params)
  fits = [k in saved and saved[k].shape == a.shape for k, a in zip(keys, leaves)]
  new_leaves = [saved[k] if fit else a for k, a, fit in zip(keys, leaves, fits)]
  structure = jax.tree.structure(params)
  params = jax.device_put(jax.tree.unflatten(structure, new_leaves), params_sharding)
  kept = [k for k, fit in zip(keys, fits) if not fit]
  log.info("Warm start from %s: %d parameter arrays copied, %d kept from initialisation%s",
           init, len(keys) - len(kept), len(kept), f" ({', '.join(kept[:8])}...)" if kept else "")
  state = dict(state, params=params)
  if "l2sp" in state:
    anchored = [fit and not f for fit, f in zip(fits, frozen)]
    if not any(anchored):
      raise ValueError(f"train.l2sp: no trainable parameter of this model was copied from {init} "
                       "(none has a matching path and shape), so there is nothing to anchor")
    # Host arrays put on the devices again: the anchor never shares a buffer with the params.
    anchor = [saved[k] if a else np.zeros(x.shape, x.dtype)
              for k, x, a in zip(keys, leaves, anchored)]
    weight = [np.float32(a) for a in anchored]
    state["l2sp"] = jax.device_put(
        {"anchor": jax.tree.unflatten(structure, anchor),
         "weight": jax.tree.unflatten(structure, weight)}, state_sharding["l2sp"])
    log.info("L2-SP: %d parameter arrays anchored at their --init values", sum(anchored))
  return state


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
