"""Rank-side functions of the BYO test (module level so spawned ranks can import them)."""
from __future__ import annotations

import sys

STACK_MODULES = ("tinystack_tpgate", "tinystack")


def forget(directory: str) -> None:
    """`directory` off sys.path and the stack's modules out of sys.modules (a no-op for either that is
    not there): the next copy imported in this process is that copy, not the one before."""
    while directory in sys.path:
        sys.path.remove(directory)
    for name in STACK_MODULES:
        sys.modules.pop(name, None)


def importable(ctx, directory: str, on: bool) -> None:
    """On this rank: `directory` first on sys.path (on) or gone (off), the stack's modules forgotten either way."""
    forget(directory)
    if on:
        sys.path.insert(0, directory)
