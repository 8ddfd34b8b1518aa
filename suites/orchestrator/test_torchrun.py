"""The same run() API works SPMD under torchrun: every process is a rank, rank 0 collects; with
tp_size < world size the world splits into the TP groups of the layout asked for."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from harness.runtime.orchestrator import free_port

from . import rank_fns

# one launch (a torchrun start costs seconds): 4 processes as 2 strided TP groups of 2, {0,2},{1,3}
SCRIPT = textwrap.dedent("""
    import json, sys
    from harness.runtime.orchestrator import TorchrunWorld, in_torchrun
    from suites.orchestrator import rank_fns

    assert in_torchrun()
    world = TorchrunWorld(device="cpu", timeout_s=60, tp_size=2, tp_layout="strided")
    results = world.run(rank_fns.all_reduce_rank)
    info = world.run(rank_fns.identity)
    groups = world.run(rank_fns.tp_group_report)
    if world.rank == 0:
        print(json.dumps({"sums": results, "ranks": [i["rank"] for i in info], "tp_sizes": [i["tp_size"] for i in info], "groups": groups}))
    else:
        assert results is None
    world.shutdown()
""")


def test_torchrun_spmd_run(tmp_path):
    script = tmp_path / "spmd.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                          env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Warning" not in line)[-8000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # all_reduce_rank sums rank + 1 over the TP group: {0,2} -> 1 + 3, {1,3} -> 2 + 4
    assert {k: out[k] for k in ("sums", "ranks", "tp_sizes")} == {"sums": [4.0, 6.0, 4.0, 6.0], "ranks": [0, 1, 2, 3], "tp_sizes": [2] * 4}
    assert not (problems := rank_fns.tp_group_problems(out["groups"], 2, "strided")), problems
