"""``torch.compile`` on a CUDA GPU, checked on a machine without one.

On a GPU the Triton ops are ``torch.library.triton_op``s whose kernel launches
``torch.compile`` traces into; under the interpreter (every other kernel test here on a
CPU machine) they are opaque custom ops. compile_trace.py traces each layer's compiled
forward and backward for a simulated sm_90 device with fake CUDA tensors, in a
subprocess without ``TRITON_INTERPRET``; these tests read its records:

* no graph break (``fullgraph=True``), and the backward calls the expected Triton op;
* each op is traced into its kernels (nothing opaque left for Inductor), with the
  gradients' shapes and dtypes right;
* torch could tell what each kernel writes (otherwise it copies every argument first),
  and no kernel writes the graph's inputs;
* the unified backward allocates no temporary of ``M * out`` elements (the masked
  per-example route, which does by design, shows that the check sees one).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

import compile_trace  # noqa: E402
import kernel_checks  # noqa: E402

pytestmark = pytest.mark.aot

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="module")
def traced():
    env = kernel_checks.compiled_env()
    proc = subprocess.run(
        [sys.executable, str(HERE / "compile_trace.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        pytest.fail(f"compile_trace.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["case"]: r for r in recs}


def _record(traced, name):
    rec = traced.get(name)
    assert rec is not None, "no record from compile_trace.py"
    assert rec["error"] is None, f"{rec['error']}\n{rec.get('trace', '')}"
    assert rec["functions"] == 1, "the layer's autograd Function was not captured as one"
    return rec


def _expected_grads(case):
    """The backward's gradient shapes (as a sorted list; None for one not needed)."""
    lead, in_f, out_f = case["shape"][:-1], case["shape"][-1], case["out"]
    M = 1
    for d in lead:
        M *= d
    # MePropLinear keeps the input's leading shape; MePropConv1D's Function takes (M, in)
    x_shape = [M, in_f] if case["kind"] == "conv1d" else list(case["shape"])
    w_shape = [in_f, out_f] if case["kind"] == "conv1d" else [out_f, in_f]
    grads = [x_shape, None if case.get("frozen") else w_shape]
    if case.get("bias", True):
        grads.append([out_f])
    return M, grads


@pytest.mark.parametrize("name", sorted(compile_trace.CASES))
def test_compiled_backward_calls_the_triton_op_and_is_traced_into_kernels(traced, name):
    case = compile_trace.CASES[name]
    rec = _record(traced, name)
    _, grads = _expected_grads(case)
    assert rec["output_shape"] == [*case["shape"][:-1], case["out"]]
    # dynamic=True: the token count reaches the backward as a symbolic size
    assert (rec["symbolic_sizes"] > 0) == case.get("dynamic", False)
    key = (case["kind"], case.get("unified", True), case.get("selection", "topk"))
    assert rec["backward_ops"] == [f"meprop_triton.{compile_trace.EXPECTED_OP[key]}"]

    # traced into: kernel launches, and no opaque op left for Inductor
    assert rec["kernels"], "no Triton kernel launch was traced"
    assert not [op for op in rec["other_ops"] if "meprop_triton" in op]
    assert all(k["programs"] and min(k["programs"]) >= 1 for k in rec["kernels"])
    # torch read what each kernel writes (a failed analysis is a warning and a copy of
    # every argument), and no kernel writes the graph's inputs
    assert not [w for w in rec["warnings"] if "assuming every input is mutated" in w], rec["warnings"]
    assert not [(k["name"], k["copies_inputs"]) for k in rec["kernels"] if k["copies_inputs"]]
    got = [g for g in rec["grad_shapes"] if g is not None]
    assert sorted(got) == sorted(g for g in grads if g is not None)
    assert set(d for d in rec["grad_dtypes"] if d is not None) == {case["dtype"]}
    names = [k["name"] for k in rec["kernels"]]
    if key[1:] == (True, "topk"):
        # the scores, then the top-k: one program up to MAX_RESIDENT units (the wide
        # case's 11,008 too, after the finish kernel), several beyond
        from meprop_triton.kernels.topk import MAX_FROM_PARTS, MAX_RESIDENT

        assert names[0] == "scores.partial_kernel"
        topk = "topk.topk_kernel" if case["out"] <= MAX_RESIDENT else "topk.radix_write_kernel"
        assert topk in names
        if case["out"] <= MAX_FROM_PARTS:  # the top-k program adds up the scores' row slices
            assert "scores.finish_kernel" not in names
    if key[0] == "linear" and key[1]:
        # the compacted G[:, S] feeds both products, cuBLAS's by default
        # (triton_ops.UNIFIED_GEMMS): torch.mm on the compacted operands, traced as aten ops
        assert "matmul.gather_columns_kernel" in names and "aten.mm.default" in rec["other_ops"]
        assert not {"matmul.grad_input_kernel", "matmul.grad_weight_kernel"} & set(names)
        assert ("aten.index_copy.default" in rec["other_ops"]) == (not case.get("frozen"))


def _few_units(case) -> bool:
    """k at most half the units: there an (M, out) tensor can only be a hidden copy (at
    k = out - 1 the compacted G[:, S], padded to 16 columns, is itself (M, out))."""
    k = case["k"]
    k = math.ceil(k * case["out"]) if isinstance(k, float) else k
    return 2 * k <= case["out"]


@pytest.mark.parametrize(
    "name", sorted(n for n, c in compile_trace.CASES.items() if c.get("unified", True) and _few_units(c))
)
def test_compiled_unified_backward_allocates_no_m_by_out_temporary(traced, name):
    case = compile_trace.CASES[name]
    rec = _record(traced, name)
    M, _ = _expected_grads(case)
    assert M * case["out"] not in [math.prod(s) for s in rec["allocated_shapes"]], rec["allocated_shapes"]


def test_the_temporary_check_sees_the_masked_per_example_route(traced):
    # per-example top-k at 25% of the units takes the masked copy of G and two GEMMs
    # (triton_ops.per_example_route): an (M, out) tensor the check above must see
    case = compile_trace.CASES["linear-per-example-fp16-large-k"]
    rec = _record(traced, "linear-per-example-fp16-large-k")
    M, _ = _expected_grads(case)
    assert M * case["out"] in [math.prod(s) for s in rec["allocated_shapes"]]
    assert "aten.mm.default" in rec["other_ops"]


def test_the_simulated_driver_refuses_what_needs_a_gpu():
    """The stand-in driver names the target and nothing else: a trace that tried to run
    or load a kernel would fail with a message saying it needs a GPU, not pass."""
    env = kernel_checks.compiled_env(HERE)
    code = (
        "import compile_trace, triton\n"
        "compile_trace.simulate_cuda(90)\n"
        "from triton.runtime import driver\n"
        "print(driver.active.get_current_target())\n"
        "try:\n"
        "    driver.active.utils\n"
        "except AttributeError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arch=90" in proc.stdout and "refused:" in proc.stdout and "need a GPU" in proc.stdout
