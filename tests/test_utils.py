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


# ------------------------------------------------------------------ flush_denormals

# In a fresh process, so that this one keeps its floating-point mode. torch's pool of
# worker threads is started (and kept busy) first: the case the helper exists for, since
# torch.set_flush_denormal reaches the calling thread only.
_DENORMAL_PROBE = """
import sys, torch
import meprop_triton
from meprop_triton.utils import _denormals_kept
torch.set_num_threads(3)  # a pool of workers whatever the machine's cores
a = torch.randn(512, 512)
for _ in range(3):
    a @ a, a * 2
print("start", _denormals_kept())
torch.set_flush_denormal(True)
print("main_only", _denormals_kept())  # not asserted: torch's business
print("flush", meprop_triton.flush_denormals(), _denormals_kept())
# Adam's update of a state full of denormals, spread over every thread, as in training
n = 3 << 16
tiny = torch.ones(n, dtype=torch.int32).view(torch.float32)
p, g = torch.zeros(n), torch.zeros(n)
m, v = tiny.clone(), tiny.clone()
torch._fused_adam_([p], [g], [m], [v], [], [torch.tensor(5.0)], lr=1e-3, beta1=0.9,
                   beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
print("adam", int(m.ne(0).sum()), int(v.ne(0).sum()))
torch.set_num_threads(4)  # a thread started after the call inherits the mode
print("more_threads", _denormals_kept())
print("unflush", meprop_triton.flush_denormals(False), _denormals_kept())
"""


def _flush_supported() -> bool:
    probe = "import torch; print(torch.set_flush_denormal(True))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"),
    reason="the worker threads' mode is set through GNU OpenMP on Linux x86-64",
)
def test_flush_denormals_reaches_every_worker_thread():
    """After ``flush_denormals()`` every thread of torch's pool flushes: a product and a
    fused Adam step over denormal inputs give exact zeros in every thread's chunk, also
    on a thread started later; ``flush_denormals(False)`` undoes it everywhere."""
    if not _flush_supported():
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returns False)")
    out = subprocess.run([sys.executable, "-c", _DENORMAL_PROBE], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert float(lines["start"]) == 1.0  # denormals kept everywhere at first
    assert lines["flush"] == "True 0.0"
    assert lines["adam"] == "0 0"  # the moments flushed, in every thread's chunk
    assert float(lines["more_threads"]) == 0.0
    assert lines["unflush"] == "True 1.0"


def test_flush_denormals_refuses_a_non_bool():
    with pytest.raises(TypeError, match="enable must be True or False; got 1"):
        meprop_triton.flush_denormals(1)


_UNREACHED_WORKERS = """
import torch
import meprop_triton.utils as u
torch.set_num_threads(3)
a = torch.randn(512, 512)
for _ in range(3):
    a @ a, a * 2
u._set_worker_fp_mode = lambda: False  # as on an OpenMP runtime it cannot reach
print(u.flush_denormals(), u._denormals_kept())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="as above")
def test_flush_denormals_changes_nothing_when_it_cannot_reach_the_workers():
    """False means as before: the calling thread is not left flushing on its own."""
    if not _flush_supported():
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returns False)")
    out = subprocess.run([sys.executable, "-c", _UNREACHED_WORKERS], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert out.split() == ["False", "1.0"]
