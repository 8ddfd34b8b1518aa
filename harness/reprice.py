"""Re-price a committed scaling baseline's projected points under another all-reduce pricing or
with a pipelined (overlapped) prefill, without a GPU: the projection is the shard's own time (the
row's null_latency_s, measured alone on one GPU) plus its collectives priced by harness.perf_model.

The baselines store per-step collective counts and bytes, not the records, so `reference_records`
lists what the reference issues for a point (the shapes suites/harness/test_gate_and_sweep.py's
test_cpu_sweep_measures_every_point checks on a real world) and `reprice` refuses a row whose
stored counts and bytes the list does not reproduce.

`pipelined(records, ...)` models the overlapped sequence-parallel prefill of issue 15 item 1: each
all-gather -> column-parallel matmul and row-parallel matmul -> reduce-scatter in `chunks` chunks,
chunk k's transfer in flight during a neighbouring chunk's matmul, the first all-gather chunk (fill)
and the last reduce-scatter chunk (drain) exposed. When the overlapped path records its own
`overlap_flops`, its sweep rows replace this model.

    python3 -m harness.reprice reports/baselines/scaling-h200_..._compiled-decode-split-attention --world-size 4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from impl.architecture import ModelConfig, parse_dtype, require

from .perf_model import DEFAULTS, CostModel, matmul_flop_s, price_collectives
from .sweep import PRESETS

PAIR_BYTES = 8  # the reference's greedy all-gathers one (value, index) pair per row, 8 bytes (impl/tensor_parallel.py greedy)


def reference_records(config: ModelConfig, phase: str, batch: int, prompt: int, tp: int, elsize: int, sequence_parallel: bool) -> list[dict]:
    """The reference's collectives for one decode step or one prefill call on each of `tp` ranks, as
    CountingCommunicator records them ({"kind", "nbytes": this rank's input bytes}, plus "role")."""
    h, layers = config.hidden_size, config.num_layers
    if phase == "decode" or not sequence_parallel:
        tokens = batch * (1 if phase == "decode" else prompt)
        reduce = [{"kind": "all_reduce", "nbytes": tokens * h * elsize, "role": "reduce"} for _ in range(2 * layers + 1)]
        return reduce + [{"kind": "all_gather", "nbytes": batch * PAIR_BYTES, "role": "pair"}]
    full, shard = batch * prompt * h * elsize, batch * prompt // tp * h * elsize
    out = [{"kind": "reduce_scatter", "nbytes": full, "role": "embedding"}]
    for _ in range(layers):
        out += [{"kind": "all_gather", "nbytes": shard, "role": "qkv"}, {"kind": "reduce_scatter", "nbytes": full, "role": "o"},
                {"kind": "all_gather", "nbytes": shard, "role": "gate_up"}, {"kind": "reduce_scatter", "nbytes": full, "role": "down"}]
    return out + [{"kind": "all_gather", "nbytes": batch * h * elsize, "role": "last"}, {"kind": "all_gather", "nbytes": batch * PAIR_BYTES, "role": "pair"}]


def matmul_flops(config: ModelConfig, tokens: int, tp: int) -> dict[str, float]:
    """One rank's FLOPs of the matmul beside each prefill collective (2 * tokens * in * out / tp)."""
    h, hd = config.hidden_size, config.hidden_size // config.num_heads
    return {"qkv": 2 * tokens * h * (config.num_heads + 2 * config.num_kv_heads) * hd / tp, "o": 2 * tokens * h * h / tp,
            "gate_up": 2 * tokens * h * 2 * config.intermediate_size / tp, "down": 2 * tokens * config.intermediate_size * h / tp}


def pipelined(records: list[dict], flops: dict[str, float], chunks: int) -> list[dict]:
    """`records` with each all-gather -> matmul (roles qkv, gate_up) and matmul -> reduce-scatter
    (o, down) split into `chunks` transfers: all but the fill (first all-gather chunk) and the drain
    (last reduce-scatter chunk) carry overlap_flops = one chunk's matmul. Other records unchanged."""
    require(isinstance(chunks, int) and chunks >= 1, "chunks", chunks, "must be an integer >= 1")
    out = []
    for r in records:
        if r.get("role") not in flops or chunks == 1:
            out.append(r)
            continue
        require(r["nbytes"] % chunks == 0, "chunks", chunks, f"must divide the {r['role']} message of {r['nbytes']} bytes")
        per = flops[r["role"]] / chunks
        exposed = 0 if r["kind"] == "all_gather" else chunks - 1  # fill: the first gather chunk; drain: the last scatter chunk
        out += [{**r, "nbytes": r["nbytes"] // chunks, "overlap_flops": 0 if k == exposed else per} for k in range(chunks)]
    return out


def reprice(baseline_dir: str | Path, world_size: int = 4, chunks: int = 4, model: CostModel = DEFAULTS) -> list[dict]:
    """Each projected reference point of `baseline_dir`'s results.json at `world_size`: its stored
    latency, and the latency and speedup re-priced (decode: NCCL and low-latency all-reduce;
    prefill: sequential and pipelined in `chunks`)."""
    data = json.loads((Path(baseline_dir) / "results.json").read_text())
    rows = [r for r in data["rows"] if r.get("status") == "ok" and r.get("implementation") == "reference"]
    out = []
    for r in rows:
        if not (r.get("projected") and int(r["world_size"]) == world_size):
            continue
        one = next(b["latency_s"] for b in rows if not b.get("projected") and int(b["world_size"]) == 1
                   and all(b[k] == r[k] for k in ("preset", "phase", "batch", "prompt", "steps", "dtype")))
        config, elsize = PRESETS[r["preset"]], parse_dtype(r["dtype"]).itemsize
        records = reference_records(config, r["phase"], int(r["batch"]), int(r["prompt"]), world_size, elsize, bool(r.get("sequence_parallel")))
        stored = (r["collectives_per_step"], r["comm_bytes_per_step"])
        require(stored == (len(records), sum(x["nbytes"] for x in records)), "baseline row", stored,
                f"the reference's listed collectives ({len(records)}, {sum(x['nbytes'] for x in records)} bytes) do not reproduce it")
        flop_s = matmul_flop_s(r["device"], r["dtype"])
        alone = r["null_latency_s"]
        point = {"phase": r["phase"], "batch": int(r["batch"]), "prompt": int(r["prompt"]), "world_size": world_size, "tp1_ms": one * 1e3,
                 "shard_ms": alone * 1e3, "stored_ms": r["latency_s"] * 1e3, "stored_speedup": one / r["latency_s"]}
        variants = {"nccl": price_collectives(records, world_size, model, "nccl", flop_s)}
        if r["phase"] == "decode":
            variants["low-latency"] = price_collectives(records, world_size, model, "low-latency", flop_s)
        else:
            flops = matmul_flops(config, int(r["batch"]) * int(r["prompt"]), world_size)
            variants[f"nccl, {chunks} chunks overlapped"] = price_collectives(pipelined(records, flops, chunks), world_size, model, "nccl", flop_s)
        for name, p in variants.items():
            point[name] = {"comm_ms": p.exposed_s * 1e3, "comm_no_overlap_ms": p.transfer_s * 1e3, "latency_ms": (alone + p.exposed_s) * 1e3,
                           "speedup": one / (alone + p.exposed_s), "exposed_comm": p.exposed_s / (alone + p.exposed_s),
                           "algorithms": p.algorithms, "sources": list(p.sources)}
        out.append(point)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m harness.reprice", description=__doc__.split("\n\n")[0])
    parser.add_argument("baselines", nargs="+", help="scaling report directories holding results.json")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=4, help="pipeline chunks of the overlapped prefill model")
    args = parser.parse_args(argv)
    for d in args.baselines:
        for p in reprice(d, args.world_size, args.chunks):
            print(f"{Path(d).name}: {p['phase']} {p['batch']}x{p['prompt']} TP={p['world_size']}: TP=1 {p['tp1_ms']:.3f} ms, shard alone "
                  f"{p['shard_ms']:.3f} ms, stored projection {p['stored_ms']:.3f} ms ({p['stored_speedup']:.2f}x)")
            for name, v in p.items():
                if isinstance(v, dict):
                    print(f"    {name:28s} {v['latency_ms']:.3f} ms  {v['speedup']:.2f}x  exposed comm {v['comm_ms']:.3f} ms ({v['exposed_comm']:.1%}),"
                          f" without overlap {v['comm_no_overlap_ms']:.3f} ms; {v['algorithms']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
