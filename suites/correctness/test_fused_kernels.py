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


def _rows() -> list[dict]:
    if torch.cuda.is_available():
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
    assert len(real) == 3 * len(kernel_checks.SHAPES) * len(kernel_checks.SPLITS) * 2 + 6
    failed = [r for r in real if not r["passed"]]
    assert not failed, failed[:3]


def test_broken_uses_of_the_kernel_are_rejected(rows):
    """Each mutant case (a shape, a dtype, a mutant) must fail at least one of its checks."""
    cases = defaultdict(list)
    for r in rows:
        if r["mutant"] is not None:
            cases[(tuple(r["shape"]), r["dtype"], r["mutant"])].append(r["passed"])
    assert len(cases) == 2 * len(kernel_checks.MUTANTS) * sum(1 for s in kernel_checks.SHAPES if s[-1] > 0)
    slipped = [case for case, passed in cases.items() if all(passed)]
    assert not slipped, slipped
