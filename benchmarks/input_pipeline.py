"""Batches per second of the input pipeline against the training step's consumption.

    python -m benchmarks.input_pipeline [--config default] [--tasks a,b] [--seconds 20]

Builds the mixture the config describes over the installed embedded tasks (or `--tasks`), draws
batches for `--seconds` after a warm-up (supply), then times the jitted train step of the same
config on one real batch of every task (demand: the steps per second the trainer can consume,
weighted by the mixture's task rates). Prints per-task rates, then one JSON line with
`batches_per_s`, `examples_per_s`, `tokens_per_s` (non-padding ids and frames),
`step_batches_per_s` and `pipeline_headroom` = supply / demand (aim: >= 3).
"""

import argparse
import importlib
import json
import time

import jax
import numpy as np

from data import mixture as mixture_lib
from data import tasks as tasks_lib
from data.buckets import InputConfig
from data.tokenizer import Tokenizer


def _real_tokens(batch: dict) -> int:
  """Non-padding positions of a batch's sequences (image and label positions count as one)."""
  total = 0
  for key in ("inputs", "targets"):
    value = batch[key]
    if key == "inputs" and "input_mask" in batch:
      total += int(batch["input_mask"].sum())
    elif value.dtype == np.int32 and value.ndim == 2:
      total += int((value != 0).sum())
    else:
      total += value.shape[0]
  return total


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="default", help="tiny | default | paper")
  parser.add_argument("--tasks", default="", help="comma-separated (default: installed tasks)")
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--warmup_batches", type=int, default=10)
  args = parser.parse_args(argv)

  config = importlib.import_module(f"multimodel.configs.{args.config}").get_config()
  names = args.tasks or ",".join(t.name for t in tasks_lib.installed_tasks())
  task_list = tasks_lib.resolve(names)
  if not task_list:
    raise SystemExit("No embedded task is prepared: run `python -m data.prepare` first")
  needs_text = any("text" in (t.input_modality, t.target_modality) for t in task_list)
  tokenizer = Tokenizer.load() if needs_text else None
  mix = mixture_lib.Mixture(task_list, tokenizer,
                            InputConfig.from_config(config), strategy=config.data.mixture,
                            temperature=config.data.temperature)
  for _ in range(args.warmup_batches):
    next(mix)

  counts = {t.name: [0, 0, 0, 0.0] for t in task_list}  # batches, examples, tokens, seconds
  start = time.perf_counter()
  while time.perf_counter() - start < args.seconds:
    t0 = time.perf_counter()
    name, batch = next(mix)
    c = counts[name]
    c[0] += 1
    c[1] += batch["targets"].shape[0]
    c[2] += _real_tokens(batch)
    c[3] += time.perf_counter() - t0
  elapsed = time.perf_counter() - start

  print(f"{'task':<22} {'batches':>8} {'ms/batch':>9} {'examples/s':>11}")
  for name, (batches, examples, _, seconds) in counts.items():
    if batches:
      print(f"{name:<22} {batches:>8} {1e3 * seconds / batches:>9.1f} "
            f"{examples / max(seconds, 1e-9):>11.0f}")
  totals = np.sum([c[:3] for c in counts.values()], axis=0)
  step_seconds = _step_seconds(config, mix, tokenizer)
  probabilities = mix.probabilities()
  mean_step = sum(probabilities[n] * s for n, s in step_seconds.items())
  print(f"\n{'task':<22} {'train step ms':>14} {'rate':>6}")
  for name, seconds in step_seconds.items():
    print(f"{name:<22} {1e3 * seconds:>14.1f} {probabilities[name]:>6.3f}")
  supply = totals[0] / elapsed
  result = {"config": args.config, "tasks": [t.name for t in task_list],
            "batches_per_s": supply, "examples_per_s": totals[1] / elapsed,
            "tokens_per_s": totals[2] / elapsed, "step_batches_per_s": 1.0 / mean_step,
            "pipeline_headroom": supply * mean_step}
  print(json.dumps(result))
  return result


def _step_seconds(config, mix, tokenizer, repeats: int = 3) -> dict[str, float]:
  """Seconds of one jitted train step of `config` on a real batch of each task (after compile)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from multimodel import evaluation, objective, optim, trainer
  from multimodel.model import MultiModel  # pylint: disable=import-outside-toplevel

  model = MultiModel(config.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make(config.train, config.model.d_model)
  state = {"params": params, "opt_state": tx.init(params), "step": np.int32(0),
           "skipped": np.int32(0), "rng": np.zeros(2, np.uint32)}
  batches = {}
  while len(batches) < len(mix.tasks):  # One real batch per task, drawn from the mixture.
    name, batch = next(mix)
    batches.setdefault(name, batch)
  char_table = objective.run_ctc_char_table(config.model, tokenizer)
  out = {}
  for name, batch in batches.items():
    spec = evaluation.task_spec(mix.tasks[name])
    step = jax.jit(lambda st, b, spec=spec, name=name: trainer.train_step(
        st, {name: b}, jax.random.key(0), np.ones(1, np.float32), graphdef=graphdef, tx=tx,
        tasks=((name, spec),), ctc_char_table=char_table))
    jax.block_until_ready(step(state, batch))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
      result = step(state, batch)
    jax.block_until_ready(result)
    out[name] = (time.perf_counter() - start) / repeats
  return out


if __name__ == "__main__":
  main()
