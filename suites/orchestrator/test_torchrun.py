"""The same run() API works SPMD under torchrun: every process is a rank, rank 0 collects."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from impl.orchestrator import free_port

SCRIPT = textwrap.dedent("""
    import json, sys
    from impl.orchestrator import TorchrunWorld, in_torchrun
    from suites.orchestrator import rank_fns

    assert in_torchrun()
    world = TorchrunWorld(device="cpu", timeout_s=60)
    results = world.run(rank_fns.all_reduce_rank)
    info = world.run(rank_fns.identity)
    if world.rank == 0:
        print(json.dumps({"sums": results, "ranks": [i["rank"] for i in info]}))
    else:
        assert results is None
    world.shutdown()
""")


def test_torchrun_spmd_run(tmp_path):
    script = tmp_path / "spmd.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), str(script)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=str(tmp_path),
                          env={**__import__("os").environ, "PYTHONPATH": ":".join(sys.path)})
    assert done.returncode == 0, "\n".join(line for line in done.stderr.splitlines() if "Warning" not in line)[-8000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"sums": [3.0, 3.0], "ranks": [0, 1]}
