"""Compile accounting of joint training: how many programs it compiles, and when.

    python -m benchmarks.compile [--config tiny] [--tasks image_mnist5k,translate_en_fr]
                                 [--text_buckets 32,128] [--steps 40] [--dtype float32]
                                 [--step_mode one_task|all_tasks]

Runs the real `trainer.train_and_evaluate` (the loop of `train.py`, checkpoints and metric logs
included, final evaluation and plots off) in a fresh workdir with the persistent compilation cache
disabled, and counts XLA compilations from JAX's own records: the `/jax/core/compile/
backend_compile_duration` monitoring event (one per backend compile, with the function's name) and
the "Compiling ... with global shapes and types" log records of `jax_log_compiles` (name and
argument shapes). Every compile is attributed to the step during which it happened.

A step is a warm-up step when it is the first step of its signature (task set and batch shapes);
every later step of a signature must compile nothing. Prints the compiles per phase and the programs
compiled, then one JSON line with `train_step_programs` (one per signature), `compiles_in_warmup`,
`compiles_after_warmup`, `recompiles_after_warmup` (compiles in a repeated-signature step of the
train step or of a program compiled before; must be 0) and `first_compiles_after_warmup` (small
host-side programs compiled once at their first use, e.g. at the first log or checkpoint step).
"""

import argparse
import collections
import json
import logging
import tempfile
import time

import jax
import numpy as np

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileLog(logging.Handler):
  """Collects compile events (monitoring) and their argument signatures (log records)."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.step = -1  # -1: before the first step (setup).
    self.events = []  # {"step", "name", "seconds", "signature"}
    self._pending_signature = {}

  def emit(self, record: logging.LogRecord) -> None:
    msg = record.msg if isinstance(record.msg, str) else ""
    if msg.startswith("Compiling") and record.args:
      name, avals = record.args[0], record.args[1]
      self._pending_signature[str(name)] = str(avals)

  def on_event(self, event: str, seconds: float, **kwargs) -> None:
    if event != COMPILE_EVENT:
      return
    name = str(kwargs.get("fun_name", "?"))
    self.events.append({"step": self.step, "name": name, "seconds": seconds,
                        "signature": self._pending_signature.pop(name, "")})


class CountingMixture:
  """Wraps a `Mixture`: tells the compile log which step is running, and records signatures."""

  def __init__(self, mixture, log: CompileLog):
    self._mixture, self._log = mixture, log
    self.signatures = []  # per step: (task names, ((key, shape), ...) per task)

  def __getattr__(self, name):
    return getattr(self._mixture, name)

  def __iter__(self):
    return self

  def __next__(self):
    item = next(self._mixture)
    batches = dict([item]) if isinstance(item, tuple) else dict(item)
    self.signatures.append(tuple(
        (name, tuple((k, np.asarray(v).shape) for k, v in sorted(batches[name].items())))
        for name in sorted(batches)))
    self._log.step = len(self.signatures) - 1
    return item


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="tiny", help="tiny | default | paper")
  parser.add_argument("--tasks", default="image_mnist5k,translate_en_fr")
  parser.add_argument("--text_buckets", default="32,128",
                      help="comma-separated bucket lengths of text (fewer buckets: fewer programs)")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--step_mode", choices=["one_task", "all_tasks"], default="one_task",
                      help="train.step_mode (all_tasks: one batch shape per task)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args(argv)

  import importlib  # pylint: disable=import-outside-toplevel
  from data import mixture as mixture_lib  # pylint: disable=import-outside-toplevel
  from data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  from data.buckets import InputConfig  # pylint: disable=import-outside-toplevel
  from data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
  from multimodel import trainer  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f"multimodel.configs.{args.config}").get_config()
  config.model.dtype = args.dtype
  config.data.tasks = args.tasks
  config.data.text_buckets = tuple(int(b) for b in args.text_buckets.split(","))
  config.train.steps = args.steps
  config.train.step_mode = args.step_mode
  config.train.log_every = max(args.steps // 4, 1)
  config.train.checkpoint_every = max(args.steps // 2, 1)
  config.train.eval_max_examples = -1  # No final evaluation: training only.
  config.train.plot = False
  config.train.compilation_cache = ""  # Every program is really compiled.
  jax.config.update("jax_enable_compilation_cache", False)

  log = CompileLog()
  jax.config.update("jax_log_compiles", True)
  for name in ("jax._src.interpreters.pxla", "jax._src.dispatch"):
    logger = logging.getLogger(name)
    logger.addHandler(log)
    logger.propagate = False  # Counted here, not printed.
  jax.monitoring.register_event_duration_secs_listener(log.on_event)

  task_list = tasks_lib.resolve(args.tasks)
  needs_text = any("text" in (t.input_modality, t.target_modality) for t in task_list)
  mixture = CountingMixture(mixture_lib.Mixture(
      task_list, Tokenizer.load() if needs_text else None, InputConfig.from_config(config),
      strategy=config.data.mixture, mode=config.train.step_mode,
      temperature=config.data.temperature, seed=config.train.seed), log)
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    trainer.train_and_evaluate(config, workdir, mixture=mixture, progress=False)
  wall = time.perf_counter() - start
  jax.config.update("jax_log_compiles", False)

  seen, warmup = set(), []
  for signature in mixture.signatures:
    warmup.append(signature not in seen)
    seen.add(signature)
  phase = lambda step: "setup" if step < 0 else ("warm-up" if warmup[step] else "after")
  is_step_fn = lambda name: "train_step" in name
  compiled_before, recompiles, first_after = set(), [], []
  for event in log.events:
    key = (event["name"], event["signature"])
    if phase(event["step"]) == "after":
      if is_step_fn(event["name"]) or key in compiled_before:
        recompiles.append(event)
      else:
        first_after.append(event)
    compiled_before.add(key)

  counts = collections.Counter(phase(e["step"]) for e in log.events)
  seconds = collections.Counter()
  for e in log.events:
    seconds[phase(e["step"])] += e["seconds"]
  step_programs = [e for e in log.events if is_step_fn(e["name"])]
  warmup_steps = sum(warmup)
  print(f"config={args.config} tasks={args.tasks} text_buckets={args.text_buckets} "
        f"steps={args.steps} ({warmup_steps} warm-up steps: first of each of "
        f"{len(seen)} signatures) dtype={args.dtype} wall={wall:.1f}s")
  print(f"{'phase':<10}{'compiles':>10}{'seconds':>10}")
  for p in ("setup", "warm-up", "after"):
    print(f"{p:<10}{counts[p]:>10}{seconds[p]:>10.1f}")
  print(f"\ntrain step programs: {len(step_programs)}")
  for e in step_programs:
    print(f"  step {e['step']:>4}  {e['seconds']:6.1f}s  {e['signature'][:110]}")
  by_name = collections.Counter(e["name"] for e in log.events if not is_step_fn(e["name"]))
  print(f"other programs ({sum(by_name.values())} compiles): "
        + ", ".join(f"{n} x{c}" for n, c in by_name.most_common()))
  print(f"recompiles after warm-up: {len(recompiles)}"
        + "".join(f"\n  step {e['step']}: {e['name']} {e['signature'][:100]}" for e in recompiles))
  print("first compiles after warm-up (first use of a small host-side program): "
        + (", ".join(f"{e['name']} (step {e['step']})" for e in first_after) or "none"))

  result = {
      "config": args.config, "tasks": args.tasks.split(","), "steps": args.steps,
      "signatures": len(seen), "warmup_steps": warmup_steps,
      "train_step_programs": len(step_programs),
      "compiles_total": len(log.events), "compiles_setup": counts["setup"],
      "compiles_in_warmup": counts["warm-up"], "compiles_after_warmup": counts["after"],
      "compile_seconds_warmup": round(seconds["warm-up"], 2),
      "recompiles_after_warmup": len(recompiles),
      "first_compiles_after_warmup": [e["name"] for e in first_after],
      "wall_seconds": round(wall, 1), "dtype": args.dtype,
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
