"""Atomic file and directory publication, so a reader never sees a half-written artefact.

Contracts:
  write_text_atomic / write_bytes_atomic: after return, `path` holds exactly the new content
    (written to a temp file in the same directory, fsynced, then os.replace'd over `path`),
    with the mode of the file it replaced, or 0644 for a new file.
    On any exception `path` is untouched and the temp file is removed.
  publish_dir_atomic: moves a fully written `staging_dir` to `final_dir`, replacing any old
    `final_dir`. The old directory is renamed aside first (rename is atomic per call), so at
    every instant `final_dir` is either the complete old tree, absent for the instant between
    two renames, or the complete new tree; never a mix. Both must be on one filesystem.
    An interrupt (KeyboardInterrupt included) between the renames puts the old tree back.
    It first removes what killed publishers left beside `final_dir` (`remove_stale`), so an
    interrupted run never leaves a later one with stray directories.
  publish_report(out_dir, files): writes {name: content} into a staging directory (make_staging_dir)
    and publishes it as `out_dir` (publish_dir_atomic); the one way a report directory is written.
  make_staging_dir(final_dir): a new empty directory beside `final_dir` whose name carries this
    process's id, so `remove_stale` can tell a dead publisher's leftovers from a live one's.
  remove_stale(final_dir): deletes `.{name}.old-{pid}-*` backups and `.{name}.staging-{pid}-*`
    directories whose process no longer runs. A reader never looks at dot-directories.
  report_kind(directory): "correctness" / "scaling" when `directory` holds a tpgate report of that
    kind (its results.json's "kind", or for reports written before that field, the keys only that
    kind's results.json has), else None.
  check_report_out(out_dir, kind, repo_root): raises TPConfigError unless publishing a `kind`
    report at `out_dir` (which replaces the whole directory) can only replace an earlier report
    of that kind: `out_dir` must not be reports/baselines or one of its parents (the repo root
    included), must not be an existing non-empty directory inside reports/baselines, and, where
    it exists and is not empty, must hold a `kind` report. Reads only; call it before any work.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    # same directory: os.replace is only atomic within one filesystem
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            # NamedTemporaryFile is 0600; keep the replaced file's mode, else a normal 0644
            os.fchmod(tmp.fileno(), path.stat().st_mode & 0o7777 if path.exists() else 0o644)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        try:
            os.unlink(tmp.name)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    write_bytes_atomic(path, text.encode(encoding))


def _fsync_dir(path: Path) -> None:
    # make the renames themselves durable; not supported everywhere (e.g. Windows), so best effort
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def make_staging_dir(final_dir: str | Path) -> Path:
    final = Path(final_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-{os.getpid()}-"))


def remove_stale(final_dir: str | Path) -> list[Path]:
    final = Path(final_dir)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(old|staging)-(\d+)-")
    removed = []
    for p in final.parent.iterdir():
        m = pattern.match(p.name)
        if m and p.is_dir() and not _running(int(m[2])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def publish_dir_atomic(staging_dir: str | Path, final_dir: str | Path) -> None:
    staging, final = Path(staging_dir), Path(final_dir)
    remove_stale(final)
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}-{os.urandom(4).hex()}")
        os.rename(final, backup)
    try:
        os.rename(staging, final)
    except BaseException:
        if backup is not None:  # put the old report back rather than leave nothing
            os.rename(backup, final)
        raise
    _fsync_dir(final.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def publish_report(out_dir: str | Path, files: dict[str, str | bytes]) -> None:
    """Replace `out_dir` as a whole by a directory holding exactly `files` ({name: text (UTF-8)
    or bytes}): each written atomically into a staging directory beside `out_dir`, which is then
    published with publish_dir_atomic. On any exception the staging directory is removed and
    `out_dir` is as it was."""
    out_dir = Path(out_dir)
    # staging next to out_dir: the final rename must stay on one filesystem
    staging = make_staging_dir(out_dir)  # pid-stamped: a dead publisher's leftovers are removed later
    try:
        for name, content in files.items():
            (write_bytes_atomic if isinstance(content, bytes) else write_text_atomic)(staging / name, content)
        staging.chmod(0o755)  # mkdtemp makes it 0700; a published report should be readable like any directory
        publish_dir_atomic(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


REPORT_FILE = "results.json"
# keys only one kind's results.json holds: recognises reports written before results.json had "kind"
_KIND_KEYS = {"correctness": {"verdict", "summary", "tests", "metrics"}, "scaling": {"gate", "rows"}}


# files a tpgate step writes into a report directory before the report exists: `nox -s benchmarks`
# stores reports/scaling/layer-benchmarks.json, which the next scaling report carries
BY_PRODUCTS = {"scaling": ("layer-benchmarks.json",)}


def report_kind(directory: str | Path) -> str | None:
    try:
        data = json.loads((Path(directory) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("kind"), str):
        return data["kind"]
    return next((kind for kind, keys in _KIND_KEYS.items() if keys <= data.keys()), None)


def check_report_out(out_dir: str | Path, kind: str, repo_root: str | Path, argument: str = "--out") -> Path:
    """The resolved `out_dir`, after the checks in the module docstring (TPConfigError naming `argument`)."""
    from impl.architecture import require  # lazy: this module must stay importable without torch (noxfile)

    out, baselines = Path(out_dir).resolve(), Path(repo_root).resolve() / "reports" / "baselines"
    replaces = "the report replaces the whole directory"
    require(out != baselines and out not in baselines.parents, argument, str(out_dir),
            f"must not be {baselines} or a directory above it (the repository root included): {replaces}, "
            "and the committed baselines would be deleted")
    require(out.is_dir() or not out.exists(), argument, str(out_dir), "exists and is not a directory")
    occupied = out.is_dir() and any(p.name not in BY_PRODUCTS.get(kind, ()) for p in out.iterdir())
    require(not (occupied and baselines in out.parents), argument, str(out_dir),
            f"is inside {baselines}, which holds committed baselines: copy a new report there, never write over one")
    found = report_kind(out) if occupied else kind
    require(found == kind, argument, str(out_dir),
            f"exists and holds {'a tpgate ' + found + ' report' if found else 'no tpgate report'}, not a {kind} report: "
            f"{replaces}, so give a new or empty directory, or an earlier {kind} report's")
    return out
