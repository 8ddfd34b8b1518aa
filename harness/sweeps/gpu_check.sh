#!/usr/bin/env bash
# One device call: GPU-kernel correctness (2 and 4 ranks sharing the GPU over gloo) and the
# one-GPU scaling sweep (TP=1 measured, TP=2/4 projected). Results land under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version())" > "$OUT/versions.txt" 2>&1
TPGATE_EXAMPLES=${TPGATE_EXAMPLES:-3} timeout ${CORRECTNESS_TIMEOUT:-260} python3 -m harness.cli correctness --device cuda --out reports/correctness 2>&1 | tail -40 > "$OUT/correctness.log"
timeout ${SCALING_TIMEOUT:-280} python3 -m harness.cli scaling --config harness/sweeps/one_gpu.toml --project 2>&1 | tail -40 > "$OUT/scaling.log"
cd reports && tar czf "$OUT/reports.tgz" correctness scaling index.html 2>/dev/null
cp scaling/results.csv "$OUT/scaling_results.csv" 2>/dev/null
cp correctness/results.json "$OUT/correctness_results.json" 2>/dev/null
tail -5 "$OUT/correctness.log"; tail -15 "$OUT/scaling.log"
