"""meprop_triton.utils.keep_freed_memory: the malloc setting of CPU training loops."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import meprop_triton


_HEAP_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = (ctypes.c_ssize_t,)
if sys.argv[1] == "keep":
    import meprop_triton
    assert meprop_triton.keep_freed_memory() is True
p = libc.malloc(4 << 20)  # 4 MiB: above glibc's default 128 KiB mmap threshold
print("heap" if p < libc.sbrk(0) else "mmap")
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory sets glibc's malloc; it returns False elsewhere",
)
def test_keep_freed_memory_takes_effect():
    """In a fresh process a 4 MiB block comes from its own mmap by default, and from the
    heap (reused, not given back) after ``keep_freed_memory()``."""
    def where(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()

    assert where("default") == "mmap"
    assert where("keep") == "heap"


@pytest.mark.parametrize("bad", [-1, 2**31, 1.5, True, "32"], ids=repr)
def test_keep_freed_memory_refuses_bad_thresholds(bad):
    with pytest.raises(ValueError, match="must be an int in"):
        meprop_triton.keep_freed_memory(mmap_threshold=bad)
    with pytest.raises(ValueError, match="trim_threshold"):
        meprop_triton.keep_freed_memory(trim_threshold=bad)
