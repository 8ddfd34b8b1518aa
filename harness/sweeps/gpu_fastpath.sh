#!/usr/bin/env bash
# One device call (issue 5): the static-decode tests on the GPU (CUDA graph capture + replay,
# no host sync), then harness.fastpath — ceilings, decode variants at batch 1 and 16, kernel
# profile, prefill — on a tiny model (smoke) and on the Llama-3-8B shape. Results under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
timeout ${TEST_TIMEOUT:-150} python3 -m pytest suites/correctness/test_static_decode.py --tpgate-device cuda -q -p no:cacheprovider -rs --tb=short > "$OUT/static_decode_tests.log" 2>&1; tail -4 "$OUT/static_decode_tests.log"
timeout ${SMOKE_TIMEOUT:-90} python3 -m harness.fastpath --preset tiny --steps 20 --skip prefill --out "$OUT/tiny" 2>&1 | tail -8
timeout ${FAST_TIMEOUT:-400} python3 -m harness.fastpath --preset ${PRESET:-llama3-8b} ${FASTPATH_ARGS:-} --out "$OUT" 2>&1 | tail -30 | tee "$OUT/fastpath.log"
