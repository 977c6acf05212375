"""Keeping freed host memory for reuse: the train step's temporaries without page faults.

XLA's CPU runtime allocates the temporary buffers of every execution of a program afresh and frees
them when it ends: hundreds of MiB per train step. glibc's malloc serves blocks that large with
`mmap` and gives them back to the kernel on `free`, so every step touches its temporaries as new
pages, and the kernel zeroes each one in a page fault: 240 thousand faults (0.9 GiB) in each
`paper` image step at 28x28, which took 640 ms with them and 390 ms without; the text and image
steps of `default` (the main job's config) 511 -> 457 ms and 116 -> 99 ms (docs/performance.md,
"Page faults and the optimizer's update").

`keep_freed_memory()` tells glibc (`mallopt`) to serve every thread from one arena, never with
`mmap`, and never to trim the heap: freed blocks stay in the process and the next step reuses
them. The process's memory then stays at its peak. Training and the benchmarks that time the
train step call it first thing; `MULTIMODEL_KEEP_FREED_MEMORY=0` turns it off. Elsewhere (macOS,
musl) it does nothing.
"""

import ctypes
import ctypes.util
import logging
import os
import sys

ENV = "MULTIMODEL_KEEP_FREED_MEMORY"

# glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_applied = False


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory (see the module's doc). True when it is set.

  Call it before the program starts its threads (before JAX runs anything): a thread that has
  already allocated keeps its own arena. Calling it again does nothing more.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # Not glibc.
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1))
  if not all(mallopt(param, value) == 1 for param, value in settings):
    logging.warning("mallopt refused a setting: freed host memory is given back as usual")
    return False
  _applied = True
  return True
