#!/usr/bin/env bash
# One command for a GPU machine: install the checkout offline, record the environment, run
# the CUDA tests, then the GPU benchmarks in order of importance (each group its own pytest
# run writing its own JSON at once, so a run cut off keeps what it measured; after the
# first, each kernel of the unified backward timed alone and each GEMM under every config,
# bench/kernel_sweep.py), the paper's MNIST Table 8 run if time is left, the sm_90
# code-generation report, and the Markdown / PNG report over every JSON written.
# Everything stays inside --budget-s.
#
#   bash bench/gpu_run.sh [--budget-s N] [--out DIR] [--dry-run] [--tests-s N]
#                         [--wheels DIR] [--mnist-dir DIR]
#
#   --budget-s N   wall-time budget of the whole run in seconds (default 480: 8 minutes on
#                  an H200). No step starts when too little is left; each runs under
#                  `timeout` with what is left (a benchmark group is stopped with SIGINT,
#                  so pytest-benchmark still writes the cases it finished).
#   --out DIR      where the results go (default: $OUT when set, else bench/results/)
#   --dry-run      the same orchestration on a machine without a GPU, in miniature: no
#                  install; kernel tests (CUDA-graph and op tests) under TRITON_INTERPRET=1;
#                  each benchmark group's selection checked (not empty, CUDA cases only) and
#                  run once as a smoke test (--benchmark-disable: on a CPU they skip); two
#                  quick CPU cases timed to JSON; a tiny MNIST run on the CPU; codegen; the
#                  report. About a minute on 2 cores.
#   --tests-s N    time cap of the CUDA test step (default 120)
#   --wheels DIR   a folder of wheels (pytest, pytest-benchmark, hypothesis and their
#                  dependencies) to install offline when they are missing
#   --mnist-dir DIR  the four MNIST IDX files, raw or gzipped, for the Table 8 run
#                  (default: .mnist/ in the checkout when it holds them, else the cache;
#                  without data, and with no network, that step is skipped). To bring
#                  them to a machine without network, gzip them into .mnist/ (ignored
#                  by git, 11 MB) and copy that folder with the checkout.
#
# Exits non-zero when a step failed (a step cut off by its time cap is reported, not failed,
# except in a dry run); the summary lists every step as ok / FAILED / cut off / skipped.
set -euo pipefail

BUDGET=480
DRY=0
OUTDIR=""
TESTS_S=120
WHEELS=""
MNIST_DIR=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --budget-s) BUDGET=${2:?--budget-s needs a number of seconds}; shift 2 ;;
        --out) OUTDIR=${2:?--out needs a folder}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --tests-s) TESTS_S=${2:?--tests-s needs a number of seconds}; shift 2 ;;
        --wheels) WHEELS=${2:?--wheels needs a folder}; shift 2 ;;
        --mnist-dir) MNIST_DIR=${2:?--mnist-dir needs a folder}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument '$1' (--help lists the options)" >&2; exit 2 ;;
    esac
done
case "$BUDGET$TESTS_S" in *[!0-9]*) echo "gpu_run.sh: --budget-s and --tests-s take whole seconds" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
ROOT=$PWD
OUTDIR=${OUTDIR:-${OUT:-bench/results}}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG="$OUTDIR/gpu-run.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1   # a step killed at its cap keeps its last lines in the log
# Triton's cache lives under $HOME; where that cannot be written every compile would fail.
if ! mkdir -p "${TRITON_CACHE_DIR:-${HOME:-/nonexistent}/.triton/cache}" 2>/dev/null; then
    export TRITON_CACHE_DIR
    TRITON_CACHE_DIR=$(mktemp -d)
    echo "   (Triton's cache: $TRITON_CACHE_DIR, \$HOME is not writable)"
fi

PY=python3
START=$SECONDS
RESERVE=25            # seconds kept for the report at the end
GRACE=20              # a step cut off at its cap gets SIGINT, then SIGKILL this much later
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
SUMMARY=()
FAILED=0
JSONS=()

left() { echo $((BUDGET - (SECONDS - START))); }
note() { SUMMARY+=("$(printf '%-27s %s' "$1" "$2")"); echo "   -> $1: $2"; }

# run_step NAME MIN_S CAP_S CMD...: run CMD under `timeout -s INT` with min(CAP_S, what is
# left of the budget less the reserve); skipped when less than MIN_S is left.
run_step() {
    local name=$1 min=$2 cap=$3
    shift 3
    local avail=$(( $(left) - RESERVE ))
    local grace=$GRACE
    if [ "$RESERVE" = 0 ]; then grace=0; fi  # the last step: no reserve left to protect
    local t=$(( avail - grace < cap ? avail - grace : cap ))  # even a killed step leaves the reserve
    if [ "$t" -lt "$min" ]; then
        note "$name" "skipped: ${t} s of the budget left for it, it needs at least ${min} s"
        return 0
    fi
    echo
    echo "== $name (time cap ${t} s; $(left) s of the ${BUDGET} s budget left)"
    echo "   \$ $*"
    local t0=$SECONDS rc=0
    timeout -s INT -k "$GRACE" "${t}s" "$@" || rc=$?
    local took=$((SECONDS - t0))
    case $rc in
        0) note "$name" "ok (${took} s)" ;;
        124|137)
            if [ "$DRY" = 1 ]; then
                note "$name" "FAILED: cut off at its ${t} s cap in a dry run"; FAILED=1
            else
                note "$name" "cut off at its ${t} s cap (what finished is kept)"
            fi ;;
        5) note "$name" "FAILED: the selection matched no test (exit 5)"; FAILED=1 ;;
        *) note "$name" "FAILED: exit ${rc} after ${took} s"; FAILED=1 ;;
    esac
}

echo "== meprop-triton GPU run: $ROOT -> $OUTDIR (budget ${BUDGET} s$([ "$DRY" = 1 ] && echo ', dry run'))"

# --- 1. install the checkout (offline) ----------------------------------------------------
installed_here() {  # from another folder, so that the checkout on sys.path cannot fake it
    (cd / && "$PY" - "$ROOT" <<'EOF'
import os, sys
root = os.path.realpath(sys.argv[1])
try:
    import meprop_triton, meprop_triton.kernels
except Exception as e:  # noqa: BLE001
    print(f"meprop_triton is not importable here: {e}")
    sys.exit(1)
pkg = os.path.realpath(os.path.dirname(meprop_triton.__file__))
ker = os.path.realpath(os.path.dirname(meprop_triton.kernels.__file__))
if (pkg, ker) != (os.path.join(root, "meprop_triton"), os.path.join(root, "kernels")):
    print(f"meprop_triton imports from {pkg} (kernels {ker}), not from this checkout")
    sys.exit(1)
EOF
    )
}
echo
echo "== install"
if [ "$DRY" = 1 ]; then
    note install "skipped (dry run: nothing is installed)"
elif why=$(installed_here); then
    note install "skipped: meprop_triton already imports from this checkout"
else
    echo "   $why"
    if "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
        note install "ok (pip install --no-deps --no-build-isolation -e .)"
    else
        note install "FAILED: pip install --no-deps --no-build-isolation -e ."; FAILED=1
    fi
fi
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("pytest", "pytest_benchmark", "hypothesis") if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ] && [ -n "$WHEELS" ]; then
    echo "   installing from $WHEELS (offline): ${missing//_/-}"
    "$PY" -m pip install --no-index --find-links "$WHEELS" ${missing//_/-} || true
    missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("pytest","pytest_benchmark","hypothesis") if u.find_spec(m) is None))')
fi
if [ -n "$missing" ]; then
    echo "gpu_run.sh: missing Python packages: $missing. With no network, fetch their wheels" \
         "elsewhere (pip download pytest pytest-benchmark hypothesis -d wheels/) and pass" \
         "--wheels wheels/." >&2
    exit 2
fi

# --- 2. environment -----------------------------------------------------------------------
echo
echo "== environment"
env_rc=0
"$PY" - "$OUTDIR/gpu-env.json" "$DRY" "$BUDGET" "$ROOT" <<'EOF' || env_rc=$?
import datetime, json, os, platform, shutil, subprocess, sys

out, dry, budget, root = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]

def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None

import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
env = {
    "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "dry_run": dry,
    "budget_s": budget,
    "nvidia_smi": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    if shutil.which("nvidia-smi") else None,
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "triton": triton_version,
    "python": platform.python_version(),
    "platform": platform.platform(),
}
# A copy of the working tree without .git (as a GPU machine may get it): bench/COMMIT,
# written beside the checkout before it was sent (bench/README.md), says what it is.
# Where both are there and differ, the file's is kept too: the H200 machine's copy of
# .git once named the commit its session began at, while the tree sent was newer.
try:
    with open(os.path.join(root, "bench", "COMMIT")) as f:
        lines = f.read().split("\n")
    recorded = (lines[0].strip() or None, any(line.strip() for line in lines[1:]))
except OSError:
    recorded = None
commit = run("git", "rev-parse", "HEAD")
if commit is not None:
    status = run("git", "status", "--porcelain", "--untracked-files=no")
    env["commit"], env["uncommitted_changes"] = commit, None if status is None else bool(status)
    env["commit_source"] = "git"
    if recorded is not None and recorded[0] not in (None, commit):
        env["commit_file"] = recorded[0]
elif recorded is not None:
    env["commit"], env["uncommitted_changes"] = recorded
    env["commit_source"] = "bench/COMMIT"
else:
    env["commit"] = env["uncommitted_changes"] = None
    env["commit_source"] = "unknown: no git repository and no bench/COMMIT"

with open(out, "w") as f:
    json.dump(env, f, indent=2)
with open(out.removesuffix(".json") + ".txt", "w") as f:
    f.writelines(f"{k}: {v}\n" for k, v in env.items())
for k, v in env.items():
    print(f"   {k}: {v}")
EOF
if [ "$env_rc" = 0 ]; then
    note environment "written to gpu-env.json / gpu-env.txt"
else
    note environment "FAILED: exit $env_rc (the steps below run all the same)"; FAILED=1
fi

# --- 3. the CUDA tests (tests/kernels runs on CUDA tensors when a GPU is present) -----------
# With pytest-xdist installed, the files run in parallel workers (-n auto: at most 4 beside
# a GPU, tests/conftest.py), so more kernels are compiled and checked within the cap.
XDIST=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    XDIST=(-n auto --dist loadfile)
fi
# The CUDA-graph (a whole training step's capture too: it faulted once on an H200), op,
# eager-route and functional tests first, so that a cut-off run has checked them.
# Files only, in this order: given a folder too, pytest collects its files in name order
# (the duplicates dropped). The tests of host_glue.py and kernel_sweep.py run on CPU
# tensors whatever the machine (kernel_sweep.py itself runs as a step below).
PRIORITY=(tests/kernels/test_cuda_graph.py tests/kernels/test_cuda_graph_step.py
          tests/kernels/test_triton_ops.py tests/kernels/test_eager_route.py
          tests/kernels/test_functional_triton.py)
KERNEL_TESTS=("${PRIORITY[@]}")
for f in tests/kernels/test_*.py; do
    case " ${PRIORITY[*]} tests/kernels/test_host_glue.py tests/kernels/test_kernel_sweep.py " in *" $f "*) continue ;; esac
    KERNEL_TESTS+=("$f")
done
if [ "$DRY" = 1 ]; then  # the order pytest will collect them in on a GPU
    co_rc=0
    co=$("$PY" -m pytest --co -q -p no:cacheprovider -m "not aot" "${KERNEL_TESTS[@]}" 2>&1) || co_rc=$?
    got=$(grep -E '^tests/kernels/[^:]+::' <<<"$co" | cut -d: -f1 | uniq | head -n "${#PRIORITY[@]}" | tr '\n' ' ' || true)
    if [ "$co_rc" != 0 ]; then
        tail -n 15 <<<"$co"
        note test-order "FAILED: collecting the CUDA tests failed (pytest exit $co_rc; its output above)"; FAILED=1
    elif [ "$got" = "${PRIORITY[*]} " ]; then
        note test-order "ok: ${#KERNEL_TESTS[@]} files, $(basename "${PRIORITY[0]}") first"
    else
        note test-order "FAILED: the CUDA tests would start with: ${got:-nothing collected}"; FAILED=1
    fi
fi
if [ "$DRY" = 1 ]; then
    run_step tests 20 "$TESTS_S" env TRITON_INTERPRET=1 "$PY" -m pytest -x -q -p no:cacheprovider \
        ${XDIST[@]+"${XDIST[@]}"} -m "not aot" "${PRIORITY[@]:0:4}"  # the interpreter runs the 5th for minutes
else
    # Not -x: the one GPU run should show every failing test within the cap, not the first.
    run_step tests 30 "$TESTS_S" "$PY" -m pytest --maxfail=30 -q -p no:cacheprovider -m "not aot" \
        ${XDIST[@]+"${XDIST[@]}"} "${KERNEL_TESTS[@]}"
fi

# --- 4. GPU benchmark groups, in order of importance -------------------------------------
# bench_group NAME MIN_S CAP_S "-k expression" FILE...
bench_group() {
    local name=$1 min=$2 cap=$3 expr=$4
    shift 4
    if [ "$DRY" = 1 ]; then
        local ids n bad
        ids=$("$PY" -m pytest --co -q -p no:cacheprovider "$@" -k "$expr" 2>&1 | grep -E '^[^ ]+::[^ ]+$' || true)
        n=$(grep -c . <<<"$ids" || true)
        bad=$(grep -v 'cuda' <<<"$ids" || true)
        if [ "$n" = 0 ]; then
            note "bench $name" "FAILED: -k '$expr' selects no case"; FAILED=1; return 0
        elif [ -n "$bad" ]; then
            note "bench $name" "FAILED: -k '$expr' selects non-CUDA cases: $(head -3 <<<"$bad" | tr '\n' ' ')"
            FAILED=1; return 0
        fi
        echo "   $name: $n CUDA cases selected"
        run_step "bench $name" 5 120 "$PY" -m pytest -q -p no:cacheprovider "$@" -k "$expr" --benchmark-disable
    else
        local json="$OUTDIR/gpu-$STAMP-$name.json"
        run_step "bench $name" "$min" "$cap" env MEPROP_BENCH_PARTIAL="${json%.json}.partial.jsonl" \
            "$PY" -m pytest -q -p no:cacheprovider "$@" -k "$expr" \
            --benchmark-only --benchmark-columns=min,median,max,rounds --benchmark-json "$json"
        keep_json "$json"
    fi
}
# keep_json FILE: the group's JSON for the report, or, where its run died before pytest-
# benchmark wrote it (a crash, a kill), the cases bench/conftest.py appended one by one.
keep_json() {
    local json=$1 partial=${1%.json}.partial.jsonl
    if [ -s "$json" ] && "$PY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$json" 2>/dev/null; then
        JSONS+=("$json"); rm -f "$partial"
    elif [ -s "$partial" ] && [ "$(wc -l <"$partial")" -gt 1 ]; then
        echo "   no complete $(basename "$json"): the report takes the $(( $(wc -l <"$partial") - 1 )) cases in $(basename "$partial")"
        JSONS+=("$partial")
    fi
}
B=bench/test_bench_backward.py
bench_group a-bf16-unified 30 180 \
    "cuda-bf16-large and (triton-unified-topk-densegrad or test_dense_backward or (test_selection and triton))" \
    "$B" bench/test_bench_selection.py
# The unified products by cuBLAS (the default) vs by the Triton GEMMs, side by side.
bench_group b-gemm-routes 20 90 "test_triton_gemm_routes" "$B"
# the forward first: the graphed training step is the last case of its process
bench_group f-train-step 15 75 "cuda" bench/test_bench_forward.py bench/test_bench_train_step.py
# Each kernel alone, each GEMM under every config (bench/kernel_sweep.py): what the
# kernels' tuning needs next.
if [ "$DRY" = 1 ]; then
    run_step kernel-sweep 10 60 "$PY" bench/kernel_sweep.py --dry-run --json "$OUTDIR/kernel-sweep-dry.json"
else
    run_step kernel-sweep 40 120 "$PY" bench/kernel_sweep.py --json "$OUTDIR/kernel-sweep-$STAMP.json"
fi
bench_group d-table7 30 120 "table7" "$B"
bench_group c-fp16-fp32-5pct 15 60 \
    "(cuda-fp16-large or cuda-fp32-large) and (triton-unified-topk-densegrad-k5pct or test_dense_backward)" "$B"
bench_group e-per-example 20 120 "cuda-bf16-large-triton-per-example-topk or test_triton_per_example_routes" "$B"
bench_group g-compact-vs-gather 15 60 "test_triton_gather_in_gemm" "$B"

if [ "$DRY" = 1 ]; then  # two quick CPU cases timed for real, so that the report has a JSON
    json="$OUTDIR/cpu-smoke-$STAMP.json"
    partial=${json%.json}.partial.jsonl
    run_step "bench cpu-smoke" 10 90 env MEPROP_BENCH_PARTIAL="$partial" "$PY" -m pytest -q -p no:cacheprovider "$B" \
        -k "cpu-fp32-mnist-torch-unified-topk-densegrad and (k5pct or k80)" \
        --benchmark-only --benchmark-json "$json"
    # The per-case record a crash would leave: one line per case the JSON holds, after a header.
    if [ -s "$json" ] && "$PY" - "$json" "$partial" <<'EOF'
import json, sys
cases = json.load(open(sys.argv[1]))["benchmarks"]
lines = [json.loads(line) for line in open(sys.argv[2])]
assert lines[0]["machine_info"]["meprop"] and [r["benchmark"]["name"] for r in lines[1:]] == [c["name"] for c in cases]
EOF
    then
        note partial-record "ok: $(basename "$partial") holds the JSON's cases"
    else
        note partial-record "FAILED: $(basename "$partial") does not match $(basename "$json")"; FAILED=1
    fi
    keep_json "$json"
fi

# --- 5. the paper's Table 8 (MNIST, h = 8192) if time is left ------------------------------
mnist_found() {  # the four files in folder $1 ("" for the cache), offline
    (cd / && "$PY" -c "import sys; from meprop_triton.data import load_mnist; load_mnist(sys.argv[1] or None, download=False, log=lambda s: None)" "$1") >/dev/null 2>&1
}
if [ -z "$MNIST_DIR" ] && [ -d "$ROOT/.mnist" ] && mnist_found "$ROOT/.mnist"; then
    MNIST_DIR=$ROOT/.mnist  # taken along with the checkout (an incomplete one: the cache)
fi
mnist_args=()
if [ -n "$MNIST_DIR" ]; then
    MNIST_DIR=$(cd "$MNIST_DIR" && pwd)
    mnist_args=(--data-dir "$MNIST_DIR")
fi
if mnist_found "$MNIST_DIR"; then
    if [ "$DRY" = 1 ]; then
        run_step mnist-table8 20 120 "$PY" -m meprop_triton.mnist --device cpu --d_hidden 32 --k 8 \
            --n_epoch 1 --compare --warmup-steps 5 ${mnist_args[@]+"${mnist_args[@]}"} \
            --json "$OUTDIR/mnist-table8-dry.json"
    else
        run_step mnist-table8 60 150 "$PY" -m meprop_triton.mnist --device cuda --d_hidden 8192 --k 8 \
            --n_epoch 1 --compare ${mnist_args[@]+"${mnist_args[@]}"} \
            --json "$OUTDIR/mnist-table8-$STAMP.json" --plot "$OUTDIR/mnist-table8-$STAMP.png"
    fi
else
    note mnist-table8 "skipped: no MNIST files offline (--mnist-dir, .mnist/ in the checkout, or the cache)"
fi

# --- 6. code generation for sm_90 (bench/codegen.py, when the checkout has it) --------------
if [ -f bench/codegen.py ]; then
    run_step codegen-sm90 30 90 "$PY" bench/codegen.py --arch 90 --shape 8192 4096 4096 --k 205 \
        --dtype bfloat16 --json "$OUTDIR/codegen-sm90.json"
else
    note codegen-sm90 "skipped: bench/codegen.py is not in this checkout"
fi

# --- 7. the report over every JSON written --------------------------------------------------
echo
RESERVE=0
if [ ${#JSONS[@]} -gt 0 ]; then
    name=$([ "$DRY" = 1 ] && echo "dry-$STAMP" || echo "gpu-$STAMP")
    run_step report 5 60 "$PY" bench/report.py "${JSONS[@]}" --md "$OUTDIR/$name.md" --png "$OUTDIR/$name.png"
else
    note report "FAILED: no benchmark JSON was written"; FAILED=1
fi

echo
echo "== summary ($((SECONDS - START)) s of ${BUDGET} s; results in $OUTDIR)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUTDIR/gpu-run-summary.txt"
exec >&- 2>&-        # let tee write the log's last lines before the machine ends its processes
wait "$TEE_PID" 2>/dev/null || true
exit "$FAILED"
