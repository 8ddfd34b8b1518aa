#!/usr/bin/env bash
# GPU checks of issue 5, one part per device call (each part fits a 10-minute call; all three do not):
#   bash harness/sweeps/gpu_check.sh correctness   # ~5 min: suites on GPU kernels, 2/4 ranks sharing the GPU over gloo
#   bash harness/sweeps/gpu_check.sh scaling       # ~3 min: one-GPU sweep, TP=1 measured, TP=2/4 projected
#   bash harness/sweeps/gpu_fastpath.sh            # ~8 min: static-decode tests + decode/prefill speed (harness.fastpath)
# On four GPUs (issue 7; NCCL, one GPU per rank): correctness4, scaling4 (harness/sweeps/four_gpu.toml).
# The fault suite is left out on the GPU: it tests orchestration, which CPU CI covers.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
case "${1:-}" in
  correctness)
    timeout ${CORRECTNESS_TIMEOUT:-560} python3 -m harness.cli correctness --device cuda --examples ${EXAMPLES:-3} -k "not faults" \
      --out reports/correctness > "$OUT/correctness.log" 2>&1
    echo "rc=$?"; grep -E "^FAILED" "$OUT/correctness.log"; tail -2 "$OUT/correctness.log"
    (cd reports && tar czf "$OUT/correctness.tgz" correctness) ;;
  scaling)
    timeout ${SCALING_TIMEOUT:-570} python3 -m harness.cli scaling --config harness/sweeps/one_gpu.toml --project > "$OUT/scaling.log" 2>&1
    echo "rc=$?"; grep -v "scaling sweep" "$OUT/scaling.log" | tail -12
    (cd reports && tar czf "$OUT/scaling.tgz" scaling index.html) ;;
  correctness4)  # one GPU per rank: NCCL (issue 7)
    timeout ${CORRECTNESS_TIMEOUT:-570} python3 -m harness.cli correctness --device cuda --examples ${EXAMPLES:-3} \
      --out reports/correctness > "$OUT/correctness.log" 2>&1
    echo "rc=$?"; grep -E "^FAILED" "$OUT/correctness.log"; tail -2 "$OUT/correctness.log"
    (cd reports && tar czf "$OUT/correctness.tgz" correctness) ;;
  scaling4)
    # BASELINE: a results.csv from the same GPU model (the one-GPU baselines are H100; x4 is H200)
    timeout ${SCALING_TIMEOUT:-570} python3 -m harness.cli scaling --config harness/sweeps/four_gpu.toml ${BASELINE:+--baseline "$BASELINE"} > "$OUT/scaling.log" 2>&1
    echo "rc=$?"; grep -v "scaling sweep" "$OUT/scaling.log" | tail -12
    (cd reports && tar czf "$OUT/scaling.tgz" scaling index.html) ;;
  *) echo "usage: $0 correctness|scaling|correctness4|scaling4" >&2; exit 2 ;;
esac
