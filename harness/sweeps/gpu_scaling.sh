#!/usr/bin/env bash
# One device call: the model suites on the GPU (failures in full), then the one-GPU sweep.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TPGATE_DEVICE=cuda TPGATE_EXAMPLES=2 timeout ${MODEL_TIMEOUT:-150} python3 -m pytest suites/model -q -p no:cacheprovider --tb=line -rf 2>&1 | grep -v Warning | tail -60 > "$OUT/model_suite.log"
timeout ${SCALING_TIMEOUT:-400} python3 -m harness.cli scaling --config harness/sweeps/one_gpu.toml --project --repeats ${REPEATS:-3} > "$OUT/scaling.log" 2>&1
cp reports/scaling/results.csv "$OUT/scaling_results.csv" 2>/dev/null
cp reports/scaling/results.json "$OUT/scaling_results.json" 2>/dev/null
cp reports/scaling/index.html "$OUT/scaling_index.html" 2>/dev/null
tail -30 "$OUT/model_suite.log"; grep -v "scaling sweep" "$OUT/scaling.log" | tail -15
