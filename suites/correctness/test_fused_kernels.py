"""The fused decode-attention kernel equals the plain PyTorch path (suites/correctness/kernel_checks.py):
on a CUDA GPU directly; on a CPU through Triton's interpreter, in a child process (the interpreter is
chosen when Triton is imported). Skipped, with the reason, where Triton is not installed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from . import kernel_checks


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows() -> list[dict]:
    if DEVICE == "cuda":
        return kernel_checks.run_all("cuda")
    pytest.importorskip("triton", reason="the fused kernel is Triton; without it only the PyTorch path exists (CPU default)")
    done = subprocess.run([sys.executable, "-m", "suites.correctness.kernel_checks", "cpu"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def rows():
    return _rows()


def test_fused_decode_attention_matches_the_plain_path(rows):
    real = [r for r in rows if r["mutant"] is None]
    checked = [c for c in kernel_checks.cases(DEVICE) if c[3] is None]
    assert len(real) == 3 * len(checked) + 6  # out, the k-cache row and the untouched rest per case; 6 decoder steps
    assert {(tuple(r["shape"]), r["dtype"], r["splits"]) for r in real if r["shape"] != "decoder"} == \
        {(shape, str(dtype), splits) for shape, dtype, splits, _ in checked}
    assert {r["splits"] for r in real if r["shape"] != "decoder"} == set(kernel_checks.SPLITS)
    failed = [r for r in real if not r["passed"]]
    assert not failed, failed[:3]


def test_broken_uses_of_the_kernel_are_rejected(rows):
    """Each mutant case (a shape, a dtype, a mutant) must fail at least one of its checks."""
    cases = defaultdict(list)
    for r in rows:
        if r["mutant"] is not None:
            cases[(tuple(r["shape"]), r["dtype"], r["mutant"])].append(r["passed"])
    assert len(cases) == sum(1 for c in kernel_checks.cases(DEVICE) if c[3] is not None)
    assert {(dtype, mutant) for _, dtype, mutant in cases} == {(str(d), m) for d in (torch.float32, torch.bfloat16) for m in kernel_checks.MUTANTS}
    slipped = [case for case, passed in cases.items() if all(passed)]
    assert not slipped, slipped
