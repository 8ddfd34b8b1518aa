"""Functions run on ranks by the request-channel tests (module level, so spawn can import them)."""
from __future__ import annotations

import hashlib
import time


def digest(ctx, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sums(ctx, tensors) -> list[float]:
    return [float(t.sum()) for t in tensors]


def sleep_echo(ctx, value, seconds: float, started: str):
    """Tell the test (by creating `started`, on rank 0) that the call is under way, then sleep."""
    if ctx.rank == 0:
        open(started, "w").close()
    time.sleep(seconds)
    return value
