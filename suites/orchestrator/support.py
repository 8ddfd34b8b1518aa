"""Checks on the driver -> rank request channel that several test modules share."""
from __future__ import annotations

import os

from harness.runtime.channel import RequestChannel


def channel_segments(channel: RequestChannel) -> list[str]:
    """Every shared-memory segment this channel has used: the current one and those it moved away from."""
    return [channel.name, *channel.retired]


def leaked_segments(names: list[str]) -> list[str]:
    """The segments among `names` that still exist (POSIX shared memory lives in /dev/shm on Linux)."""
    return [n for n in names if os.path.exists(os.path.join("/dev/shm", n))]
