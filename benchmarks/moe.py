"""Times the mixture-of-experts layer against a dense feed-forward layer of the same active FLOPs.

Both run forward and backward (value and gradients of a squared error plus, for the MoE, its
balancing loss) under jax.jit on the same N = B * L tokens. The dense layer has hidden width
K * H, so that each token does the same multiply-adds as its K experts. The MoE also computes
the empty buffer slots: its expert matmuls are E * C / (N * K) ~ capacity_factor times the dense
ones, printed as `pad`.

    python benchmarks/moe.py            # table, then a last line of JSON with `moe_over_dense`
    python benchmarks/moe.py --repeats 20 --experts 8 30 --capacity-factors 1.25 1.0

The headline ratio is E=8, K=2, capacity factor 1.25, training mode.
"""

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multimodel import moe as moe_lib  # noqa: E402

HEADLINE = dict(experts=8, capacity_factor=1.25)


def moe_step(
    num_tokens: int, d_model: int, hidden: int, num_experts: int, top_k: int,
    capacity_factor: float, dtype: jnp.dtype,
) -> tuple[Callable[[], object], Callable[[], dict]]:
  """Returns (a jitted training step of the MoE, a function returning its aux statistics)."""
  layer = moe_lib.MoE(
      d_model, hidden, num_experts, top_k,
      capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
      loss_coef=1e-2, dtype=dtype, rngs=nnx.Rngs(params=0),
  )
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (8, num_tokens // 8, d_model), dtype)  # [B, L, D]
  target = jax.random.normal(jax.random.key(2), x.shape, dtype)

  def loss_fn(params, x, key):
    y, aux = nnx.merge(graphdef, params)(x, train=True, rngs=nnx.Rngs(dropout=key))
    return jnp.mean((y.astype(jnp.float32) - target) ** 2) + aux["loss"], aux

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  key = jax.random.key(3)
  return (lambda: step(params, x, key)), (lambda: step(params, x, key)[0][1])


def dense_step(
    num_tokens: int, d_model: int, hidden: int, dtype: jnp.dtype
) -> Callable[[], object]:
  """A jitted training step of relu(x W1 + b1) W2 + b2 with hidden width `hidden`."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {
      "w1": jax.random.normal(k1, (d_model, hidden)) * d_model**-0.5,
      "b1": jnp.zeros((hidden,)),
      "w2": jax.random.normal(k2, (hidden, d_model)) * hidden**-0.5,
      "b2": jnp.zeros((d_model,)),
  }
  x = jax.random.normal(jax.random.key(1), (8, num_tokens // 8, d_model), dtype)  # [B, L, D]
  target = jax.random.normal(jax.random.key(2), x.shape, dtype)

  def loss_fn(params, x):
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    h = jax.nn.relu(x @ p["w1"] + p["b1"])  # [B, L, K * H]
    y = h @ p["w2"] + p["b2"]  # [B, L, D]
    return jnp.mean((y.astype(jnp.float32) - target) ** 2)

  step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  return lambda: step(params, x)


def time_round_robin(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each step; calls interleaved so that machine load hits all alike."""
  for step in steps.values():  # Compile and warm up.
    jax.block_until_ready(step())
    jax.block_until_ready(step())
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step())
      times[name].append(time.perf_counter() - start)
  return times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192, help="N = B * L (B = 8).")
  parser.add_argument("--d-model", type=int, default=512)
  parser.add_argument("--hidden", type=int, default=1024, help="Hidden width of one expert.")
  parser.add_argument("--top-k", type=int, default=2)
  parser.add_argument("--experts", type=int, nargs="+", default=[8, 30])
  parser.add_argument("--capacity-factors", type=float, nargs="+", default=[1.25, 1.0])
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  n, d, h, k = args.tokens, args.d_model, args.hidden, args.top_k

  steps = {"dense": dense_step(n, d, k * h, dtype)}
  stats = {}
  settings = [(e, cf) for e in args.experts for cf in args.capacity_factors]
  for e, cf in settings:
    steps[(e, cf)], stats[(e, cf)] = moe_step(n, d, h, e, k, cf, dtype)
  times = time_round_robin(steps, args.repeats)
  median = {name: statistics.median(t) for name, t in times.items()}

  device = jax.devices()[0]
  print(f"MoE vs dense FFN, forward+backward under jit: N={n} tokens, D={d}, expert hidden={h}, "
        f"K={k}, dense hidden={k * h}, {args.dtype}, train mode")
  print(f"device: {device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores, "
        f"median and min of {args.repeats} interleaved runs; x dense = median ratio, (min) = min "
        f"ratio; pad = E * C / (N * K)")
  header = f"{'layer':<8}{'E':>4}{'cf':>6}{'C':>7}{'pad':>6}{'median ms':>11}{'min ms':>9}" \
           f"{'x dense':>9}{'(min)':>7}{'dropped':>9}"
  print(header)
  print("-" * len(header))
  print(f"{'dense':<8}{'':>4}{'':>6}{'':>7}{'':>6}{median['dense'] * 1e3:>11.1f}"
        f"{min(times['dense']) * 1e3:>9.1f}{1.0:>9.2f}{1.0:>7.2f}{'':>9}")
  rows = []
  for e, cf in settings:
    c = moe_lib.capacity(n, e, k, cf)
    aux = jax.device_get(stats[(e, cf)]())
    ratio = median[(e, cf)] / median["dense"]
    ratio_min = min(times[(e, cf)]) / min(times["dense"])
    pad = e * c / (n * k)
    print(f"{'moe':<8}{e:>4}{cf:>6.2f}{c:>7}{pad:>6.2f}{median[(e, cf)] * 1e3:>11.1f}"
          f"{min(times[(e, cf)]) * 1e3:>9.1f}{ratio:>9.2f}{ratio_min:>7.2f}"
          f"{float(aux['dropped_fraction']):>9.2%}")
    rows.append(dict(experts=e, capacity_factor=cf, capacity=c, moe_ms=median[(e, cf)] * 1e3,
                     moe_over_dense=ratio, moe_over_dense_min=ratio_min,
                     dropped_fraction=float(aux["dropped_fraction"])))

  headline = (HEADLINE["experts"], HEADLINE["capacity_factor"])
  result = dict(
      moe_over_dense=round(median[headline] / median["dense"], 3) if headline in median else None,
      moe_over_dense_min=(round(min(times[headline]) / min(times["dense"]), 3)
                          if headline in times else None),
      headline=dict(experts=headline[0], top_k=k, capacity_factor=headline[1], train=True),
      dense_ms=round(median["dense"] * 1e3, 2),
      tokens=n, d_model=d, hidden=h, dtype=args.dtype, platform=device.platform,
      rows=[{key: round(v, 4) if isinstance(v, float) else v for key, v in r.items()} for r in rows],
  )
  print(json.dumps(result))


if __name__ == "__main__":
  main()
