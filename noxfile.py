"""nox sessions: `tests` (fast, the project's own tests) and `correctness` (suites + report).

How torch gets into the session (never the multi-GB CUDA build on a CPU-only machine):
1. the interpreter running nox can import torch -> the session venv sees it through
   --system-site-packages and pip installs nothing for it (CPU or CUDA build, as installed);
2. else a CUDA GPU is present -> `torch` from the index (its default build is CUDA);
3. else CPU-only -> a torch wheel found in pip's find-links (a local CPU build), or the CPU
   wheel index. TPGATE_TORCH overrides with any pip requirement spec.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_existing_virtualenvs = True
VENV = {"venv_params": ["--system-site-packages"]}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _local_cpu_torch() -> str | None:
    links = os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]
    wheels = sorted(w for d in links if os.path.isdir(d) for w in glob.glob(os.path.join(d, "torch-*+cpu-*.whl")))
    match = re.search(r"torch-([^+-]+)\+cpu", os.path.basename(wheels[-1])) if wheels else None
    return f"torch=={match.group(1)}" if match else None


def install(session: nox.Session) -> None:
    spec = os.environ.get("TPGATE_TORCH")
    if spec:
        session.install(spec)
    elif importlib.util.find_spec("torch") is not None:
        session.log("reusing the torch importable by nox's interpreter (system site packages)")
    elif shutil.which("nvidia-smi"):
        session.install("torch")
    else:
        local = _local_cpu_torch()
        session.install(local) if local else session.install("torch", "--index-url", CPU_INDEX)
    session.install("-e", ".[test]")


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The whole test suite with few hypothesis examples per property: fast."""
    install(session)
    session.env["TPGATE_EXAMPLES"] = os.environ.get("TPGATE_EXAMPLES", "2")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(**VENV)
def correctness(session: nox.Session) -> None:
    """The TP-equivalence suites at world sizes 1/2/4 and the report in reports/correctness/."""
    install(session)
    session.run("tpgate", "correctness", *session.posargs)


@nox.session(**VENV)
def scaling(session: nox.Session) -> None:
    """The scaling sweep ([tool.tpgate.scaling]), the gate and reports/scaling/ + reports/index.html."""
    install(session)
    session.run("tpgate", "scaling", *session.posargs)
