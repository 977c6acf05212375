"""Tests of the mixture-of-experts layer against a slow per-token reference written here."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from multimodel import moe as moe_lib
from multimodel.sharding import EMBED, EXPERT, MLP

D, H, E, K = 8, 16, 4, 2


def make_moe(**overrides) -> moe_lib.MoE:
  """A tiny MoE with random (not zero) gate and noise weights, so routing has no ties."""
  kwargs = dict(
      capacity_factor=E / K,  # C = N: nothing is ever dropped.
      eval_capacity_factor=E / K,
      loss_coef=1e-2,
      rngs=nnx.Rngs(params=0),
  )
  random_gate = overrides.pop("random_gate", True)
  kwargs.update(overrides)
  layer = moe_lib.MoE(D, H, E, K, **kwargs)
  if random_gate:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(42), 4)
    layer.w_gate[...] = jax.random.normal(k1, (D, E))
    layer.w_noise[...] = 0.5 * jax.random.normal(k2, (D, E))
    layer.b_in[...] = 0.1 * jax.random.normal(k3, (E, H))
    layer.b_out[...] = 0.1 * jax.random.normal(k4, (E, D))
  return layer


def reference(layer, x, mask, noise, capacity_factor):
  """Per-token loops in float64: routing, drops, outputs, statistics and the balancing loss."""
  p = {name: np.asarray(getattr(layer, name)[...], np.float64)
       for name in ("w_gate", "w_noise", "w_in", "b_in", "w_out", "b_out")}
  b, l, d = x.shape
  n = b * l
  tokens = np.asarray(x, np.float64).reshape(n, d)
  valid = np.ones(n, bool) if mask is None else np.asarray(mask).reshape(n)
  c = min(math.ceil(capacity_factor * n * K / E), n)
  normal_cdf = np.vectorize(lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0))))

  chosen, gates = [], []
  importance, load_estimate = np.zeros(E), np.zeros(E)
  for t in range(n):
    clean = tokens[t] @ p["w_gate"]
    logits = clean
    if noise is not None:
      std = np.log1p(np.exp(tokens[t] @ p["w_noise"])) + 0.01
      logits = clean + noise[t] * std
    order = np.argsort(-logits, kind="stable")
    top = order[:K]
    g = np.exp(logits[top] - logits[top].max())
    g /= g.sum()
    chosen.append(top)
    gates.append(g)
    if not valid[t]:
      continue
    importance[top] += g
    if noise is not None:
      kth, next_best = logits[order[K - 1]], logits[order[K]]
      for e in range(E):
        threshold = next_best if logits[e] > next_best else kth
        load_estimate[e] += normal_cdf((clean[e] - threshold) / std[e])
    else:
      load_estimate[top] += 1.0

  counts, routed, dropped = np.zeros(E), np.zeros(E), 0
  keep = np.zeros((n, K), bool)
  for j in range(K):  # First choices of all tokens before any second choice.
    for t in range(n):
      if not valid[t]:
        continue
      e = chosen[t][j]
      routed[e] += 1
      if counts[e] < c:
        counts[e] += 1
        keep[t, j] = True
      else:
        dropped += 1

  y = np.zeros((n, d))
  for t in range(n):
    for j in range(K):
      if keep[t, j]:
        e = chosen[t][j]
        h = np.maximum(tokens[t] @ p["w_in"][e] + p["b_in"][e], 0.0)
        y[t] += gates[t][j] * (h @ p["w_out"][e] + p["b_out"][e])

  def cv2(v):
    return v.var() / (v.mean() ** 2 + 1e-10)

  return {
      "y": y.reshape(b, l, d),
      "chosen": np.array(chosen),
      "gates": np.array(gates) * valid[:, None],
      "loss": 1e-2 * (cv2(importance) + cv2(load_estimate)),
      "load": routed / max(routed.sum(), 1),
      "importance": importance,
      "load_estimate": load_estimate,
      "dropped": dropped,
      "keep": keep,
  }


@nnx.jit(static_argnames="train")
def apply(layer, x, mask, seed, train):
  """The layer under jit, its gating noise drawn from `nnx.Rngs(dropout=seed)`."""
  return layer(x, mask, train=train, rngs=nnx.Rngs(dropout=jax.random.key(seed)))


def noise_of(seed, n):
  """The draw the layer makes for its gating noise from `nnx.Rngs(dropout=seed)`."""
  return np.asarray(jax.random.normal(nnx.Rngs(dropout=seed).dropout(), (n, E), jnp.float32))


def inputs(b=3, l=6, seed=0):
  """Random tokens [B, L, D]."""
  return jax.random.normal(jax.random.key(seed), (b, l, D))


def check_against_reference(y, aux, ref):
  """The layer's output [B, L, D] and statistics equal the reference's."""
  np.testing.assert_allclose(y, ref["y"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["loss"], ref["loss"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(aux["importance"], ref["importance"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["load_estimate"], ref["load_estimate"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(aux["load"], ref["load"], rtol=1e-6)
  assert float(aux["dropped"]) == ref["dropped"]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_slow_reference_without_drops(train, padded):
  layer = make_moe()
  x = inputs()
  mask = None
  if padded:
    mask = jnp.arange(x.shape[1])[None, :] < jnp.array([[6], [4], [1]])  # [B, L]
  n = x.shape[0] * x.shape[1]
  noise = noise_of(7, n) if train else None
  y, aux = apply(layer, x, mask, 7, train)
  ref = reference(layer, x, mask, noise, E / K)
  assert ref["dropped"] == 0
  check_against_reference(y, aux, ref)

  # The gating alone agrees too.
  valid = jnp.ones(n, bool) if mask is None else mask.reshape(n)
  expert_index, gates, _ = layer.gate(x.reshape(n, D), valid, noise)
  np.testing.assert_array_equal(expert_index.T, ref["chosen"])
  np.testing.assert_allclose(gates.T, ref["gates"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_dropped_assignments_match_reference(train):
  factor = 0.5  # C = ceil(0.5 * 18 * 2 / 4) = 5 slots per expert for 36 assignments.
  layer = make_moe(capacity_factor=factor, eval_capacity_factor=factor)
  x = inputs()
  n = x.shape[0] * x.shape[1]
  y, aux = apply(layer, x, None, 3, train)
  ref = reference(layer, x, None, noise_of(3, n) if train else None, factor)
  assert ref["dropped"] > 0
  check_against_reference(y, aux, ref)
  np.testing.assert_allclose(aux["dropped_fraction"], ref["dropped"] / (n * K), rtol=1e-6)


def test_capacity_factor_override_at_call():
  layer = make_moe(capacity_factor=0.5, eval_capacity_factor=0.5)
  x = inputs()
  _, aux = apply(layer, x, None, 0, False)
  assert float(aux["dropped"]) > 0
  y, aux = layer(x, train=False, capacity_factor=E / K)  # C = N: everything fits.
  ref = reference(layer, x, None, None, E / K)
  check_against_reference(y, aux, ref)


def test_gates_sum_to_one_over_chosen_experts():
  layer = make_moe()
  x = inputs().reshape(-1, D)
  valid = jnp.arange(x.shape[0]) % 5 != 0
  noise = jax.random.normal(jax.random.key(1), (x.shape[0], E))
  expert_index, gates, _ = layer.gate(x, valid, noise)
  assert expert_index.shape == gates.shape == (K, x.shape[0])
  np.testing.assert_allclose(gates.sum(0), valid.astype(jnp.float32), rtol=1e-6)
  assert bool(jnp.all(expert_index[0] != expert_index[1]))  # K distinct experts per token.
  assert bool(jnp.all(gates[0] >= gates[1]))  # Best first.


def test_zero_initialised_gate_routes_uniformly_and_learns():
  layer = make_moe(random_gate=False, capacity_factor=1.25)
  assert not np.any(layer.w_gate[...]) and not np.any(layer.w_noise[...])
  x = inputs(b=16, l=32)
  _, aux = apply(layer, x, None, 0, True)
  np.testing.assert_allclose(aux["load"], np.full(E, 1 / E), atol=0.06)
  np.testing.assert_allclose(aux["importance"] / (x.shape[0] * x.shape[1]), 1 / E, atol=0.06)

  target = jax.random.normal(jax.random.key(9), x.shape)

  def loss_fn(layer, key):
    y, aux = layer(x, train=True, rngs=nnx.Rngs(dropout=key))
    return jnp.mean((y - target) ** 2) + aux["loss"]

  grad_fn = nnx.jit(nnx.grad(loss_fn))
  for step in range(2):  # At init, and after one SGD step.
    grads = grad_fn(layer, jax.random.key(step))
    for name in ("w_gate", "w_noise", "w_in", "b_in", "w_out", "b_out"):
      g = np.asarray(grads[name][...])
      assert np.all(np.isfinite(g)), name
      assert np.any(g != 0), name
    nnx.update(layer, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(layer, nnx.Param), grads))
  assert np.any(layer.w_gate[...] != 0)


def dense_output(params, x, noise, keep):
  """Every expert on every token, combined with the gates of the kept assignments [N, K]."""
  n = x.shape[0] * x.shape[1]
  tokens = x.reshape(n, D)
  std = jax.nn.softplus(tokens @ params["w_noise"]) + 0.01
  logits = tokens @ params["w_gate"] + noise * std  # [N, E]
  top_logits, top_index = jax.lax.top_k(logits, K)  # [N, K]
  gates = jax.nn.softmax(top_logits, axis=-1) * keep  # [N, K]
  weights = jnp.einsum("NKE,NK->NE", jax.nn.one_hot(top_index, E), gates)  # [N, E]
  h = jax.nn.relu(jnp.einsum("ND,EDH->NEH", tokens, params["w_in"]) + params["b_in"])
  out = jnp.einsum("NEH,EHD->NED", h, params["w_out"]) + params["b_out"]  # [N, E, D]
  return jnp.einsum("NE,NED->ND", weights, out).reshape(x.shape)


def test_gradients_match_dense_reference():
  factor = 0.5  # Some assignments are dropped: they must get no gradient.
  layer = make_moe(capacity_factor=factor)
  x = inputs()
  n = x.shape[0] * x.shape[1]
  noise = noise_of(4, n)
  keep = jnp.asarray(reference(layer, x, None, noise, factor)["keep"], jnp.float32)
  target = jax.random.normal(jax.random.key(8), x.shape)
  names = ("w_gate", "w_noise", "w_in", "b_in", "w_out", "b_out")

  def loss_fast(layer, x):
    y, _ = layer(x, train=True, rngs=nnx.Rngs(dropout=jax.random.key(4)))
    return jnp.sum((y - target) ** 2)

  def loss_dense(params, x):
    return jnp.sum((dense_output(params, x, noise, keep) - target) ** 2)

  grads, dx = nnx.jit(nnx.grad(loss_fast, argnums=(0, 1)))(layer, x)
  params = {name: getattr(layer, name)[...] for name in names}
  ref_grads, ref_dx = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(params, x)
  for name in names:
    np.testing.assert_allclose(
        grads[name][...], ref_grads[name], rtol=1e-4, atol=1e-5, err_msg=name
    )
  np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_padded_tokens_change_nothing(train):
  factor = 0.75  # Small enough that padded tokens would take slots if they were dispatched.
  layer = make_moe(capacity_factor=factor, eval_capacity_factor=factor)
  x = inputs()
  mask = jnp.arange(x.shape[1])[None, :] < jnp.array([[6], [3], [2]])  # [B, L]
  junk = 100.0 * jax.random.normal(jax.random.key(5), x.shape)
  x_junk = jnp.where(mask[..., None], x, junk)
  y1, aux1 = apply(layer, x, mask, 1, train)
  y2, aux2 = apply(layer, x_junk, mask, 1, train)
  np.testing.assert_allclose(y1, y2, rtol=1e-6, atol=1e-6)
  assert not np.any(y1[~mask])  # Padded positions get zeros.
  for key in aux1:
    np.testing.assert_allclose(aux1[key], aux2[key], rtol=1e-6, atol=1e-7, err_msg=key)

  n_real = int(mask.sum())
  assert float(aux1["importance"].sum()) == pytest.approx(n_real, rel=1e-5)
  np.testing.assert_allclose(aux1["load"].sum(), 1.0, rtol=1e-6)
  n = x.shape[0] * x.shape[1]
  ref = reference(layer, x, mask, noise_of(1, n) if train else None, factor)
  assert float(aux1["dropped"]) == ref["dropped"]
  np.testing.assert_allclose(aux1["dropped_fraction"], ref["dropped"] / (n_real * K), rtol=1e-6)
  np.testing.assert_allclose(y1, ref["y"], rtol=1e-4, atol=1e-5)


def test_expert_parameters_carry_logical_axes():
  layer = make_moe()
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  assert tuple(specs["w_in"].get_value()) == (EXPERT, EMBED, MLP)
  assert tuple(specs["w_out"].get_value()) == (EXPERT, MLP, EMBED)
  assert tuple(specs["b_in"].get_value()) == (EXPERT, MLP)
  assert tuple(specs["b_out"].get_value()) == (EXPERT, EMBED)
  assert layer.w_in.get_metadata()["out_sharding"][0] == EXPERT
  assert layer.w_in[...].shape == (E, D, H)
  assert layer.w_out[...].shape == (E, H, D)


def test_capacity():
  assert moe_lib.capacity(8192, 8, 2, 1.25) == 2560
  assert moe_lib.capacity(10, 4, 2, 100.0) == 10  # At most N.
  assert moe_lib.capacity(3, 30, 2, 1.0) == 1


@pytest.mark.parametrize("train", [False, True])
def test_jit_and_bfloat16(train):
  layer = make_moe()
  layer16 = make_moe(dtype=jnp.bfloat16)
  x = inputs()

  @nnx.jit(static_argnames="train")
  def run(layer, x, key, train):
    return layer(x, train=train, rngs=nnx.Rngs(dropout=key))

  y, aux = run(layer, x, jax.random.key(2), train)
  y_eager, aux_eager = layer(x, train=train, rngs=nnx.Rngs(dropout=jax.random.key(2)))
  np.testing.assert_allclose(y, y_eager, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["loss"], aux_eager["loss"], rtol=1e-5)

  x16 = x.astype(jnp.bfloat16)
  y16, aux16 = run(layer16, x16, jax.random.key(2), train)
  assert y16.dtype == jnp.bfloat16
  assert aux16["loss"].dtype == jnp.float32 and aux16["load"].dtype == jnp.float32
  # Same routing as float32 on the same (rounded) inputs: gating runs in float32.
  y32, aux32 = run(layer, x16.astype(jnp.float32), jax.random.key(2), train)
  np.testing.assert_allclose(aux16["loss"], aux32["loss"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)


def test_training_needs_rngs():
  with pytest.raises(ValueError, match="rngs"):
    make_moe()(inputs(), train=True)
