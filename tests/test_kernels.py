"""The C++ CPU kernels of `multimodel.kernels`: built here, same values as the jax.numpy forms."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modalities import image
from multimodel import kernels

SHAPES = [(2, 5, 7, 3), (1, 1, 1, 4), (3, 1, 6, 2), (2, 6, 1, 5), (2, 9, 8, 33)]


def arrays(shape, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return f(*shape), f(9, shape[-1]), f(shape[-1]), f(*shape)  # x, kernel, bias, grad of y


def test_the_kernels_build_and_are_used_here():
  """The test command's setup (data/setup_sources.sh) installs g++, so the kernels must build here
  and training steps on one CPU device must call them. (Without a compiler training still works,
  through the jax.numpy forms; this test then fails on purpose.)"""
  assert kernels.usable(), "the C++ kernels did not build: see the warning logged above"
  x, k, b, g = arrays((2, 5, 7, 3))
  grad = jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(image._depthwise3x3_op(x, k, b) * g),
                          argnums=(0, 1, 2)))
  hlo = grad.lower(x, k, b).as_text()
  assert "multimodel_depthwise3x3_forward" in hlo and "multimodel_depthwise3x3_backward" in hlo
  pool = jax.jit(jax.value_and_grad(lambda x: jnp.sum(image._max_pool3x3s2(x) ** 2)))
  hlo = pool.lower(x).as_text()
  assert "multimodel_max_pool3x3s2_forward" in hlo and "multimodel_max_pool3x3s2_backward" in hlo
  norm = nnx.LayerNorm(3, rngs=nnx.Rngs(0))
  hlo = jax.jit(jax.value_and_grad(lambda x: jnp.sum(image._layer_norm(norm, x) ** 2))).lower(
      x).as_text()
  assert "multimodel_layer_norm_forward" in hlo and "multimodel_layer_norm_backward" in hlo


@pytest.mark.parametrize("shape", SHAPES)
def test_depthwise_kernels_match_the_shifted_products(shape):
  """Forward and backward against autodiff of the jax.numpy form; sizes 1 in H or W, odd channel
  counts. (The forward adds in the same order, but XLA may fuse a multiply-add: not bit for bit.)"""
  x, k, b, g = arrays(shape)
  y, vjp = jax.vjp(image._depthwise3x3_f32, x, k, b)
  np.testing.assert_allclose(jax.jit(kernels.depthwise3x3_forward)(x, k, b), y, rtol=1e-6,
                             atol=1e-6)
  got = jax.jit(kernels.depthwise3x3_backward)(x, k, g)
  for name, ours, want in zip(["dx", "dkernel", "dbias"], got, vjp(g), strict=True):
    assert ours.shape == want.shape, name
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5, err_msg=name)


def nnx_pool(x):
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", SHAPES + [(2, 8, 6, 4), (1, 2, 3, 5)])
def test_max_pool_kernels_match_nnx(shape):
  """Values bit for bit, winning taps, and gradients against nnx.max_pool (select-and-scatter),
  odd and even sizes."""
  x, *_ = arrays(shape)
  y, taps = jax.jit(kernels.max_pool3x3s2_forward)(x)
  np.testing.assert_array_equal(y, nnx_pool(x))
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  dy, dx = np.asarray(taps) // 3, np.asarray(taps) % 3  # The tap points at the maximum.
  b, i, j, c = np.indices(y.shape)
  np.testing.assert_array_equal(padded[b, 2 * i + dy, 2 * j + dx, c], y)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * probe)))(x)
  np.testing.assert_array_equal(grad(image._max_pool3x3s2), grad(nnx_pool))


def test_max_pool_kernel_keeps_nan_and_gives_ties_to_the_first_tap():
  """A NaN anywhere in a window makes its output NaN (so the trainer sees a non-finite loss); of
  equal maxima the first tap in (dy, dx) order takes the whole gradient."""
  x = jnp.zeros((1, 4, 4, 2), jnp.float32).at[0, 1, 1, 0].set(jnp.nan)
  y, taps = jax.jit(kernels.max_pool3x3s2_forward)(x)
  assert np.isnan(y[0, 0, 0, 0]) and np.isnan(y[0, 1, 1, 0]) and not np.isnan(y[0, 0, 0, 1])
  np.testing.assert_array_equal(taps[0, :, :, 1], [[4, 3], [1, 0]])
  dx = jax.jit(kernels.max_pool3x3s2_backward, static_argnums=2)(
      taps, jnp.ones(y.shape, jnp.float32), x.shape)
  assert float(dx[..., 1].sum()) == 4.0 and float(dx[0, 0, 0, 1]) == 1.0


@pytest.mark.parametrize("shape", [(2, 5, 7, 16), (3, 9, 128), (700, 33), (4, 1)])
def test_layer_norm_matches_nnx(shape):
  """The stem's layer norm: its jax.numpy form equals nnx.LayerNorm bit for bit, and the kernels'
  values and gradients (scale, bias, input) agree with nnx's; more than one chunk of rows."""
  rng = np.random.default_rng(4)
  norm = nnx.LayerNorm(shape[-1], rngs=nnx.Rngs(0))
  norm.scale[...] = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  norm.bias[...] = jnp.asarray(rng.normal(size=shape[-1]), jnp.float32)
  x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, jnp.float32)
  probe = jnp.asarray(rng.normal(size=shape), jnp.float32)
  want = jax.jit(lambda x: norm(x))(x)
  np.testing.assert_array_equal(jax.jit(lambda x: image._layer_norm(norm, x))(x), want)
  forward = jax.jit(kernels.layer_norm_forward, static_argnums=3)
  np.testing.assert_allclose(forward(x, norm.scale[...], norm.bias[...], norm.epsilon), want,
                             rtol=1e-5, atol=1e-5)
  graphdef, params = nnx.split(norm)
  grads = lambda f: jax.tree.leaves(jax.jit(jax.grad(
      lambda p, x: jnp.sum(f(nnx.merge(graphdef, p), x) * probe), argnums=(0, 1)))(params, x))
  for ours, reference in zip(grads(image._layer_norm), grads(lambda n, x: n(x)), strict=True):
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_backward_passes_are_deterministic():
  """Partial sums are added in a fixed order (chunks fixed by the shape): the same bits on every
  call, however the pool's threads pick up the chunks."""
  x, k, _, g = arrays((4, 37, 29, 16), seed=1)
  for backward in (jax.jit(kernels.depthwise3x3_backward),
                   jax.jit(lambda x, k, g: kernels.layer_norm_backward(x, k[0], g, 1e-6))):
    first = backward(x, k, g)
    for _ in range(3):
      for a, b in zip(first, backward(x, k, g), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stem_gradients_with_and_without_the_kernels(monkeypatch):
  """The image stem's depthwise conv differentiates the same either way, in a model's own params."""
  block = image._SepConv2D(6, 10, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 5, 6)), jnp.float32)
  probe = jnp.asarray(np.random.default_rng(3).normal(size=(2, 7, 5, 6)), jnp.float32)
  graphdef, params = nnx.split(block.depthwise)

  def grads():  # Traced afresh on each call, so `usable` is asked again.
    loss = lambda p, y: jnp.sum(image._depthwise3x3(nnx.merge(graphdef, p), y) * probe)
    return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x))

  with_kernels = grads()
  monkeypatch.setattr(kernels, "usable", lambda: False)
  for ours, reference in zip(with_kernels, grads(), strict=True):
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_inference_never_calls_the_kernels():
  """Outside differentiation the stem runs the jax.numpy forms (all three kernels' operations are
  in this block), so exported programs need no kernel, while its gradient does call them."""
  assert kernels.usable()
  block = image._ResBlock(3, 4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 6, 6, 3), jnp.float32)
  exported = jax.export.export(jax.jit(lambda x: block(x)))(x)
  assert "multimodel_" not in exported.mlir_module()
  trained = jax.jit(jax.grad(lambda x: jnp.sum(block(x)))).lower(x).as_text()
  for name in ("depthwise3x3", "max_pool3x3s2", "layer_norm"):
    assert f"multimodel_{name}_backward" in trained


def test_bfloat16_stem_trains_through_the_kernels(monkeypatch):
  """A bfloat16 stem casts to float32 around the kernels: its gradients match the jnp forms'."""
  stem = image.Image(8, stem_filters=4, res_blocks=1, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(stem)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, 12, 3)), jnp.float32)

  def grads():
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).encode(x)[0].astype(jnp.float32) ** 2)
    return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

  with_kernels = grads()
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in with_kernels)
  monkeypatch.setattr(kernels, "usable", lambda: False)
  for ours, reference in zip(with_kernels, grads(), strict=True):
    scale = float(jnp.max(jnp.abs(reference))) + 1e-6
    np.testing.assert_allclose(ours / scale, reference / scale, atol=1e-4)


def test_stem_layer_norm_refuses_other_settings():
  norm = nnx.LayerNorm(4, use_fast_variance=False, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_fast_variance=False"):
    image._layer_norm(norm, jnp.ones((2, 4)))


def test_build_errors_name_the_cause(tmp_path, monkeypatch):
  """No compiler, or a source that does not compile: KernelBuildError saying which and why."""
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(kernels.KernelBuildError, match="no-such-compiler"):
    kernels.build(directory=tmp_path)
  monkeypatch.delenv("CXX")
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(kernels.KernelBuildError, match="broken.cc"):
    kernels.build(broken, directory=tmp_path)
  assert not list(tmp_path.glob("*.so"))


def test_the_build_is_cached(tmp_path):
  """A second build of the same source is the same file, not compiled again."""
  first = kernels.build(directory=tmp_path)
  mtime = first.stat().st_mtime_ns
  assert kernels.build(directory=tmp_path) == first and first.stat().st_mtime_ns == mtime
  assert pathlib.Path(first).suffix == ".so"


def test_kernels_reject_wrong_shapes_and_dtypes():
  x, k, b, g = arrays((2, 5, 7, 3))
  with pytest.raises(ValueError, match="kernel"):
    kernels.depthwise3x3_forward(x, k[:4], b)
  with pytest.raises(ValueError, match="grad"):
    kernels.depthwise3x3_backward(x, k, g[:1])
  with pytest.raises(TypeError, match="bfloat16"):
    kernels.depthwise3x3_forward(x.astype(jnp.bfloat16), k, b)
  with pytest.raises(ValueError, match="float32"):
    kernels.max_pool3x3s2_forward(x.astype(jnp.bfloat16))
  with pytest.raises(ValueError, match="scale"):
    kernels.layer_norm_forward(x, b[:2], b, 1e-6)
  with pytest.raises(ValueError, match="pooled"):
    kernels.max_pool3x3s2_backward(jnp.zeros((2, 3, 4, 3), jnp.uint8), g, x.shape)
