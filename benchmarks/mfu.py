"""Model FLOPs utilisation (MFU) of the jitted train step, against this process's matmul peak.

    python -m benchmarks.mfu [--configs tiny,default,paper] [--kinds text,image,imagenet]
                             [--length 64] [--image_size 28] [--imagenet_batch 8] [--repeats 3]
                             [--dtype float32|bfloat16]

For every config and task kind, builds the trainer's update step (`trainer.train_step` under
`jax.jit` with the state donated, as `train_and_evaluate` jits it) on a synthetic batch shaped like
the input pipeline's:
  text   translation-shaped: inputs and targets int [B, L] with no padding, B = tokens_per_batch / L
         rounded to batch_multiple (L = --length);
  image  image -> label: [image_batch_size, H, H, 3] and int labels [B], H = --image_size
         (28 by default: the embedded image tasks' MNIST shape);
  imagenet  the same at ImageNet's 224x224, B = --imagenet_batch (8): the input the paper's image
         stem (the Xception entry flow, 16x downsampling) is built for. At 28x28 that stem leaves
         2x2 positions per image, and a `paper` step is mostly the optimizer's update of every
         parameter (the `opt ms` column), whatever the model's FLOPs.
FLOPs per step come from the model's own formula (`multimodel.flops`), printed beside XLA's count
(`compiled.cost_analysis()`) and their ratio. MFU = formula FLOPs / step time / peak, where the
peak is the best rate of [n, n] x [n, n] jnp.dot products (n = --matmul 2048) in the same dtype,
sampled before every timed step so that other load on the machine hits both alike: `MFU` against
the best rate over ~0.5 s of back-to-back products, `burst` against the best single product (see
MatmulPeak). Both count the routed experts only (N * K assignments: the model FLOPs); `exec`
counts what the step computes (all E * C expert buffer slots, as XLA does).

Memory per config: the compiled step's `memory_analysis()` (arguments + outputs - donated aliases
+ temporaries) and the process's max RSS after the config (configs run smallest first, so each
max RSS is that config's).

`opt ms` is the optimizer update alone (clip, Adam, apply; `optimizer_seconds`): a lower bound of
any step's time that does not depend on the task, as every step updates every parameter.
Prints a table, then one JSON line.
"""

import argparse
import functools
import importlib
import json
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from multimodel import flops, host_memory, optim, trainer
from multimodel.model import MultiModel, TaskSpec

TEXT_TASK = TaskSpec("text", "text", command_id=3)
IMAGE_TASK = TaskSpec("image", "label", command_id=4, num_classes=10)
IMAGE_SIZE = 28  # The embedded image tasks' (MNIST-shaped).
IMAGENET_SIZE, IMAGENET_BATCH = 224, 8  # ImageNet-shaped: the paper's image input.
KINDS = ("text", "image", "imagenet")
MFU_AIM = 0.35  # Of `paper`, docs/performance.md.


class MatmulPeak:
  """Rates of a jitted [n, n] x [n, n] product, in FLOP/s: the best of short and of long samples.

  `burst` is the best single product; `sustained` the best rate over back-to-back products
  lasting about `window` seconds, as long as a fraction of a train step. On an idle machine the
  two agree; when other work shares the cores, a single product can run in a quiet moment while a
  step of seconds cannot, so MFU is computed against `sustained` and also printed against `burst`.
  """

  def __init__(self, n: int, dtype, window: float = 0.5):
    k1, k2 = jax.random.split(jax.random.key(0))
    self.a = jax.random.normal(k1, (n, n), dtype)
    self.b = jax.random.normal(k2, (n, n), dtype)
    self.flops = 2 * n ** 3
    self.fn = jax.jit(jnp.dot)
    jax.block_until_ready(self.fn(self.a, self.b))
    fastest = float("inf")
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(self.fn(self.a, self.b))
      fastest = min(fastest, time.perf_counter() - start)
    self.count = max(1, round(window / fastest))
    self.burst = self.sustained = 0.0

  def sample(self) -> None:
    start = time.perf_counter()
    jax.block_until_ready(self.fn(self.a, self.b))
    self.burst = max(self.burst, self.flops / (time.perf_counter() - start))
    start = time.perf_counter()
    for _ in range(self.count):
      out = self.fn(self.a, self.b)
    jax.block_until_ready(out)
    self.sustained = max(self.sustained, self.count * self.flops / (time.perf_counter() - start))


def load_config(name: str, dtype: str, tokens_per_batch: int = 0, image_batch: int = 0,
                **model_overrides):
  """Config `name` in `dtype` with its batch sizes replaced where given (0: the config's own)."""
  config = importlib.import_module(f"multimodel.configs.{name}").get_config()
  config.model.dtype = dtype
  for key, value in model_overrides.items():
    config.model[key] = value
  if tokens_per_batch:
    config.data.tokens_per_batch = tokens_per_batch
  if image_batch:
    config.data.image_batch_size = image_batch
  return config


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--tokens_per_batch", type=int, default=0,
                      help="Token budget of a text batch (0: the config's data.tokens_per_batch)")
  parser.add_argument("--image_batch", type=int, default=0,
                      help="B of the image batch (0: the config's data.image_batch_size)")


def synthetic_batch(config, kind: str, length: int, seed: int = 0, image_size: int = IMAGE_SIZE,
                    imagenet_batch: int = IMAGENET_BATCH):
  """(task spec, batch of numpy arrays, positions the body runs over) of one of `KINDS`."""
  rng = np.random.default_rng(seed)
  data, v = config.data, config.model.vocab_size
  if kind == "text":
    b = max(data.batch_multiple, data.tokens_per_batch // length // data.batch_multiple
            * data.batch_multiple)
    batch = {"inputs": rng.integers(3, v, (b, length)).astype(np.int32),
             "targets": rng.integers(3, v, (b, length)).astype(np.int32)}
    return TEXT_TASK, batch, 2 * b * length
  if kind in ("image", "imagenet"):
    b, size = ((data.image_batch_size, image_size) if kind == "image"
               else (imagenet_batch, IMAGENET_SIZE))
    batch = {"inputs": rng.standard_normal((b, size, size, 3)).astype(np.float32),
             "targets": rng.integers(0, IMAGE_TASK.num_classes, (b,)).astype(np.int32)}
    positions = flops.encoder_length(config.model, "image", batch["inputs"].shape)
    return IMAGE_TASK, batch, b * positions
  raise ValueError(f"unknown task kind {kind!r}; valid: {', '.join(KINDS)}")


def compiled_step(config, task: TaskSpec, batch: dict):
  """(compiled train step with donated state, initial state, other arguments), as the trainer."""
  tx = optim.make(config.train, config.model.d_model)

  def init_state():
    model = MultiModel(config.model, rngs=nnx.Rngs(config.train.seed))
    return trainer.new_state(nnx.state(model, nnx.Param), tx, config.train.seed)

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: MultiModel(config.model, rngs=nnx.Rngs(0))))
  state = jax.jit(init_state)()
  batches = {"task": jax.device_put(batch)}
  args = (batches, jax.random.key(1), jnp.ones((1,), jnp.float32))
  step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx,
                                   tasks=(("task", task),)), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(state, *args).compile()
  return compiled, state, args, time.perf_counter() - start


def optimizer_seconds(config, state, repeats: int = 3) -> float:
  """Best time of the optimizer update alone (clip, Adam, apply) on the state's parameters.

  Every step reads and writes every parameter and both Adam moments, whatever the task: at the
  `paper` size that memory traffic, not the model's FLOPs, sets the time of a small step.
  """
  tx = optim.make(config.train, config.model.d_model)

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  step = jax.jit(update, donate_argnums=(0, 1))
  params, opt_state = state["params"], state["opt_state"]  # Donated: `state` is used up.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  params, opt_state = step(params, opt_state, grads)
  jax.block_until_ready(params)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    params, opt_state = step(params, opt_state, grads)
    jax.block_until_ready(params)
    best = min(best, time.perf_counter() - start)
  return best


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def memory(compiled) -> dict:
  """Bytes of the compiled step: arguments, outputs, donated aliases, temporaries and their sum."""
  m = compiled.memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def time_steps(compiled, state, args, peak: MatmulPeak,
               repeats: int) -> tuple[list[float], dict]:
  """Seconds of `repeats` steps after one warm-up step, each preceded by a matmul peak sample,
  and the state after them."""
  state, metrics = compiled(state, *args)
  jax.block_until_ready(metrics)
  seconds = []
  for _ in range(repeats):
    peak.sample()
    start = time.perf_counter()
    state, metrics = compiled(state, *args)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
  if not bool(metrics["finite"]):
    raise RuntimeError("the benchmarked step produced a non-finite loss")
  return seconds, state


def shape_text(kind: str, batch: dict) -> str:
  """S+T of a text batch, HxWxC of an image batch."""
  if kind == "text":
    return f"{batch['inputs'].shape[1]}+{batch['targets'].shape[1]}"
  return "x".join(map(str, batch["inputs"].shape[1:]))


def measure(config, kind: str, length: int, peak: MatmulPeak, repeats: int,
            image_size: int = IMAGE_SIZE, imagenet_batch: int = IMAGENET_BATCH) -> dict:
  """Step time, FLOPs (formula and XLA) and memory of one config on one task kind."""
  task, batch, positions = synthetic_batch(config, kind, length, image_size=image_size,
                                           imagenet_batch=imagenet_batch)
  compiled, state, args, compile_s = compiled_step(config, task, batch)
  shapes = (batch["inputs"].shape, batch["targets"].shape)
  model_flops = flops.train_step_flops(config.model, task, *shapes, experts="active")
  executed = flops.train_step_flops(config.model, task, *shapes, experts="executed")
  seconds, state = time_steps(compiled, state, args, peak, repeats)
  optimizer_s = optimizer_seconds(config, state)
  best = min(seconds)
  b = batch["inputs"].shape[0]
  return {
      "kind": kind, "batch": b, "shape": shape_text(kind, batch),
      "compile_s": compile_s, "step_s": best, "step_s_median": statistics.median(seconds),
      "optimizer_s": optimizer_s,
      "examples_per_s": b / best, "tokens_per_s": positions / best,
      "model_gflop": model_flops / 1e9, "formula_gflop": executed / 1e9,
      "xla_gflop": xla_flops(compiled) / 1e9, "xla_over_formula": xla_flops(compiled) / executed,
      "gflop_per_s": model_flops / best / 1e9,
      "memory_mib": {k: v / 2 ** 20 for k, v in memory(compiled).items()},
      "_model_flops": model_flops, "_executed_flops": executed, "_seconds": best,
  }


def peak_text(peak: MatmulPeak, n: int) -> str:
  return (f"peak = best {n}x{n} matmul rate: {peak.sustained / 1e9:.1f} GFLOP/s over "
          f"{peak.count} back-to-back products (MFU), {peak.burst / 1e9:.1f} for one (MFU burst)")


def max_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB.


def describe_machine() -> str:
  device = jax.devices()[0]
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
          f"load average {load}")


def main(argv=None) -> dict:
  host_memory.keep_freed_memory()  # As training does.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="tiny,default,paper")
  parser.add_argument("--kinds", default=",".join(KINDS), help=f"of {', '.join(KINDS)}")
  parser.add_argument("--length", type=int, default=64, help="L of the text batch (S = T = L)")
  parser.add_argument("--image_size", type=int, default=IMAGE_SIZE,
                      help="H = W of the `image` kind's batch (28: the embedded tasks' shape)")
  parser.add_argument("--imagenet_batch", type=int, default=IMAGENET_BATCH,
                      help=f"B of the `imagenet` kind's {IMAGENET_SIZE}x{IMAGENET_SIZE} batch")
  add_batch_arguments(parser)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul", type=int, default=2048, help="n of the peak's [n, n] matmul")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  args = parser.parse_args(argv)

  kinds = args.kinds.split(",")
  unknown = [k for k in kinds if k not in KINDS]
  if unknown:
    parser.error(f"--kinds: unknown {', '.join(unknown)}; valid: {', '.join(KINDS)}")
  print(describe_machine(), flush=True)
  peak = MatmulPeak(args.matmul, jnp.dtype(args.dtype))
  for _ in range(3):
    peak.sample()
  rows, memory_rows = [], {}
  for name in args.configs.split(","):
    config = load_config(name, args.dtype, args.tokens_per_batch, args.image_batch)
    for kind in kinds:
      row = measure(config, kind, args.length, peak, args.repeats, args.image_size,
                    args.imagenet_batch)
      row["config"] = name
      rows.append(row)
      print(f"  {name} {kind}: {row['step_s'] * 1e3:.0f} ms/step", flush=True)
    memory_rows[name] = {"max_rss_mib": max_rss_mib(),
                         "step_peak_mib": max(r["memory_mib"]["peak"] for r in rows
                                              if r["config"] == name)}
  for row in rows:  # Against the best peak of the whole run.
    row["mfu"] = row["_model_flops"] / row["_seconds"] / peak.sustained
    row["mfu_executed"] = row["_executed_flops"] / row["_seconds"] / peak.sustained
    row["mfu_burst"] = row["_model_flops"] / row["_seconds"] / peak.burst

  print(describe_machine())
  print(f"train step under jit (state donated), {args.dtype}, best of {args.repeats} steps; "
        f"{peak_text(peak, args.matmul)}")
  header = (f"{'config':<8}{'kind':<9}{'B':>4}{'shape':>12}{'ms/step':>9}{'ex/s':>8}{'tok/s':>8}"
            f"{'model GF':>10}{'formula GF':>11}{'XLA GF':>9}{'XLA/f':>7}{'GF/s':>7}{'MFU':>6}"
            f"{'burst':>6}{'exec':>6}{'opt ms':>7}{'compile s':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    print(f"{r['config']:<8}{r['kind']:<9}{r['batch']:>4}{r['shape']:>12}{r['step_s'] * 1e3:>9.0f}"
          f"{r['examples_per_s']:>8.1f}{r['tokens_per_s']:>8.0f}{r['model_gflop']:>10.1f}"
          f"{r['formula_gflop']:>11.1f}{r['xla_gflop']:>9.1f}{r['xla_over_formula']:>7.3f}"
          f"{r['gflop_per_s']:>7.1f}{r['mfu']:>6.2f}{r['mfu_burst']:>6.2f}"
          f"{r['mfu_executed']:>6.2f}{r['optimizer_s'] * 1e3:>7.0f}{r['compile_s']:>10.1f}")
  print(f"\n{'config':<8}{'kind':<9}{'args MiB':>10}{'out MiB':>9}{'alias MiB':>10}"
        f"{'temp MiB':>10}{'step MiB':>10}")
  for r in rows:
    m = r["memory_mib"]
    print(f"{r['config']:<8}{r['kind']:<9}{m['argument']:>10.0f}{m['output']:>9.0f}"
          f"{m['alias']:>10.0f}{m['temp']:>10.0f}{m['peak']:>10.0f}")
  print("max RSS of the process after each config (MiB): "
        + ", ".join(f"{n} {m['max_rss_mib']:.0f}" for n, m in memory_rows.items()))
  for r in rows:
    if r["config"] == "paper":
      print(f"aim MFU of paper >= {MFU_AIM}: {r['kind']} ({r['shape']}, B={r['batch']}) "
            f"{r['mfu']:.2f}, {'met' if r['mfu'] >= MFU_AIM else 'not met'}; the optimizer's "
            f"update alone takes {r['optimizer_s'] / r['step_s']:.0%} of the step's time")

  clean = lambda r: {k: (round(v, 4) if isinstance(v, float) else
                         {a: round(b, 1) for a, b in v.items()} if isinstance(v, dict) else v)
                     for k, v in r.items() if not k.startswith("_")}
  result = {"peak_gflop_per_s": round(peak.sustained / 1e9, 1),
            "peak_burst_gflop_per_s": round(peak.burst / 1e9, 1), "matmul": args.matmul,
            "dtype": args.dtype, "platform": jax.devices()[0].platform,
            "cpu_cores": os.cpu_count(), "length": args.length, "image_size": args.image_size,
            "imagenet_batch": args.imagenet_batch,
            "rows": [clean(r) for r in rows], "memory": {
                n: {k: round(v, 1) for k, v in m.items()} for n, m in memory_rows.items()}}
  for r in rows:
    result[f"mfu_{r['config']}_{r['kind']}"] = round(r["mfu"], 3)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
