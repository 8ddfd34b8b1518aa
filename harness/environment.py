"""What the run ran on, for the report. `collect_environment` never raises: every probe is
guarded and falls back to "unknown" / None, so it is safe on a CPU-only box or outside git.

Returned keys (all JSON-serialisable): timestamp_utc, hostname, python, platform, cpu_count,
torch, backend, device, cuda_available, cuda_version, gpu_count, gpu_name, driver, nccl,
git_commit, git_dirty, source_digest.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _try(fn, default="unknown"):
    try:
        value = fn()
        return default if value is None or value == "" else value
    except Exception:
        return default


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True).stdout.strip()


def _driver() -> str:
    # torch exposes no driver version; nvidia-smi is the portable source where present
    return _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()[0]


def _nccl() -> str:
    import torch
    v = torch.cuda.nccl.version()  # int on old torch, tuple on new; raises without NCCL
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


SOURCE_ROOTS = ("impl", "harness", "suites", "pyproject.toml", "noxfile.py")
SOURCE_SUFFIXES = (".py", ".toml", ".j2", ".sh")


def source_digest(root: Path = REPO_ROOT) -> str:
    """SHA-256 over the paths and bytes of the code a run executes (SOURCE_ROOTS, SOURCE_SUFFIXES).

    Two runs with the same digest ran the same code whatever git says: a copy of a working tree
    (a device machine's) can carry a stale .git, and a dirty tree run twice is still one version."""
    files = []
    for name in SOURCE_ROOTS:
        top = root / name
        candidates = [top] if top.is_file() else (p for p in top.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        files += [p for p in candidates if p.suffix in SOURCE_SUFFIXES]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def collect_environment(backend: str, device: str) -> dict:
    env: dict = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": _try(socket.gethostname),
        "python": sys.version.split()[0],
        "platform": _try(platform.platform),
        "cpu_count": _try(os.cpu_count, None),
        "backend": backend,
        "device": device,
        "git_commit": _try(lambda: _run("git", "rev-parse", "HEAD")),
        "git_dirty": _try(lambda: bool(_run("git", "status", "--porcelain", "--untracked-files=no")), None),
        "source_digest": _try(source_digest),
    }
    try:
        import torch
    except Exception:
        return {**env, "torch": "unavailable", "cuda_available": False}
    cuda = _try(torch.cuda.is_available, False)
    env.update(torch=torch.__version__, cuda_available=cuda, cuda_version=_try(lambda: torch.version.cuda, None),
               gpu_count=_try(torch.cuda.device_count, 0) if cuda else 0)
    if cuda:
        env.update(gpu_name=_try(lambda: torch.cuda.get_device_name(0)), driver=_try(_driver), nccl=_try(_nccl))
    else:
        env.update(gpu_name=None, driver=None, nccl=None)
    return env
