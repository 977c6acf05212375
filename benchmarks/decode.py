"""Tokens per second of cached greedy decoding against the full re-run reference.

    python -m benchmarks.decode [--config default] [--batch 8] [--lengths 32,64,128]

A text-to-text model of the config with random weights decodes a batch of random source ids to
every length in `--lengths`, never stopping early (no end-of-sequence id), with
`decode.greedy` (incremental cache: one `decode_step` per position) and with
`decode.full_rerun_greedy` (the whole teacher-forced forward pass per position). Both are jitted
and warmed up; the best of `--repeats` timed runs counts. Prints a table, then one JSON line
with the rates and `cache_speedup_at_<longest length>`.
"""

import argparse
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from multimodel import decode
from multimodel.model import MultiModel, TaskSpec

TASK = TaskSpec("text", "text", command_id=1)


def seconds_per_call(fn, *args, repeats: int) -> float:
  """Best wall time of `repeats` calls after one warm-up (compilation) call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="default", help="tiny | default | paper")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--source_length", type=int, default=32)
  parser.add_argument("--lengths", default="32,64,128", help="comma-separated target lengths T")
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args(argv)

  cfg = importlib.import_module(f"multimodel.configs.{args.config}").get_config().model
  model = MultiModel(cfg, modality_names=("text",), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(3, cfg.vocab_size, (args.batch, args.source_length)),
                       jnp.int32)  # [B, S]
  lengths = [int(n) for n in args.lengths.split(",")]

  rates = {"greedy": {}, "full_rerun": {}}  # method -> {T: tokens per second}
  for length in lengths:
    for method in rates:
      fn = decode.make_decoder(graphdef, TASK, max_length=length, method=method, eos_id=-1)
      seconds = seconds_per_call(fn, state, inputs, repeats=args.repeats)
      rates[method][length] = args.batch * length / seconds

  print(f"config={args.config} batch={args.batch} source_length={args.source_length} "
        f"device={jax.devices()[0].device_kind}")
  print(f"{'T':>5} {'cached tok/s':>14} {'full re-run tok/s':>18} {'speedup':>8}")
  for length in lengths:
    cached, full = rates["greedy"][length], rates["full_rerun"][length]
    print(f"{length:>5} {cached:>14.1f} {full:>18.1f} {cached / full:>8.1f}")
  longest = lengths[-1]
  result = {
      "config": args.config, "batch": args.batch, "source_length": args.source_length,
      "device": jax.devices()[0].device_kind,
      "cached_tokens_per_s": {str(n): round(r, 1) for n, r in rates["greedy"].items()},
      "full_rerun_tokens_per_s": {str(n): round(r, 1) for n, r in rates["full_rerun"].items()},
      f"cache_speedup_at_{longest}": round(rates["greedy"][longest]
                                           / rates["full_rerun"][longest], 2),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
