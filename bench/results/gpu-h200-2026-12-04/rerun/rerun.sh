#!/usr/bin/env bash
# The second H200 call of 2026-12-04: after the fixes the first run showed, the CUDA tests
# of the changed route and the benchmark groups they change, each under its own cap.
export PYTHONUNBUFFERED=1
R=/tmp/r2; mkdir -p $R; S=$(date -u +%Y-%m-%dT%H%M%SZ)
save() { tar czf $OUT/r2.tgz -C /tmp r2 2>/dev/null; }
exec > >(tee -a $R/rerun.log) 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))"
git rev-parse HEAD 2>/dev/null || head -1 bench/COMMIT
timeout -s INT -k 5 40 python3 -m pytest -q -p no:cacheprovider -n 4 --dist loadfile -m "not aot" \
    tests/kernels/test_per_example.py tests/kernels/test_cuda_graph.py 2>&1 | tail -15
B() { local name=$1 cap=$2; shift 2
  timeout -s INT -k 10 $cap python3 -m pytest -q -p no:cacheprovider "$@" --benchmark-only \
    --benchmark-columns=min,median,max,rounds --benchmark-json $R/gpu-$S-$name.json 2>&1 | grep -v "^\s*$" | tail -40
  save; }
B f-train-step 55 bench/test_bench_train_step.py bench/test_bench_forward.py -k cuda
B a-bf16-unified 60 bench/test_bench_backward.py bench/test_bench_selection.py -k "cuda-bf16-large and (triton-unified-topk-densegrad or test_dense_backward or (test_selection and triton))"
B e-per-example 35 bench/test_bench_backward.py -k "cuda-bf16-large-triton-per-example-topk or test_triton_per_example_routes"
B d-table7-bf16 30 bench/test_bench_backward.py -k "table7 and bf16"
timeout -k 5 40 python3 .prof/compile_check.py 2>&1 | grep -v Warning | tail -12; save
timeout 15 python3 bench/report.py $R/gpu-$S-*.json --md $R/gpu-$S.md --png $R/gpu-$S.png 2>&1 | tail -3
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv
save
