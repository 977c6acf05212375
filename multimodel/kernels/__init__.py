"""Hand-written CPU kernels, called from jitted code through XLA's FFI.

XLA's CPU backend runs a few of the network's operations far below the machine's speed where no
formulation in `jax.numpy` does better (docs/performance.md). For those, a C++ source file beside
this module is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`), for the
machine it runs on, and cached under `$MULTIMODEL_CACHE` (default `~/.cache/multimodel`) by a hash
of the source, the compiler command, the jax and jaxlib versions and the CPU. Nothing is built at
install time and nothing is required: where there is no compiler, the build fails, the platform
is not a CPU, or the process sees more than one device (an FFI call has no sharding rule),
`usable()` is False and callers use their `jax.numpy` form, which computes the same values.
`MULTIMODEL_CPU_KERNELS=0` turns the kernels off.

Kernels only ever appear in gradients (custom VJPs), so exported inference programs never call
them and need nothing of this package.

- `depthwise3x3_forward(x, kernel, bias)` and `depthwise3x3_backward(x, kernel, grad)`: a 3x3
  depthwise convolution (stride 1, padding 1) over [B, H, W, C] float32, and its gradient
  (dx, dkernel [9, C], dbias [C]).
- `max_pool3x3s2_forward(x)` and `max_pool3x3s2_backward(taps, grad, shape)`: a 3x3 max pool,
  stride 2, padding 1, with the tap that won each output, and the gradient that hands each
  output's gradient to that tap's input.
- `layer_norm_forward(x, scale, bias, eps)` and `layer_norm_backward(x, scale, grad, eps)`:
  nnx.LayerNorm over the last axis, and its gradient (dx, dscale, dbias).
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("cpu_kernels.cc")
# FFI target name -> the library's handler symbol.
TARGETS = {"multimodel_depthwise3x3_forward": "MultimodelDepthwise3x3Forward",
           "multimodel_depthwise3x3_backward": "MultimodelDepthwise3x3Backward",
           "multimodel_max_pool3x3s2_forward": "MultimodelMaxPool3x3s2Forward",
           "multimodel_max_pool3x3s2_backward": "MultimodelMaxPool3x3s2Backward",
           "multimodel_layer_norm_forward": "MultimodelLayerNormForward",
           "multimodel_layer_norm_backward": "MultimodelLayerNormBackward"}
BUILD_TIMEOUT_S = 600
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class KernelBuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded (the message says why)."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("MULTIMODEL_CACHE", "~/.cache/multimodel")).expanduser()


def _cpu_signature() -> str:
  """What `-march=native` compiles for: the CPU's model and feature flags, where Linux says."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  keep = [l for l in lines if l.startswith(("model name", "flags", "Features", "CPU part"))]
  return "\n".join(sorted(set(keep))) or platform.machine()


def build(source: pathlib.Path = SOURCE, directory: pathlib.Path | None = None) -> pathlib.Path:
  """Compiles `source` into a shared library (cached; safe to call from several processes)."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise KernelBuildError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX)")
  command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256("\0".join([source.read_text(), *command, jax.__version__,
                                  jaxlib.__version__, _cpu_signature()]).encode()).hexdigest()[:16]
  directory = directory or cache_dir() / "kernels"
  library = directory / f"{source.stem}-{key}.so"
  if library.exists():
    return library
  directory.mkdir(parents=True, exist_ok=True)
  log.info("compiling the CPU kernels: %s -> %s", source.name, library)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:  # Then an atomic rename into place.
    out = pathlib.Path(tmp) / library.name
    try:
      done = subprocess.run([*command, str(source), "-o", str(out)], capture_output=True,
                            text=True, check=False, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      raise KernelBuildError(f"compiling {source} took over {BUILD_TIMEOUT_S} s") from e
    if done.returncode != 0:
      raise KernelBuildError(f"compiling {source} failed ({' '.join(command)}):\n"
                             f"{done.stderr[-2000:]}")
    os.replace(out, library)
  return library


_LOCK = threading.Lock()


@functools.cache
def _load() -> bool:
  """Builds, loads and registers the kernels once per process; False (logged) where it fails."""
  if os.environ.get("MULTIMODEL_CPU_KERNELS", "1") == "0":
    log.info("CPU kernels turned off (MULTIMODEL_CPU_KERNELS=0)")
    return False
  with _LOCK:  # One build and registration even when two threads trace at once.
    try:
      library = ctypes.cdll.LoadLibrary(str(build()))
      for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                    platform="cpu")
    except Exception as e:  # pylint: disable=broad-except  # Any failure: the jnp forms.
      log.warning("CPU kernels unavailable, using the jax.numpy forms (slower on CPU): %s", e)
      return False
  return True


def _call(target: str, out, *args, **attributes):
  """ffi_call of a registered target, loading the library first (any caller may come first)."""
  if not _load():
    raise KernelBuildError(f"{target}: the CPU kernels are unavailable (the logged warning says "
                           "why); callers check usable() first")
  return jax.ffi.ffi_call(target, out)(*args, **attributes)


def usable() -> bool:
  """Whether a jitted computation traced now may call the kernels: on a single CPU device."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and _load()


def _check(name: str, x: jax.Array, layout: str, **expected: tuple[jax.Array, tuple]) -> None:
  """x and the `expected` arrays (name -> (array, its shape)) must be float32; x [B, H, W, C]
  where `layout` says so, else [..., C]."""
  arrays = {"x": x, **{k: array for k, (array, _) in expected.items()}}
  if any(a.dtype != jnp.float32 for a in arrays.values()):
    raise TypeError(f"{name} takes float32; got "
                    + ", ".join(f"{k} {a.dtype}" for k, a in arrays.items()))
  rank_ok = x.ndim == 4 if layout == "[B, H, W, C]" else x.ndim >= 1
  if not rank_ok or any(a.shape != shape for a, shape in expected.values()):
    raise ValueError(f"{name}: expected x {layout}"
                     + "".join(f", {k} {shape}" for k, (_, shape) in expected.items())
                     + "; got " + ", ".join(f"{k} {a.shape}" for k, a in arrays.items()))


def depthwise3x3_forward(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """y [B, H, W, C] = bias + sum_t kernel[t] * window_t(x), all float32.

  Window t = 3 * dy + dx is x shifted by (dy - 1, dx - 1) with zero padding. Call where `usable()`
  is True (elsewhere it raises KernelBuildError).
  """
  _check("depthwise3x3_forward", x, "[B, H, W, C]", kernel=(kernel, (9, x.shape[-1])),
         bias=(bias, x.shape[-1:]))
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return _call("multimodel_depthwise3x3_forward", out, x, kernel, bias)


def depthwise3x3_backward(x: jax.Array, kernel: jax.Array, grad: jax.Array):
  """(dx [B, H, W, C], dkernel [9, C], dbias [C]) of `depthwise3x3_forward`, given the gradient
  of y; all float32."""
  _check("depthwise3x3_backward", x, "[B, H, W, C]", kernel=(kernel, (9, x.shape[-1])),
         grad=(grad, x.shape))
  c = x.shape[-1]
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((9, c), jnp.float32),
         jax.ShapeDtypeStruct((c,), jnp.float32))
  return _call("multimodel_depthwise3x3_backward", out, x, kernel, grad)


def max_pool3x3s2_forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(y [B, H', W', C], winning tap uint8 [B, H', W', C]) of a 3x3 max pool, stride 2, padding 1.

  H' = (H - 1) // 2 + 1. The tap t = 3 * dy + dx is the first maximum in t order (a NaN wins).
  Call where `usable()` is True (elsewhere it raises KernelBuildError).
  """
  if x.dtype != jnp.float32 or x.ndim != 4:
    raise ValueError(f"max_pool3x3s2_forward takes float32 [B, H, W, C]; got {x.dtype} "
                     f"{x.shape}")
  b, h, w, c = x.shape
  pooled = (b, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c)
  out = (jax.ShapeDtypeStruct(pooled, jnp.float32), jax.ShapeDtypeStruct(pooled, jnp.uint8))
  return _call("multimodel_max_pool3x3s2_forward", out, x)


def max_pool3x3s2_backward(taps: jax.Array, grad: jax.Array, shape: tuple) -> jax.Array:
  """dx [B, H, W, C] (`shape`) of `max_pool3x3s2_forward`, given its taps and the gradient of y."""
  b, h, w, c = shape
  pooled = (b, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c)
  if taps.shape != pooled or grad.shape != pooled or taps.dtype != jnp.uint8 or (
      grad.dtype != jnp.float32):
    raise ValueError(f"max_pool3x3s2_backward: expected uint8 taps and float32 grad of shape "
                     f"{pooled} (pooled from {tuple(shape)}); got taps {taps.dtype} {taps.shape}, "
                     f"grad {grad.dtype} {grad.shape}")
  out = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
  return _call("multimodel_max_pool3x3s2_backward", out, taps, grad)


def layer_norm_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """nnx.LayerNorm over the last axis (fast variance, clipped at 0), float32."""
  _check("layer_norm_forward", x, "[..., C]", scale=(scale, x.shape[-1:]),
         bias=(bias, x.shape[-1:]))
  out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  return _call("multimodel_layer_norm_forward", out, x, scale, bias, eps=np.float32(eps))


def layer_norm_backward(x: jax.Array, scale: jax.Array, grad: jax.Array, eps: float):
  """(dx, dscale [C], dbias [C]) of `layer_norm_forward`, given the gradient of y."""
  _check("layer_norm_backward", x, "[..., C]", scale=(scale, x.shape[-1:]), grad=(grad, x.shape))
  c = x.shape[-1]
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32),
         jax.ShapeDtypeStruct((c,), jnp.float32))
  return _call("multimodel_layer_norm_backward", out, x, scale, grad, eps=np.float32(eps))
