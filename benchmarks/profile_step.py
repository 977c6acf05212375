"""Where the train step's time goes: XLA ops by kind, from a `jax.profiler` trace of one step.

    python -m benchmarks.profile_step [--config paper] [--kind text|image|imagenet]
                                      [--image_size 28] [--image_batch N] [--tokens_per_batch N]
                                      [--length 64] [--top 15]

Builds the same step as `benchmarks/mfu.py` (the trainer's `train_step` under `jax.jit`, state
donated, synthetic batch of the input pipeline's shapes), runs two warm-up steps, traces one, and
reads the trace's XPlane protobuf (with TensorFlow's copy of its schema, a dependency of the data
pipeline already). Prints the busy time of the XLA thunks summed over the CPU worker threads,
grouped by kind (the HLO name without its number: `ynn_fusion` are the matmuls and reductions
handed to the YNNPACK library, `*_fusion` XLA's own loops, `copy`, `dot`, ...), the most expensive
single ops, and a last line of JSON. `--hlo FILE` writes the compiled HLO, to look up what an op
of the table computes (`grep '%NAME = ' FILE`).

The sum over threads exceeds the step's wall time when both cores are busy.
"""

import argparse
import collections
import glob
import json
import re
import tempfile
import time

import jax

from benchmarks import mfu
from multimodel import host_memory


def op_times(trace_dir: str) -> collections.Counter:
  """Milliseconds per XLA op name, summed over the worker threads of a jax.profiler trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=import-outside-toplevel
  path = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0]
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  times = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if "Eigen" not in line.name:  # XLA's CPU worker threads; the rest is host bookkeeping.
        continue
      for event in line.events:
        name = names.get(event.metadata_id, "?")
        if not name.startswith("ThunkExecutor") and "Await" not in name:
          times[name] += event.duration_ps / 1e9
  return times


def main(argv=None) -> dict:
  host_memory.keep_freed_memory()  # As training does.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="paper")
  parser.add_argument("--kind", choices=mfu.KINDS, default="image")
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--image_size", type=int, default=mfu.IMAGE_SIZE)
  mfu.add_batch_arguments(parser)
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--hlo", default="", help="write the compiled step's HLO text here")
  args = parser.parse_args(argv)

  config = mfu.load_config(args.config, "float32", args.tokens_per_batch, args.image_batch)
  task, batch, _ = mfu.synthetic_batch(config, args.kind, args.length, image_size=args.image_size)
  compiled, state, step_args, _ = mfu.compiled_step(config, task, batch)
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(compiled.as_text())
  for _ in range(2):
    state, metrics = compiled(state, *step_args)
    jax.block_until_ready(metrics)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      state, metrics = compiled(state, *step_args)
      jax.block_until_ready(metrics)
      wall = time.perf_counter() - start
    times = op_times(trace_dir)

  kinds, counts = collections.Counter(), collections.Counter()
  for name, ms in times.items():
    kind = re.sub(r"\.\d+$", "", name)
    kinds[kind] += ms
    counts[kind] += 1
  total = sum(kinds.values())
  print(f"{args.config} {args.kind} step {mfu.shape_text(args.kind, batch)}, B="
        f"{len(batch['targets'])}: {wall * 1e3:.0f} ms wall, {total:.0f} ms of XLA ops over the "
        "worker threads")
  print(f"{'op kind':32s} {'ms':>8s} {'share':>6s} {'ops':>5s}")
  for kind, ms in kinds.most_common(args.top):
    print(f"{kind:32s} {ms:8.1f} {ms / total:6.1%} {counts[kind]:5d}")
  print(f"\n{'most expensive ops':32s} {'ms':>8s}")
  for name, ms in times.most_common(args.top):
    print(f"{name:32s} {ms:8.1f}")
  result = {"config": args.config, "kind": args.kind, "wall_ms": wall * 1e3, "ops_ms": total,
            "by_kind_ms": dict(kinds.most_common(args.top))}
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
