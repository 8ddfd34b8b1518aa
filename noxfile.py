"""nox sessions: `tests` (fast, the project's own tests), `correctness` (suites + report, under
coverage -> reports/coverage/), `benchmarks` (layer microbenchmarks -> reports/scaling/
layer-benchmarks.json) and `scaling` (benchmarks, then the sweep, the gate and reports/scaling/).

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
    """The import-layer contract, then the whole test suite with few hypothesis examples per property: fast."""
    install(session)
    session.run("lint-imports")  # the import-layer contract: [tool.importlinter] in pyproject.toml
    # posargs may give their own --tpgate-examples: argparse keeps the last one
    session.run("python", "-m", "pytest", "-q", "--tpgate-examples", "2", *session.posargs)


COVERAGE_DIR = "reports/coverage"
BENCH_JSON = "reports/scaling/layer-benchmarks.json"


@nox.session(**VENV)
def correctness(session: nox.Session) -> None:
    """The TP-equivalence suites at world sizes 1/2/4 and the report in reports/correctness/, run
    under coverage ([tool.coverage.*] in pyproject.toml): line coverage of impl/, including what
    the spawned ranks and torchrun workers execute, in reports/coverage/ (coverage.json + HTML).
    The coverage report is written even when the suites fail; the session then fails."""
    install(session)
    session.run("python", "-m", "coverage", "erase")
    try:
        session.run("python", "-m", "coverage", "run", "-m", "harness.cli", "correctness", *session.posargs)
    finally:
        _coverage_report(session)


def _coverage_report(session: nox.Session) -> None:
    """Combine the per-process data files and publish reports/coverage/ atomically."""
    if not glob.glob(".coverage.*"):
        session.warn("no coverage data files: reports/coverage/ left as it was")
        return
    session.run("python", "-m", "coverage", "combine", "-q")
    staging = f"{COVERAGE_DIR}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    session.run("python", "-m", "coverage", "json", "-q", "-o", f"{staging}/coverage.json")
    session.run("python", "-m", "coverage", "html", "-q", "-d", staging, "--title", "tpgate: line coverage of impl/ (ranks included)")
    session.run("python", "-m", "coverage", "report", "--sort=cover")
    session.run("python", "-c", f"from harness.atomic import publish_dir_atomic; publish_dir_atomic({staging!r}, {COVERAGE_DIR!r})")


def _layer_benchmarks(session: nox.Session, extra: list[str]) -> None:
    # to a temp name first: a run that fails half-way must not replace the last good JSON
    os.makedirs(os.path.dirname(BENCH_JSON), exist_ok=True)
    tmp = f"{BENCH_JSON}.partial"
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "suites/scaling", "--benchmark-only", f"--benchmark-json={tmp}", *extra)
    os.replace(tmp, BENCH_JSON)


@nox.session(**VENV)
def benchmarks(session: nox.Session) -> None:
    """Layer microbenchmarks (suites/scaling, pytest-benchmark) -> reports/scaling/layer-benchmarks.json.

    posargs go to pytest-benchmark, e.g. against a stored baseline:
        nox -s benchmarks -- --benchmark-compare=reports/baselines/FILE.json --benchmark-compare-fail=median:25%
    (--benchmark-compare takes a JSON file path, or a run number of --benchmark-storage)."""
    install(session)
    _layer_benchmarks(session, list(session.posargs))


@nox.session(**VENV)
def scaling(session: nox.Session) -> None:
    """The layer benchmarks, then the scaling sweep ([tool.tpgate.scaling]), the gate and
    reports/scaling/ + reports/index.html. posargs go to `tpgate scaling`."""
    install(session)
    _layer_benchmarks(session, [])
    session.run("tpgate", "scaling", *session.posargs)
