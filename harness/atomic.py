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
  make_staging_dir(final_dir): a new empty directory beside `final_dir` whose name carries this
    process's id, so `remove_stale` can tell a dead publisher's leftovers from a live one's.
  remove_stale(final_dir): deletes `.{name}.old-{pid}-*` backups and `.{name}.staging-{pid}-*`
    directories whose process no longer runs. A reader never looks at dot-directories.
"""
from __future__ import annotations

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
