"""Scaling of the train step's time with sequence length and with the number of experts.

    python -m benchmarks.scaling [--config default] [--lengths 32,64,128,256]
                                 [--experts 4,8,16,30] [--repeats 3] [--dtype float32]

The same measurement as `benchmarks/mfu.py` (the trainer's donated train step under jit on a
translation-shaped text batch, FLOPs from `multimodel.flops`, MFU against the best [n, n] matmul of
this process timed between the steps):
  lengths  S = T = L with the input pipeline's token budget (B = tokens_per_batch / L), so that
           the per-position layers cost the same at every L and attention grows with L;
  experts  E experts at L = --expert_length (the top-k and capacity factor of the config), so that
           the active FLOPs stay the same while parameters, optimizer state and gating grow.
Prints two tables, then one JSON line.
"""

import argparse
import json

import jax.numpy as jnp

from benchmarks import mfu
from multimodel import host_memory


def _row(config, seq_length, peak, repeats, **extra) -> dict:
  r = mfu.measure(config, "text", seq_length, peak, repeats)
  r.update(extra)
  return r


def _print(rows, key, label):
  header = (f"{label:>8}{'B':>5}{'ms/step':>9}{'tok/s':>8}{'model GF':>10}{'XLA GF':>9}"
            f"{'GF/s':>7}{'MFU':>6}{'params MiB':>11}{'temp MiB':>10}{'compile s':>10}")
  print(header)
  print("-" * len(header))
  for r in rows:
    m = r["memory_mib"]
    print(f"{r[key]:>8}{r['batch']:>5}{r['step_s'] * 1e3:>9.0f}{r['tokens_per_s']:>8.0f}"
          f"{r['model_gflop']:>10.1f}{r['xla_gflop']:>9.1f}{r['gflop_per_s']:>7.1f}"
          f"{r['mfu']:>6.2f}{m['argument']:>11.0f}{m['temp']:>10.0f}{r['compile_s']:>10.1f}")


def main(argv=None) -> dict:
  host_memory.keep_freed_memory()  # As training does.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="default", help="tiny | default | paper")
  parser.add_argument("--lengths", default="32,64,128,256")
  parser.add_argument("--experts", default="4,8,16,30")
  parser.add_argument("--expert_length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--matmul", type=int, default=2048)
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  mfu.add_batch_arguments(parser)
  args = parser.parse_args(argv)

  print(mfu.describe_machine(), flush=True)
  peak = mfu.MatmulPeak(args.matmul, jnp.dtype(args.dtype))
  for _ in range(3):
    peak.sample()
  config = mfu.load_config(args.config, args.dtype, args.tokens_per_batch, args.image_batch)
  by_length = []
  for length in (int(x) for x in args.lengths.split(",")):
    by_length.append(_row(config, length, peak, args.repeats, length=length))
    print(f"  L={length}: {by_length[-1]['step_s'] * 1e3:.0f} ms/step", flush=True)
  by_experts = []
  for e in (int(x) for x in args.experts.split(",")):
    expert_config = mfu.load_config(args.config, args.dtype, args.tokens_per_batch,
                                    args.image_batch, num_experts=e)
    by_experts.append(_row(expert_config, args.expert_length, peak, args.repeats, experts=e))
    print(f"  E={e}: {by_experts[-1]['step_s'] * 1e3:.0f} ms/step", flush=True)
  for r in by_length + by_experts:
    r["mfu"] = r["_model_flops"] / r["_seconds"] / peak.sustained

  print(mfu.describe_machine())
  print(f"config={args.config} {args.dtype}, train step under jit (state donated), best of "
        f"{args.repeats}; {mfu.peak_text(peak, args.matmul)}")
  print(f"\nsequence length (S = T = L, B = tokens_per_batch / L, "
        f"E = {config.model.num_experts}):")
  _print(by_length, "length", "L")
  print(f"\nexperts (L = {args.expert_length}, K = {config.model.top_k}, capacity factor "
        f"{config.model.capacity_factor}):")
  _print(by_experts, "experts", "E")

  keep = ("batch", "step_s", "tokens_per_s", "model_gflop", "xla_gflop", "mfu", "compile_s")
  pick = lambda r, key: {key: r[key], **{k: round(r[k], 4) for k in keep},
                         "temp_mib": round(r["memory_mib"]["temp"], 1),
                         "argument_mib": round(r["memory_mib"]["argument"], 1)}
  base = by_length[0]["step_s"] if by_length else None
  result = {"config": args.config, "dtype": args.dtype,
            "peak_gflop_per_s": round(peak.sustained / 1e9, 1),
            "peak_burst_gflop_per_s": round(peak.burst / 1e9, 1),
            "lengths": [pick(r, "length") for r in by_length],
            "experts": [pick(r, "experts") for r in by_experts],
            "step_time_over_shortest": {str(r["length"]): round(r["step_s"] / base, 3)
                                        for r in by_length}}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
