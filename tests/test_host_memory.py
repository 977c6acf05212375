"""Freed host memory kept for reuse (`multimodel.host_memory`): checked in child processes, since
the setting is for a whole process and must come before its threads."""

import subprocess
import sys
import textwrap

# Allocates, touches and frees 256 MiB through libc twice; prints the page faults of the second.
_CHILD = textwrap.dedent("""
    import ctypes, resource, sys
    from multimodel import host_memory
    print(host_memory.keep_freed_memory())
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 256 << 20
    for attempt in range(2):
      faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      block = libc.malloc(size)
      ctypes.memset(block, 1, size)
      libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
""")


def _child(env_value: str) -> tuple[str, int]:
  env = {"MULTIMODEL_KEEP_FREED_MEMORY": env_value, "PATH": "/usr/bin:/bin"}
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env,
                       check=True).stdout.split()
  return out[0], int(out[1])


def test_freed_memory_is_reused_without_page_faults():
  """With the setting, a block allocated again after `free` is the one already touched (no
  faults); without it, glibc maps it afresh and every page faults again (65536 of 4 KiB, fewer
  where the kernel gives huge pages)."""
  applied, kept = _child("1")
  assert applied == "True"
  assert kept < 100
  applied, fresh = _child("0")
  assert applied == "False"
  assert fresh > 1000
