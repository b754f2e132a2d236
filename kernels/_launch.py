"""Launch helpers shared by the kernel files: config selection and argument checks.

Nothing here touches CUDA at import time; device properties are read on the first
launch for a device and cached.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "FORCE_SINGLE_CONFIG",
    "single_config_mode",
    "interpreter_enabled",
    "num_sms",
    "capability",
    "shared_memory_limit",
    "check_float_tensor",
    "check_index",
    "check_out",
    "out_or_empty",
    "launchable",
    "is_interpreted",
    "cdiv",
    "FAST_LAUNCH",
    "FastLaunch",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: ``None``: follow the environment (``MEPROP_TRITON_TEST_CONFIG=1`` or
#: ``TRITON_INTERPRET=1`` -> one fixed config per kernel, no autotuning);
#: ``True`` / ``False``: force single-config mode on / off.
FORCE_SINGLE_CONFIG: bool | None = None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the host's grid arithmetic. ``triton.cdiv`` gives the same
    numbers, but it is a ``constexpr_function``: about 1.8 us a call on the host, where a
    backward makes a dozen such calls."""
    return -(-a // b)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def interpreter_enabled() -> bool:
    return _env_flag("TRITON_INTERPRET")


def single_config_mode() -> bool:
    """True when each kernel runs with its one test config instead of autotuning.

    Read at launch time, never at import: tests set ``MEPROP_TRITON_TEST_CONFIG=1`` (or the
    module switch :data:`FORCE_SINGLE_CONFIG`); the interpreter always uses it, since
    benchmarking configs there measures nothing.
    """
    if FORCE_SINGLE_CONFIG is not None:
        return bool(FORCE_SINGLE_CONFIG)
    return _env_flag("MEPROP_TRITON_TEST_CONFIG") or interpreter_enabled()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number off CUDA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_sm_count(index)
    return 4


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def capability(device: torch.device) -> tuple[int, int]:
    """Compute capability of ``device``; off CUDA (the interpreter) that of a Hopper GPU,
    so that the configs chosen there are the ones sm_90 runs."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_capability(index)
    return (9, 0)


@functools.lru_cache(maxsize=None)
def _cuda_shared_limit(index: int) -> int | None:
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", None)


def shared_memory_limit(device) -> int | None:
    """Shared memory a block of ``device`` may use (its opt-in maximum), None off CUDA
    or where torch does not report it."""
    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_shared_limit(index)
    return None


def check_float_tensor(name: str, t: torch.Tensor, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton kernels take float32, float16 or bfloat16; {name} has dtype {t.dtype} "
            f"(use the torch path for other dtypes)"
        )
    if not t.is_cuda and not interpreter_enabled():  # (is_cuda: no torch.device made, as .device makes)
        raise RuntimeError(
            f"the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run on CPU tensors; {name} is on '{t.device}'"
        )


def check_index(name: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A 1-D int64 index vector on ``device``, made contiguous (the kernels read it flat)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        got = f"{idx.dtype} of shape {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise TypeError(f"{name} must be a 1-D int64 tensor; got {got}")
    if idx.device != device:
        raise ValueError(f"{name} is on '{idx.device}' but the data is on '{device}'")
    return idx.contiguous()


def check_out(name: str, out: torch.Tensor, shape, dtype, device) -> None:
    """Check a caller-provided output buffer (tests pass NaN-filled ones)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"{name} must have shape {tuple(shape)}, dtype {dtype} on '{device}'; got "
            f"{tuple(out.shape)}, {out.dtype} on '{out.device}'"
        )


def out_or_empty(name: str, out: torch.Tensor | None, shape, dtype, device) -> torch.Tensor:
    """``out`` when the caller gave one (checked as :func:`check_out` does), else a new
    uninitialised tensor of that shape, dtype and device."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    check_out(name, out, shape, dtype, device)
    return out


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function, or an autotuner over one) was built
    for Triton's interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    return type(kernel).__name__ == "InterpretedFunction" or (
        type(getattr(kernel, "fn", None)).__name__ == "InterpretedFunction"
    )


def launchable(kernel, traceable: bool):
    """What to launch ``kernel`` through: ``[grid](*args, **kwargs)`` on the result runs it.

    * A kernel built for Triton's interpreter: the kernel itself. The ops are opaque
      custom ops there (``triton_ops.INTERPRETED``), so nothing traces the launch, and
      torch 2.11's ``wrap_triton`` refuses such a kernel even where it would not wrap it.
    * ``traceable`` (launchers called from a ``torch.library.triton_op``) while
      ``wrap_triton`` is on: its wrapper, so that ``torch.compile`` and other tracers see
      the launch. (Inside the op in plain eager mode it is off and hands back the kernel.)
    * Otherwise, a compiled kernel: its :class:`FastLaunch` (:data:`FAST_LAUNCH`), or
      the kernel itself. Direct eager calls never take the wrapper: its dispatch costs
      ~1 ms.
    """
    if torch.compiler.is_compiling():  # traced: what the tracer sees is the kernel (or its wrapper)
        return _wrapped(kernel) if traceable and not is_interpreted(kernel) else kernel
    # by id: hashing a JITFunction takes a lock (its cache_key), needlessly, each launch
    entry = _FAST.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        if is_interpreted(kernel):
            return kernel
        entry = _FAST[id(kernel)] = (kernel, FastLaunch(kernel) if FastLaunch.usable(kernel) else kernel)
    if traceable and _wrap_triton_enabled():
        wrapped = _wrapped(kernel)
        if wrapped is not kernel:
            return wrapped
    return entry[1] if FAST_LAUNCH else kernel


def _wrapped(kernel):
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _wrap_triton_enabled() -> bool:
    """Whether ``torch.library.wrap_triton`` would wrap a kernel now (True where this
    torch does not say: then it is asked)."""
    global _wrap_triton_enabled
    try:
        from torch._library.triton import is_wrap_triton_enabled
    except ImportError:  # pragma: no cover - a torch laid out otherwise
        is_wrap_triton_enabled = lambda: True  # noqa: E731
    _wrap_triton_enabled = is_wrap_triton_enabled
    return is_wrap_triton_enabled()


#: Launch compiled kernels through :class:`FastLaunch` (True), or every launch through
#: Triton's own ``kernel[grid](...)`` (False; also ``MEPROP_TRITON_FAST_LAUNCH=0`` in the
#: environment at import).
FAST_LAUNCH: bool = os.environ.get("MEPROP_TRITON_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")

_FAST: dict = {}  # id(kernel) -> (kernel, what launchable gives for it)

#: Triton's integer specialisation (3.6 to 3.9): a value of 1 becomes the constant 1; a
#: multiple of 16 is marked divisible; the type is i32, i64 or u64 by range.
_I32_LO, _I32_HI, _I64_HI = -(2**31), 2**31, 2**63


def _spec(v):
    """What Triton's specialisation reads of a non-constexpr argument ``v``, as a key:
    an integer's class (1; i32, i64 or u64 by range, and whether a multiple of 16), a
    tensor's dtype and 16-byte alignment, a bool's value, None, a float's type. Any
    other kind of argument (a tuple, an int subclass, a tensor descriptor, a JIT
    function, an object with a ``data_ptr``...), whose specialisation Triton works out
    otherwise, gets an unhashable key: its launch goes through Triton's own path."""
    t = type(v)
    if t is int:
        if v == 1:
            return 1
        return (0 if _I32_LO <= v < _I32_HI else (2 if v < _I64_HI else 4)) + 8 + ((v & 15) == 0)
    if isinstance(v, torch.Tensor):
        return (v.dtype, (v.data_ptr() & 15) == 0)
    if t is bool:
        return (bool, v)
    if v is None:
        return None
    if t is float:
        return float
    return _UNKEYED


_UNKEYED = []  # unhashable: a key holding it sends the launch to Triton's own path
_MISSING = object()


def _bind_settings():
    import triton

    compilation = triton.knobs.compilation
    names = [n for n in ("instrumentation_mode", "fpsan_homomorphic_casts") if hasattr(compilation, n)]
    src = "def settings(runtime, compilation):\n    return (runtime.debug, "
    src += "".join(f"compilation.{n}, " for n in names) + ")\n"
    namespace = {}
    exec(src, namespace)
    return namespace["settings"]


def _settings(runtime, compilation):
    """The Triton settings that its in-memory cache key holds besides the arguments
    (``TRITON_DEBUG``; the instrumentation mode, e.g. Proton's; triton 3.9's FP-sanitizer
    casts), read at each launch as Triton reads them. Replaced on its first call by a
    function that reads just the ones this triton has."""
    global _settings
    _settings = _bind_settings()
    return _settings(runtime, compilation)


class FastLaunch:
    """``kernel[grid](*args, **kwargs)`` with as little Python per launch as Triton allows.

    Triton's ``JITFunction.run`` binds the arguments to the signature, works out their
    specialisation (each tensor's dtype and 16-byte alignment; each integer's type, whether
    it is 1 and whether it is a multiple of 16), builds a cache key from it and the
    options, looks the compiled kernel up and hands it to the launcher: about 8-10 us of
    host time a launch on a 2-core x86 CPU, against 4-6 us here, which an eager
    backward pays on every one of its launches (``bench/host_glue.py --launch triton``
    against ``--launch fast``: 158-172 against 140-153 us for 6 launches). Here
    the first launch of each specialisation goes through Triton's own path, which
    compiles (or finds) the kernel and launches it; this class keeps the compiled kernel
    under a key of its own, at least as fine as Triton's (constexprs and launch options by
    type and value, every other argument by the properties Triton reads, the device), and
    later launches with the same key call the compiled kernel's launcher directly, with
    exactly the arguments Triton's path passes it (the launch hooks and their metadata
    included), on the current device's current stream. For each way of calling (the
    number of positional arguments, the keyword names) it builds one small function that
    binds the arguments and makes the key, as Triton builds its binder.
    ``tests/kernels/test_fast_launch.py`` checks, launch for launch, that the launcher
    gets what Triton's path gives it, under a stand-in driver that records.

    Launches it cannot key go through Triton every time: a grid that is not a tuple, a
    kernel with pre-run hooks, a Triton stage-inspection hook, an argument of a kind
    other than a tensor, an int, a bool, a float or None (a tuple, an int subclass, a
    tensor descriptor...), an unhashable constexpr, a call that does not bind (Triton
    then raises its own error), a kernel whose global values have changed since it was
    compiled (Triton raises). Triton's settings that its key holds (``TRITON_DEBUG``, the
    instrumentation mode, the FP-sanitizer casts) are part of this key too, read at each
    launch. Kernels with ``*args`` or keyword-only parameters, and any kernel on a
    backend other than NVIDIA's (AMD's also specialises a tensor on the size of its
    storage), launch through Triton only.
    """

    __slots__ = ("kernel", "_plans", "_names", "_defaults", "_constexpr")

    _driver = None  # triton.runtime.driver, bound on the first use
    _knobs = None

    @staticmethod
    def usable(kernel) -> bool:
        """Whether ``kernel`` is a Triton ``JITFunction`` of the shape this class reads."""
        try:
            import triton
            from triton.runtime.jit import JITFunction
        except ImportError:  # pragma: no cover - triton without that module
            return False
        if not (
            isinstance(kernel, JITFunction)
            and hasattr(triton, "knobs")
            and hasattr(kernel, "params")
            and hasattr(kernel, "signature")
            and hasattr(kernel, "pre_run_hooks")
            and hasattr(kernel, "used_global_vals")
        ):
            return False
        plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if any(p.kind not in plain for p in kernel.signature.parameters.values()):
            return False  # *args and keyword-only parameters: Triton binds them otherwise
        # NVIDIA only: AMD's backend also specialises a tensor on its storage's size
        from triton.runtime.driver import driver

        return getattr(driver.active.get_current_target(), "backend", None) == "cuda"

    def __init__(self, kernel):
        import triton

        if FastLaunch._driver is None:
            from triton.runtime.driver import driver

            FastLaunch._driver = driver
            FastLaunch._knobs = triton.knobs
        self.kernel = kernel
        params = list(kernel.signature.parameters.values())
        self._names = tuple(p.name for p in params)
        self._defaults = tuple(p.default for p in params)
        self._constexpr = tuple(bool(kp.is_constexpr) for kp in kernel.params)
        self._plans: dict = {}

    def __getitem__(self, grid):
        if type(grid) is not tuple or not 1 <= len(grid) <= 3:
            return self.kernel[grid]
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _plan(self, n_args: int, kw_names: tuple):
        """``(bind, cache)`` for calls with ``n_args`` positional arguments and these
        keyword names: ``bind(args, kwargs, device, settings) -> (key, values)``, the key
        and every parameter's value in signature order (what Triton hands its launcher),
        and the compiled kernels by key. None when such a call does not bind."""
        names, defaults, const = self._names, self._defaults, self._constexpr
        if n_args > len(names) or any(n in names[:n_args] for n in kw_names):
            return None
        if any(not n.isidentifier() for n in kw_names):
            return None
        namespace = {"_spec": _spec}
        values, key = [], ["device", "settings"]
        for i, name in enumerate(names):
            if i < n_args:
                v = f"a{i}"
            elif name in kw_names:
                v = f"kwargs[{name!r}]"
            elif defaults[i] is inspect_empty:
                return None
            else:  # a default: a constant of this way of calling, not part of its key
                v = f"d{i}"
                namespace[v] = defaults[i]
                values.append(v)
                continue
            values.append(v)
            key.append(f"type({v}), {v}" if const[i] else f"_spec({v})")
        for n in kw_names:
            if n not in names:  # a launch option: num_warps, num_stages...
                key.append(f"type(kwargs[{n!r}]), kwargs[{n!r}]")
        unpack = f"    {''.join(f'a{i}, ' for i in range(n_args))}= args\n" if n_args else ""
        src = (
            "def bind(args, kwargs, device, settings):\n"
            + unpack
            + f"    return ({', '.join(key)},), ({''.join(v + ', ' for v in values)})\n"
        )
        exec(src, namespace)
        return namespace["bind"], {}

    def _launch(self, grid, args, kwargs):
        kernel = self.kernel
        plan_key = (len(args), *kwargs)
        plan = self._plans.get(plan_key)
        if plan is None:
            plan = self._plans[plan_key] = self._plan(len(args), tuple(kwargs)) or False
        if plan is False or kernel.pre_run_hooks:
            return kernel[grid](*args, **kwargs)
        runtime = FastLaunch._knobs.runtime
        if getattr(runtime, "add_stages_inspection_hook", None) is not None:
            return kernel[grid](*args, **kwargs)
        driver = FastLaunch._driver.active
        device = driver.get_current_device()
        bind, cache = plan
        key, values = bind(args, kwargs, device, _settings(runtime, FastLaunch._knobs.compilation))
        try:
            compiled = cache.get(key)
        except TypeError:  # an unhashable constexpr: Triton's path, which will say what it makes of it
            return kernel[grid](*args, **kwargs)
        if compiled is None:
            compiled = kernel[grid](*args, **kwargs)
            if compiled is not None and not hasattr(compiled, "result"):
                cache[key] = compiled
            return compiled
        for (name, _), (val, globals_dict) in kernel.used_global_vals.items():
            if globals_dict.get(name, _MISSING) != val:  # a global it read has changed: Triton raises
                return kernel[grid](*args, **kwargs)
        stream = driver.get_current_stream(device)
        n = len(grid)
        compiled.run(
            grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
            compiled.packed_metadata, compiled.launch_metadata(grid, stream, *values),
            runtime.launch_enter_hook, runtime.launch_exit_hook, *values,
        )
        return compiled


inspect_empty = inspect.Parameter.empty
