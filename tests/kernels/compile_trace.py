"""What ``torch.compile`` makes of the layers on a CUDA GPU, traced on a machine without one.

``python tests/kernels/compile_trace.py [--arch 90] [--case NAME ...]`` prints one JSON
object per case. test_compile_trace.py runs it in a subprocess without
``TRITON_INTERPRET``: there the Triton ops are ``torch.library.triton_op``s whose kernel
launches ``torch.compile`` traces into (under the interpreter they are opaque custom ops,
so nothing else on a CPU machine exercises that route).

The device is simulated: the tensors are fake (``FakeTensorMode``) CUDA tensors, Triton's
active driver is a stand-in that only names the compile target (sm_90 by default), and
torch's device queries answer for an H200 (132 SMs, 227 KiB of shared memory a block;
an A100 with ``--arch 80``).
Nothing is run or compiled to machine code, and CUDA autocast is not simulated (torch
turns it off where no GPU is present, so an autocast case would trace its dtype as
given). For each case:

1. Dynamo captures the layer's forward (``fullgraph=True``: a graph break fails the case)
   and, inside it, the autograd Function's backward; the backward must call the expected
   ``torch.ops.meprop_triton`` op (the Triton route, not the torch path);
2. that backward is compiled through AOTAutograd (functionalization), where each
   op is traced into its kernel launches (``triton_kernel_wrapper_functional`` nodes;
   Triton builds each kernel's TTIR for the target to see what it writes). The record
   lists the kernels and their program counts (one per config the autotuner may pick),
   the ops left over, the gradients' shapes and dtypes, and the shapes of the tensors
   the graph allocates (views and the inputs not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback

#: name -> the layer (see :func:`_module`) and its input: ``kind`` (linear / conv1d),
#: ``shape`` (the input's), ``out`` (output units), ``k``, ``dtype`` and the options
CASES = {
    # unified top-k: k not a multiple of 16 (5% of 2304 = 116), 3-D input, bf16
    "linear-unified-bf16": dict(kind="linear", shape=(8, 128, 768), out=2304, k=0.05, dtype="bfloat16"),
    "linear-unified-fp16-odd": dict(kind="linear", shape=(1000, 300), out=500, k=41, dtype="float16"),
    # dynamic shapes: the token count symbolic through the backward and its kernels
    "linear-unified-dynamic": dict(
        kind="linear", shape=(4, 96, 768), out=2304, k=0.05, dtype="bfloat16", dynamic=True
    ),
    "linear-unified-fp32-k1": dict(kind="linear", shape=(256, 512), out=1024, k=1, dtype="float32"),
    "linear-unified-out-minus-1": dict(kind="linear", shape=(64, 256), out=384, k=383, dtype="bfloat16"),
    "linear-unified-no-bias": dict(kind="linear", shape=(512, 1024), out=3072, k=0.05, dtype="bfloat16", bias=False),
    "linear-unified-frozen-weight": dict(
        kind="linear", shape=(512, 1024), out=3072, k=0.05, dtype="bfloat16", frozen=True
    ),
    "linear-unified-tracked": dict(
        kind="linear", shape=(512, 1024), out=3072, k=0.05, dtype="bfloat16", track=True
    ),
    "linear-unified-random": dict(
        kind="linear", shape=(512, 1024), out=3072, k=0.05, dtype="bfloat16", selection="random"
    ),
    "linear-per-example-bf16": dict(kind="linear", shape=(64, 768), out=2304, k=8, dtype="bfloat16", unified=False),
    "linear-per-example-fp16-large-k": dict(
        kind="linear", shape=(256, 512), out=1024, k=0.25, dtype="float16", unified=False
    ),
    "linear-per-example-random": dict(
        kind="linear", shape=(64, 768), out=2304, k=8, dtype="bfloat16", unified=False, selection="random"
    ),
    # out > 4096: the top-k over several programs
    "linear-unified-wide": dict(kind="linear", shape=(256, 512), out=11008, k=0.05, dtype="bfloat16"),
    "conv1d-unified-bf16": dict(kind="conv1d", shape=(4, 128, 768), out=2304, k=0.05, dtype="bfloat16"),
    "conv1d-per-example-fp16": dict(
        kind="conv1d", shape=(4, 16, 768), out=2304, k=8, dtype="float16", unified=False
    ),
}

#: the op each case's backward must call
EXPECTED_OP = {
    ("linear", True, "topk"): "unified_topk_backward",
    ("linear", True, "random"): "unified_backward_from_indices",
    ("linear", False, "topk"): "per_example_topk_backward",
    ("linear", False, "random"): "per_example_backward_from_indices",
    ("conv1d", True, "topk"): "conv1d_unified_topk_backward",
    ("conv1d", False, "topk"): "per_example_topk_backward",
}

#: the simulated device per compute capability: name, SMs, shared memory a block may
#: use (its opt-in maximum, as torch reports it)
DEVICES = {
    90: ("NVIDIA H200 (simulated)", 132, 232448),
    80: ("NVIDIA A100-SXM4-80GB (simulated)", 108, 166912),
}


class _Properties:
    """``torch.cuda.get_device_properties`` of the simulated device."""

    def __init__(self, arch: int):
        name, sms, smem = DEVICES[arch]
        self.name, self.major, self.minor = name, arch // 10, arch % 10
        self.multi_processor_count, self.shared_memory_per_block_optin = sms, smem
        self.total_memory, self.warp_size = 80 * 2**30, 32

    def __getattr__(self, name):
        raise AttributeError(f"the simulated device has no property {name!r}")


def simulate_cuda(arch: int) -> None:
    """Point Triton and torch's device queries at a simulated GPU of compute capability
    ``arch`` (e.g. 90). Tensors are made fake by the caller."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class TargetOnly:
        """Triton's active driver, reduced to what tracing asks of it: the target."""

        def __init__(self):
            self.target = GPUTarget("cuda", arch, 32)

        def get_current_target(self):
            return self.target

        def get_current_device(self):
            return 0

        def get_active_torch_device(self):
            return torch.device("cuda", 0)

        def __getattr__(self, name):  # anything else would need a real GPU: say so
            raise AttributeError(f"the simulated driver has no {name!r} (it would need a GPU)")

    driver.set_active(TargetOnly())
    props = _Properties(arch)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.get_device_capability = lambda *a, **k: (arch // 10, arch % 10)
    torch.cuda.current_device = lambda: 0


def _module(case, torch):
    from meprop_triton import MePropConv1D, MePropLinear

    dtype = getattr(torch, case["dtype"])
    in_f, out_f = case["shape"][-1], case["out"]
    opts = dict(
        k=case["k"], unified=case.get("unified", True), selection=case.get("selection", "topk"),
        device="cuda", dtype=dtype,
    )
    if case.get("track"):
        opts["track_selection"] = True
    if case["kind"] == "linear":
        layer = MePropLinear(in_f, out_f, bias=case.get("bias", True), **opts)
    else:
        layer = MePropConv1D(out_f, in_f, **opts)
    if case.get("frozen"):
        layer.weight.requires_grad_(False)
    return layer


def _allocates(target) -> bool:
    """Whether an op node makes a new tensor (an aten op whose outputs alias no input);
    views, and the graph's own item accesses, do not."""
    schema = getattr(target, "_schema", None)
    return schema is not None and all(r.alias_info is None for r in schema.returns)


def _size(v) -> int:
    """A grid size: an int, or under dynamic shapes a graph node (its traced value)."""
    return int(v.meta["val"]) if hasattr(v, "meta") else int(v)


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)  # an Autotuner / Heuristics wraps the JITFunction
    fn = getattr(fn, "fn", fn)
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


@contextlib.contextmanager
def _torch_warnings():
    """The warnings torch logs meanwhile. Where its analysis of a kernel launch fails,
    torch warns and assumes every tensor argument is written (a copy of each before the
    launch, G included), and the trace goes on."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage()[:500])

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def trace_case(name: str, case: dict) -> dict:
    import torch
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    rec = {"case": name, "error": None}
    torch._dynamo.reset()
    dynamo_graphs, aot_graphs, grads = [], [], []

    def capture_aot(gm, example_inputs):
        def compiler(g, _inputs):
            aot_graphs.append(g)
            return g.forward

        return aot_module_simplified(gm, example_inputs, fw_compiler=compiler)

    def capture_dynamo(gm, example_inputs):
        dynamo_graphs.append(gm)
        for n in gm.graph.nodes:
            if n.op == "call_function" and "autograd_function_apply" in str(n.target):
                # 2. the Function's backward through AOTAutograd, as a torch.compile backend
                # does with it, in dynamo's own fake mode (sizes symbolic under dynamic=True)
                bwd = getattr(gm, n.args[1].target)
                example = [p.meta["example_value"] for p in bwd.graph.nodes if p.op == "placeholder"]
                rec["symbolic_sizes"] = sum(isinstance(v, torch.SymInt) for v in example)
                capture_aot(bwd, example)
                # its gradients: the graph's last outputs (a mutated input comes first)
                n_grads = len(next(p for p in bwd.graph.nodes if p.op == "output").args[0])
                out = next(p for p in aot_graphs[-1].graph.nodes if p.op == "output").args[0]
                grads.append([None if a is None else a.meta["val"] for a in out[len(out) - n_grads:]])
        return gm.forward

    with _torch_warnings() as rec["warnings"], FakeTensorMode():
        layer = _module(case, torch)
        dtype = getattr(torch, case["dtype"])
        x = torch.randn(*case["shape"], device="cuda", dtype=dtype, requires_grad=True)
        dynamic = case.get("dynamic", False)
        y = torch.compile(layer, backend=capture_dynamo, fullgraph=True, dynamic=dynamic)(x)
        rec["output_shape"] = list(y.shape)

        # 1. the backward dynamo captured inside the autograd Function
        applies = [
            n for gm in dynamo_graphs for n in gm.graph.nodes
            if n.op == "call_function" and "autograd_function_apply" in str(n.target)
        ]
        rec["functions"] = len(applies)
        if len(applies) != 1:
            return rec
        bwd = getattr(dynamo_graphs[0], applies[0].args[1].target)
        rec["backward_ops"] = sorted({
            str(n.target).split(".")[-2] if str(n.target).count(".") >= 2 else str(n.target)
            for n in bwd.graph.nodes
            if n.op == "call_function" and "meprop_triton" in str(n.target)
        })

        # 2. (traced in capture_dynamo): the ops traced into their kernel launches
        if len(aot_graphs) != 1:
            raise RuntimeError(f"expected one backward graph from AOTAutograd; got {len(aot_graphs)}")
        rec["grad_shapes"] = [None if g is None else [int(d) for d in g.shape] for g in grads[0]]
        rec["grad_dtypes"] = [None if g is None else str(g.dtype).replace("torch.", "") for g in grads[0]]
        kernels, other_ops, allocated = [], set(), set()
        for g in aot_graphs:
            for n in g.graph.nodes:
                if n.op != "call_function":
                    continue
                if "triton_kernel_wrapper" in str(n.target):
                    kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
                    grids = n.kwargs["grid"]
                    args = n.kwargs["kwargs"]
                    kernels.append({
                        "name": _kernel_name(kernel),
                        # (under dynamic shapes: at the traced sizes)
                        "programs": sorted({_size(g0) * _size(g1) * _size(g2) for g0, g1, g2 in grids}),
                        # arguments copied before the launch that are the graph's inputs
                        # (G, x, W): a kernel writing one, or a failed analysis
                        "copies_inputs": sorted(
                            a for a in n.kwargs.get("tensors_to_clone", ())
                            if getattr(args.get(a), "op", None) == "placeholder"
                        ),
                    })
                else:
                    other_ops.add(str(n.target))
                    val = n.meta.get("val")
                    if _allocates(n.target):
                        for t in val if isinstance(val, (tuple, list)) else (val,):
                            if isinstance(t, torch.Tensor):
                                allocated.add(tuple(int(d) for d in t.shape))
        rec["kernels"] = kernels
        rec["other_ops"] = sorted(other_ops)
        rec["allocated_shapes"] = sorted(list(a) for a in allocated)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--arch", type=int, default=90, choices=sorted(DEVICES),
                    help="compute capability to trace for (default 90)")
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="only these cases")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the traced route is the compiled kernels'", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated
    simulate_cuda(args.arch)
    for name in args.case or CASES:
        try:
            rec = trace_case(name, CASES[name])
        except Exception as e:  # one case's failure is its record, not the end of the run
            rec = {"case": name, "error": f"{type(e).__name__}: {e}"[:3000], "trace": traceback.format_exc()[-4000:]}
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
