#!/usr/bin/env bash
# Issue 15 on four GPUs (nvidia-h200-x4: one rank per GPU, NCCL), in two 10-minute device calls:
#   bash harness/sweeps/four_gpu.sh comm     # ~4 min: the low-latency all-reduce and the overlapped prefill
#                                            #   checked on NCCL (pytest), all-reduce latency by algorithm and size at TP 2 and 4
#   bash harness/sweeps/four_gpu.sh scaling  # ~8 min: four_gpu.toml (measured 1/2/4 and projected: the projection error),
#                                            #   the collective benchmark feeding the cost model's tables, the gate
# Results under $OUT; commit them as a baseline (reports/baselines/scaling-h200x4_*).
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
case "${1:-}" in
  comm)
    timeout 240 python3 -m pytest -q -p no:cacheprovider --tpgate-device cuda suites/correctness/test_low_latency.py \
      suites/correctness/test_overlapped_prefill.py > "$OUT/comm-tests.log" 2>&1
    echo "tests rc=$?"; tail -3 "$OUT/comm-tests.log"
    for ws in 2 4; do
      OUT="$OUT/ws$ws" timeout 120 python3 -m harness.sweeps.all_reduce_latency --world-size $ws > "$OUT/all-reduce-ws$ws.log" 2>&1
      echo "all_reduce_latency ws=$ws rc=$?"; tail -12 "$OUT/all-reduce-ws$ws.log"
    done ;;
  scaling)
    timeout 570 python3 -m harness.cli scaling --config harness/sweeps/four_gpu.toml ${BASELINE:+--baseline "$BASELINE"} > "$OUT/scaling.log" 2>&1
    echo "rc=$?"; grep -v "scaling sweep" "$OUT/scaling.log" | tail -12
    (cd reports && tar czf "$OUT/scaling.tgz" scaling index.html) ;;
  *) echo "usage: $0 comm|scaling" >&2; exit 2 ;;
esac
