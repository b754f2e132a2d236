"""A stand-in for Triton's CUDA driver on a machine without a GPU: Triton's own launch
path runs (argument binding, specialisation, cache key, a real sm_80 / sm_90 compile on
the first launch of each specialisation), and the launcher records its arguments instead
of launching.

``with stand_in(arch) as launches:`` installs it as Triton's active driver; each launch
appends one tuple, exactly what Triton hands its launcher: ``(grid_x, grid_y, grid_z,
stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *args)``, with
the function handle a name for the compiled binary (the kernel's name and a digest of its
cubin), so that two launches compare equal exactly when they run the same code.
``bench/host_glue.py --launch triton`` times Triton's Python launch path with it
(``--launch fast``: the package's own); ``tests/kernels/test_fast_launch.py`` compares
``kernels._launch.FastLaunch`` with Triton's path, launch for launch.

Nothing here touches CUDA. The kernels must be the compiled ones (``TRITON_INTERPRET``
unset when triton was imported); CPU tensors stand for GPU ones (their data pointers are
read, never dereferenced).
"""

from __future__ import annotations

import contextlib
import hashlib

__all__ = ["stand_in", "StandInDriver"]

#: what the stand-in reports for the GPU (an H100 / H200's per-block shared-memory limit)
SHARED_MEM = 232448


class _Launcher:
    """Takes the place of Triton's launcher for one compiled kernel: records what it is
    handed in ``record`` (a list), or, without one, drops it."""

    def __init__(self, src, metadata, record):
        self.record = record

    def __call__(self, gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_, *args):
        if self.record is not None:
            self.record.append((gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, exit_) + args)


class _Utils:
    def __init__(self):
        self._handles = 0

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads): the function handle names
        # the binary (the kernel's name and a digest of its cubin), so that two launches
        # compare equal exactly when they run the same code
        handle = f"{name}:{hashlib.sha256(bytes(kernel)).hexdigest()[:16]}"
        return (handle, handle, 0, 0, 1024)

    def unload_module(self, module):
        pass

    def get_device_properties(self, device):
        return {
            "max_shared_mem": SHARED_MEM, "multiprocessor_count": 132, "max_num_regs": 65536,
            "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 6144,
        }


class StandInDriver:
    """Triton's driver interface, as much of it as a launch uses, for one GPU of compute
    capability ``arch`` (90: sm_90) as device 0 with stream 0. ``record``: keep each
    launch in ``launches`` (else none is kept: timing, where kept launches would keep
    their tensors alive)."""

    def __init__(self, arch: int = 90, record: bool = True):
        self.arch = arch
        self.launches: list | None = [] if record else None
        self.utils = _Utils()
        record = self.launches
        self.launcher_cls = lambda src, metadata: _Launcher(src, metadata, record)

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (self.arch // 10, self.arch % 10)

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver runs nothing, so it times nothing")


@contextlib.contextmanager
def stand_in(arch: int = 90, record: bool = True):
    """Within: Triton's active driver is a :class:`StandInDriver`; yields its list of
    launches (None without ``record``). The driver that was active is put back on exit, but kernels compiled within
    stay in Triton's caches (and ``FastLaunch``'s) under device 0 with the stand-in's
    handles: use it in a process that launches nothing on a real GPU."""
    from triton.runtime.driver import driver

    previous = driver._active  # None until a driver was first asked for
    drv = StandInDriver(arch, record)
    driver.set_active(drv)
    try:
        yield drv.launches
    finally:
        driver._active = previous
