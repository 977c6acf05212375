"""Image: the paper's conv stem (Xception entry flow), any H x W, flattened to positions.

[B, H, W, C] -> two 3x3 convs (the first strided) -> `res_blocks` residual blocks of separable
convs with stride-2 max pooling -> dense to D -> [B, H' * W', D] with H' = H / 2^(1 + res_blocks).
Paddings are explicit so output positions do not depend on the image size parity.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import kernels, sharding

Array = jax.Array
PAD1 = ((1, 1), (1, 1))


def _conv(i, o, kernel, *, strides=1, groups=1, padding=PAD1, dtype, param_dtype, rngs):
  return nnx.Conv(i, o, (kernel, kernel), strides=strides, padding=padding,
                  feature_group_count=groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                  kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                    (sharding.CONV, sharding.CONV, None, None)))


def _windows3x3(x: Array, stride: int = 1, fill: float = 0.0) -> list[Array]:
  """The nine [B, H', W', C] windows of a 3x3 kernel with padding 1 (pad value `fill`) over
  [B, H, W, C], in (dy, dx) order; H' = (H - 1) // stride + 1."""
  h, w = (x.shape[1] - 1) // stride + 1, (x.shape[2] - 1) // stride + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=fill)
  return [padded[:, dy:dy + stride * (h - 1) + 1:stride, dx:dx + stride * (w - 1) + 1:stride]
          for dy in range(3) for dx in range(3)]


def _depthwise3x3_f32(x: Array, kernel: Array, bias: Array) -> Array:
  """bias [C] + sum over the 9 taps of kernel [9, C] * window of x [B, H, W, C], in float32."""
  y = bias
  for tap, window in zip(kernel, _windows3x3(x)):
    y = y + window * tap
  return y


@jax.custom_vjp
def _depthwise3x3_op(x: Array, kernel: Array, bias: Array) -> Array:
  return _depthwise3x3_f32(x, kernel, bias)


def _depthwise3x3_fwd(x, kernel, bias):
  """Under differentiation only; outside it (evaluation, decoding, export) the primal runs."""
  if kernels.usable():
    return kernels.depthwise3x3_forward(x, kernel, bias), (x, kernel, bias)
  return _depthwise3x3_f32(x, kernel, bias), (x, kernel, bias)


def _depthwise3x3_bwd(residuals, grad):
  """On one CPU device, the C++ kernels (one pass over the rows; docs/performance.md); elsewhere,
  and where they cannot be built, JAX's own gradient of the shifted products."""
  if kernels.usable():
    return kernels.depthwise3x3_backward(residuals[0], residuals[1], grad)
  return jax.vjp(_depthwise3x3_f32, *residuals)[1](grad)


_depthwise3x3_op.defvjp(_depthwise3x3_fwd, _depthwise3x3_bwd)


def _depthwise3x3(conv: nnx.Conv, x: Array) -> Array:
  """`conv` (3x3, one filter per channel, padding 1) as 9 shifted multiply-adds: [B, H, W, C].

  Same result as calling the grouped convolution, but XLA on CPU differentiates a grouped
  convolution's kernel as a dense one (C times the FLOPs: most of an image step's backward pass);
  shifted products differentiate into shifted products and sums, and on a CPU the C++ kernel of
  `multimodel.kernels` computes that backward pass in one go (docs/performance.md).
  """
  kernel = conv.kernel[...].astype(conv.dtype).astype(jnp.float32)  # [3, 3, 1, C]
  kernel = kernel.reshape(9, kernel.shape[-1])  # [9, C], (dy, dx) order
  bias = conv.bias[...].astype(conv.dtype).astype(jnp.float32)  # [C]; sums in float32
  y = _depthwise3x3_op(x.astype(conv.dtype).astype(jnp.float32), kernel, bias)
  return y.astype(conv.dtype)


def _pointwise(conv: nnx.Conv, x: Array, stride: int = 1) -> Array:
  """`conv` (1x1, padding VALID) as one [N, C] x [C, O] matmul: [B, H, W, C] -> [B, H', W', O].

  XLA's CPU convolution runs a 1x1 kernel (forward and backward) about 7x slower than the same
  product as a matmul over the flattened positions (docs/performance.md).
  """
  x = x[:, ::stride, ::stride].astype(conv.dtype)  # A strided 1x1 VALID conv picks every stride-th.
  b, h, w, c = x.shape
  kernel = conv.kernel[...].astype(conv.dtype)[0, 0]  # [C, O]
  y = x.reshape(b * h * w, c) @ kernel + conv.bias[...].astype(conv.dtype)
  return y.reshape(b, h, w, kernel.shape[-1])


def _dense3x3(conv: nnx.Conv, x: Array) -> Array:
  """`conv` (3x3, padding 1, its own stride) as one [N, 9C] x [9C, O] matmul over shifted inputs.

  [B, H, W, C] -> [B, H', W', O] with H' = (H - 1) // stride + 1. Same result as the convolution;
  XLA's CPU convolution of the stem's 3x3 kernels runs slower than this product (forward and
  backward; docs/performance.md).
  """
  stride = conv.strides if isinstance(conv.strides, int) else conv.strides[0]
  patches = jnp.concatenate(_windows3x3(x.astype(conv.dtype), stride), axis=-1)  # [B, H', W', 9C]
  b, h, w = patches.shape[:3]  # 9C in (dy, dx, c) order
  kernel = conv.kernel[...].astype(conv.dtype)  # [3, 3, C, O]
  kernel = kernel.reshape(-1, kernel.shape[-1])  # [9C, O], the same order
  y = patches.reshape(b * h * w, -1) @ kernel + conv.bias[...].astype(conv.dtype)
  return y.reshape(b, h, w, kernel.shape[-1])


def _layer_norm_f32(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  """nnx.LayerNorm's computation over the last axis (E[x^2] - E[x]^2, clipped at 0), float32."""
  mean = x.mean(-1, keepdims=True)
  var = jnp.maximum(0.0, (x * x).mean(-1, keepdims=True) - mean * mean)
  return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_op(x: Array, scale: Array, bias: Array, eps: float) -> Array:
  return _layer_norm_f32(x, scale, bias, eps)


def _layer_norm_fwd(x, scale, bias, eps):
  """Under differentiation only: the kernels keep x and recompute the statistics backward."""
  if kernels.usable():
    return kernels.layer_norm_forward(x, scale, bias, eps), (x, scale, bias)
  return _layer_norm_f32(x, scale, bias, eps), (x, scale, bias)


def _layer_norm_bwd(eps, residuals, grad):
  if kernels.usable():
    return kernels.layer_norm_backward(residuals[0], residuals[1], grad, eps)
  return jax.vjp(lambda *a: _layer_norm_f32(*a, eps), *residuals)[1](grad)


_layer_norm_op.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _layer_norm(norm: nnx.LayerNorm, x: Array) -> Array:
  """`norm` (over channels, float32) applied to x [..., C]: the same values as `norm(x)`; on one CPU
  device its gradient comes from the C++ kernels (the same up to rounding, except where the
  variance is clipped at 0). XLA's CPU backward of the stem's layer norms (the sums over positions
  of dscale and dbias) ran about twice as slow (docs/performance.md)."""
  if not (norm.use_scale and norm.use_bias and norm.use_fast_variance
          and norm.reduction_axes == -1 and norm.feature_axes == -1):
    raise ValueError("the stem's layer norm computes nnx.LayerNorm's defaults only (scale, bias, "
                     "fast variance, over the last axis); got "
                     f"use_scale={norm.use_scale}, use_bias={norm.use_bias}, use_fast_variance="
                     f"{norm.use_fast_variance}, reduction_axes={norm.reduction_axes}")
  return _layer_norm_op(x.astype(jnp.float32), norm.scale[...].astype(jnp.float32),
                        norm.bias[...].astype(jnp.float32), norm.epsilon)


def _max_pool3x3s2_slices(x: Array) -> Array:
  return functools.reduce(jnp.maximum, _windows3x3(x, 2, fill=-jnp.inf))


@jax.custom_vjp
def _max_pool3x3s2(x: Array) -> Array:
  """3x3 max pool, stride 2, padding 1, as the maximum of 9 strided slices: [B, H, W, C].

  The same values and gradient as `nnx.max_pool` (apart from exact ties), but XLA's CPU backward
  of a pooling window (select-and-scatter) is about 8x slower than that of the slices; on one CPU
  device a C++ kernel does the backward pass in one go (docs/performance.md). Of tied maxima the
  kernel gives the gradient to the first tap, as `nnx.max_pool` does; the slices' own gradient
  (elsewhere) splits it.
  """
  return _max_pool3x3s2_slices(x)


def _max_pool3x3s2_fwd(x):
  """Under differentiation only: the kernel keeps the winning tap of each output for the backward."""
  if kernels.usable() and x.dtype == jnp.float32:
    y, taps = kernels.max_pool3x3s2_forward(x)
    return y, (taps, x.shape)
  return _max_pool3x3s2_slices(x), (x, None)


def _max_pool3x3s2_bwd(residuals, grad):
  kept, shape = residuals
  if shape is not None:  # The kernel's taps.
    return (kernels.max_pool3x3s2_backward(kept, grad, shape),)
  return jax.vjp(_max_pool3x3s2_slices, kept)[1](grad)


_max_pool3x3s2.defvjp(_max_pool3x3s2_fwd, _max_pool3x3s2_bwd)


class _SepConv2D(nnx.Module):
  """Depthwise 3x3 then pointwise 1x1, then layer norm over channels."""

  def __init__(self, i, o, **kw):
    self.depthwise = _conv(i, i, 3, groups=i, **kw)  # Its parameters; applied by _depthwise3x3.
    self.pointwise = _conv(i, o, 1, padding="VALID", **kw)  # Applied by _pointwise.
    self.norm = nnx.LayerNorm(o, dtype=jnp.float32, param_dtype=kw["param_dtype"], rngs=kw["rngs"])

  def __call__(self, x):
    y = _pointwise(self.pointwise, _depthwise3x3(self.depthwise, x))
    return _layer_norm(self.norm, y).astype(x.dtype)


class _ResBlock(nnx.Module):
  """relu-sepconv-relu-sepconv, 3x3/2 max pool, plus a strided 1x1 conv shortcut. Halves H, W."""

  def __init__(self, i, o, **kw):
    self.sep1, self.sep2 = _SepConv2D(i, o, **kw), _SepConv2D(o, o, **kw)
    self.shortcut = _conv(i, o, 1, strides=2, padding="VALID", **kw)  # Applied by _pointwise.

  def __call__(self, x):
    y = self.sep2(jax.nn.relu(self.sep1(jax.nn.relu(x))))
    return _max_pool3x3s2(y) + _pointwise(self.shortcut, x, stride=2)


class Image(nnx.Module):
  """Image input modality: [B, H, W, C] float (normalised) -> ([B, H'*W', D], None)."""

  def __init__(self, d_model: int, *, channels: int = 3, stem_filters: int = 32,
               res_blocks: int = 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    f = stem_filters
    self.dtype = dtype
    self.conv1 = _conv(channels, f, 3, strides=2, **kw)  # Applied by _dense3x3, as is conv2.
    self.norm1 = nnx.LayerNorm(f, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.conv2 = _conv(f, 2 * f, 3, **kw)
    self.norm2 = nnx.LayerNorm(2 * f, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    widths = [2 * f * 2 ** (i + 1) for i in range(res_blocks)]  # Xception: 128, 256, 512...
    self.blocks = nnx.List([_ResBlock(i, o, **kw) for i, o in zip([2 * f] + widths, widths)])
    self.project = nnx.Linear(
        ([2 * f] + widths)[-1], d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, sharding.EMBED)))

  def encode(self, inputs: Array, input_mask: Array | None = None, *, train: bool = False,
             rngs: nnx.Rngs | None = None) -> tuple[Array, None]:
    del input_mask, train, rngs  # Images are never padded.
    x = inputs.astype(self.dtype)  # [B, H, W, C]
    x = jax.nn.relu(_layer_norm(self.norm1, _dense3x3(self.conv1, x))).astype(self.dtype)
    x = jax.nn.relu(_layer_norm(self.norm2, _dense3x3(self.conv2, x))).astype(self.dtype)
    for block in self.blocks:
      x = block(x)  # [B, H/2, W/2, F]
    x = self.project(x)  # [B, H', W', D]
    return x.reshape(x.shape[0], -1, x.shape[-1]), None  # [B, H'*W', D]
