"""The implementation protocol: what a tensor-parallel stack provides to be judged by tpgate.

An implementation is any object with the attributes and methods of `TPImplementation`. It is
named on the command line (`tpgate verify --impl NAME`, `tpgate correctness --impl NAME`,
`tpgate scaling --implementations NAME,...`) in one of three ways:

  a built-in name     `reference` (tpgate's impl/), `dtensor` (PyTorch's parallelize_module),
                      `hf-tp` (Hugging Face transformers' own tensor parallelism);
  an entry point      `[project.entry-points."tpgate.implementations"] mystack = "pkg.mod:OBJ"`
                      in the stack's own pyproject.toml: `--impl mystack` once it is installed;
  module:object       `--impl pkg.mod:OBJ`, for a module importable as it stands (PYTHONPATH).

The spec string, not the object, travels to the ranks: each rank resolves it again
(`load_implementation`), so an implementation need not pickle. A rank function calls

    impl.load(directory, ctx, dtype)  -> this rank's model (any object the stack likes)
    impl.logits(model, ids)           -> (batch, seq, vocab) logits, the same on every rank

where `ctx` is harness.runtime.orchestrator.RankContext: `ctx.device`, `ctx.comm.rank` /
`ctx.comm.world_size` (rank and size inside this TP group), `ctx.tp_group` (the
torch.distributed ProcessGroup of the TP group; the global world may be larger) and
`ctx.comm` (tpgate's Communicator over that group, for stacks written against it).

Optional methods, each announced by its name in `capabilities`:

  "greedy"      greedy(model, ids, new_tokens) -> (batch, new_tokens) int64 tokens, decoded
                with the stack's own KV cache (verify's generation check, the decode sweep);
  "random"      random(config, ctx, dtype, seed) -> model with random weights for a
                harness.sweep preset (ModelConfig), so sweeps need no checkpoint on disk;
  "collectives" collectives(config, tp, batch, seq, phase) -> [{"op", "bytes"}, ...] one
                forward issues per rank (prices projected sweep points).

`check(config, tp)` runs in the driver before any process starts: it raises `Unsupported`
with the reason when the stack cannot run this config at this TP degree (that is a finding
about the stack, reported as its failure, never a harness error).

At tp > 1 the harness also asks for evidence that the stack shards at all (`sharding_evidence`,
ADR-27 in DISTRIBUTED_ARCHITECTURE.md): a rank whose model is an nn.Module holding as many
parameters as the whole model is refused, however right its logits.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

import torch

from impl.architecture import ModelConfig, TPConfigError

ENTRY_POINT_GROUP = "tpgate.implementations"
BUILTIN = {
    "reference": "harness.implementations.reference:REFERENCE",
    "dtensor": "harness.implementations.dtensor:DTENSOR",
    "hf-tp": "harness.implementations.hf_tp:HF_TP",
}
CAPABILITIES = ("greedy", "random", "collectives")
REQUIRED = ("name", "capabilities", "check", "load", "logits")


class Unsupported(Exception):
    """This implementation cannot run this model at this TP degree: a finding about the stack.

    `implementation` names it; `reason` says why in the stack's own terms."""

    def __init__(self, implementation: str, reason: str):
        super().__init__(f"{implementation}: {reason}")
        self.implementation, self.reason = implementation, reason

    def __reduce__(self):  # crosses the rank pipe
        return type(self), (self.implementation, self.reason)


class ImplementationError(Exception):
    """An implementation broke its contract (raised while building, logits of the wrong shape or
    dtype, a missing method): names the implementation and the cause."""

    def __init__(self, implementation: str, cause: str):
        super().__init__(f"implementation {implementation!r}: {cause}")
        self.implementation, self.cause = implementation, cause

    def __reduce__(self):
        return type(self), (self.implementation, self.cause)


@runtime_checkable
class TPImplementation(Protocol):
    """The protocol (see the module docstring for the contract of each method)."""

    name: str
    capabilities: frozenset[str]

    def check(self, config: ModelConfig, tp: int) -> None: ...

    def load(self, directory: str, ctx: Any, dtype: torch.dtype) -> Any: ...

    def logits(self, model: Any, ids: torch.Tensor) -> torch.Tensor: ...


def entry_points() -> dict[str, str]:
    """Installed implementations: {name: "module:object"} of the `tpgate.implementations` group."""
    return {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known() -> dict[str, str]:
    """Every implementation that can be named: built-ins, then installed entry points."""
    return {**BUILTIN, **entry_points()}


def load_implementation(spec: str, argument: str = "--impl") -> TPImplementation:
    """The implementation `spec` names (a built-in or entry-point name, or `module:object`).

    TPConfigError naming `argument`, `spec` and the names known when it names nothing
    importable; ImplementationError when the object lacks part of the protocol."""
    if not isinstance(spec, str) or not spec:
        raise TPConfigError(argument, spec, f"must name an implementation: one of {sorted(known())}, or module:object")
    target = known().get(spec, spec)
    if ":" not in target:
        raise TPConfigError(argument, spec, f"is not a known implementation (built-in or entry point in {ENTRY_POINT_GROUP!r}: "
                                            f"{sorted(known())}) nor module:object")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TPConfigError(argument, spec, f"module {module_name!r} cannot be imported ({e}); known names: {sorted(known())}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise TPConfigError(argument, spec, f"module {module_name!r} has no attribute {attr!r}") from None
    missing = [a for a in REQUIRED if not hasattr(obj, a)]
    if missing:
        raise ImplementationError(spec, f"{target} lacks {missing} of the protocol (harness.implementations.TPImplementation)")
    unknown = set(obj.capabilities) - set(CAPABILITIES)
    if unknown:
        raise ImplementationError(spec, f"declares unknown capabilities {sorted(unknown)}; known: {list(CAPABILITIES)}")
    absent = [c for c in obj.capabilities if not callable(getattr(obj, c, None))]
    if absent:
        raise ImplementationError(spec, f"declares {absent} but has no such method")
    return obj


def load_implementations(specs, argument: str) -> dict[str, TPImplementation]:
    """{spec: implementation} for each of `specs`, in order, every name checked before any runs."""
    names = list(specs)
    if not names:
        raise TPConfigError(argument, names, f"must name at least one implementation: {sorted(known())}")
    if len(set(names)) != len(names):
        raise TPConfigError(argument, names, "must not repeat an implementation")
    return {spec: load_implementation(spec, argument) for spec in names}


def checked_logits(implementation: str, logits: Any, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`logits` if it is a floating tensor of shape (batch, seq, vocab) for `ids` (batch, seq);
    else ImplementationError naming the implementation, what it returned and what was expected."""
    expected = (*ids.shape, vocab_size)
    if not isinstance(logits, torch.Tensor):
        raise ImplementationError(implementation, f"logits() returned {type(logits).__name__}, expected a tensor of shape {expected}")
    if tuple(logits.shape) != expected:
        raise ImplementationError(implementation, f"logits() returned shape {tuple(logits.shape)}, expected (batch, seq, vocab) = {expected}")
    if not logits.dtype.is_floating_point:
        raise ImplementationError(implementation, f"logits() returned dtype {logits.dtype}, expected a floating dtype")
    return logits


def checked_tokens(implementation: str, tokens: Any, ids: torch.Tensor, new_tokens: int, vocab_size: int) -> torch.Tensor:
    """`tokens` if it is an integer tensor (batch, new_tokens) of ids in the vocabulary; else ImplementationError."""
    expected = (ids.shape[0], new_tokens)
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != expected or tokens.dtype.is_floating_point:
        got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ImplementationError(implementation, f"greedy() returned {got}, expected integer tokens of shape (batch, new_tokens) = {expected}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ImplementationError(implementation, f"greedy() returned token ids outside [0, {vocab_size})")
    return tokens


def local_parameter_count(model: Any) -> int | None:
    """The parameter elements this rank holds: for an nn.Module, the sum over its (deduplicated:
    a tied weight counts once) parameters of `p.to_local().numel()` for a DTensor (this rank's
    shard) and `p.numel()` otherwise; None (unknown) for any other object."""
    if not isinstance(model, torch.nn.Module):
        return None
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())


def sharding_evidence(implementation: str, model: Any, full_parameter_count: int, tp: int) -> int | None:
    """This rank's parameter count (local_parameter_count), after checking that at tp > 1 it is
    strictly below `full_parameter_count`, the parameter elements of the whole model (every tensor
    of the checkpoint, a tied weight once).

    Why strictly below: a rank that shards even one matrix tp ways holds only its 1/tp share of
    it, and every other tensor at most whole, so its count is below the full count; a stack can
    reach the full count only by holding every tensor whole (it computes the model on one rank
    and shards nothing, or holds extra copies that outweigh what it shards): either way it is not
    tensor-parallel, however right its logits, and verify would otherwise pass it at every tp.
    Necessary, not sufficient: a stack sharding a single matrix passes this check.

    ImplementationError naming the implementation, the counts and tp when the rank holds
    >= the full count at tp > 1. A model that is not an nn.Module cannot be counted: None, never
    a refusal (the stack is judged on its logits alone)."""
    local = local_parameter_count(model)
    if local is not None and tp > 1 and local >= full_parameter_count:
        raise ImplementationError(implementation, f"holds {local} parameters on this rank at tp={tp}, >= the full model's "
                                                  f"{full_parameter_count}: it does not shard (a sharded rank holds strictly fewer)")
    return local


def build_on_rank(spec: str, directory: str, ctx, dtype: torch.dtype):
    """(implementation, this rank's model) for `spec`; whatever `load` raises becomes an
    ImplementationError naming the implementation and the cause (Unsupported passes as it is)."""
    impl = load_implementation(spec)
    try:
        return impl, impl.load(directory, ctx, dtype)
    except (Unsupported, ImplementationError):
        raise
    except Exception as e:
        raise ImplementationError(spec, f"load() raised {type(e).__name__}: {e}") from e


__all__ = ["BUILTIN", "CAPABILITIES", "ENTRY_POINT_GROUP", "ImplementationError", "TPImplementation", "Unsupported", "build_on_rank",
           "checked_logits", "checked_tokens", "entry_points", "known", "load_implementation", "load_implementations", "local_parameter_count",
           "sharding_evidence"]
