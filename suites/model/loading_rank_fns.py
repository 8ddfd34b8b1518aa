"""Rank-side functions of suites/model/test_tied_and_loading.py (module level so spawned ranks
can import them), and the deliberately broken variants (MUTANTS) those checks must reject.

Every function takes `mutant`: None runs the real implementation; a name from MUTANTS installs
that bug in this rank process for the duration of the call only (the suites' worlds are
persistent, so the next call sees the real code again).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from types import SimpleNamespace
from unittest import mock

import torch
from torch import nn

import impl.fused_rows
import impl.model
import impl.model_loader as model_loader
import impl.sharding
from impl.model import LlamaModel, random_model
from impl.tensor_parallel import ParallelLMHead

# --------------------------------------------------------------------------- mutants


class _CopiedTie(ParallelLMHead):
    """Ties by copying the embedding's shard once: the same logits, but a second vocab-sized
    shard in memory, and the head's gradient lands on the copy instead of the embedding."""

    def __init__(self, *args, tied_to=None, **kwargs):
        super().__init__(*args, **kwargs)
        if tied_to is not None:
            with torch.no_grad():
                self.weight.copy_(tied_to.weight)


class _DetachedTie(ParallelLMHead):
    """Ties to the embedding's storage through `.data`: no extra memory, the same logits, but
    the head is outside the autograd graph, so the tied gradient misses the head's contribution."""

    def __init__(self, *args, tied_to=None, **kwargs):
        super().__init__(*args, tied_to=tied_to, **kwargs)
        if tied_to is not None:
            del self._parameters["weight"]
            self.weight = tied_to.weight.data


def _whole_tensor_take():
    """`take` reads the whole tensor, then slices it: the same shards, every byte read."""
    real = impl.sharding.take
    return mock.patch.object(impl.sharding, "take", lambda src, dim, start, stop: real(src if isinstance(src, torch.Tensor) else src[:], dim, start, stop))


def _materialised_checkpoint():
    """The loader copies the validated checkpoint into a dict of whole tensors (get_tensor), then
    builds the model from the dict: the same shards, every byte of every tensor read."""
    def from_whole_tensors(source, *args, **kwargs):
        whole = {name: source._handles[source.file_of[name]].get_tensor(name) for name in source}
        return LlamaModel.from_tensors(whole, *args, **kwargs)

    return mock.patch.object(model_loader, "LlamaModel", SimpleNamespace(from_tensors=from_whole_tensors))


@contextlib.contextmanager
def _tie_lost_on_save():
    """save_shards judges the tie from a config that lost tie_word_embeddings, and each tensor
    reaches safetensors as its own copy (what `.cpu()` of a GPU model does; `.clone()` here), so
    safetensors' shared-storage refusal cannot see that embed and lm_head are one tensor."""
    real_save, real_atomic = model_loader.save_shards, model_loader._atomic_save

    def save(model, directory):
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        return real_save(model, directory)

    def atomic(tensors, path, metadata=None):
        return real_atomic({k: v.clone() for k, v in tensors.items()}, path, metadata)

    with mock.patch.object(model_loader, "save_shards", save), mock.patch.object(model_loader, "_atomic_save", atomic):
        yield


def _whole_fused_read():
    """Phi-3's fused-row view reads the whole fused tensor, then its rows: the same shards, every byte of qkv_proj/gate_up_proj read."""
    def read_all(self, index):
        return self.src[:][self.start:self.start + self.rows][index]

    return mock.patch.object(impl.fused_rows.RowRange, "__getitem__", read_all)


MUTANTS = {
    "copied_tie": lambda: mock.patch.object(impl.model, "ParallelLMHead", _CopiedTie),
    "detached_tie": lambda: mock.patch.object(impl.model, "ParallelLMHead", _DetachedTie),
    "whole_tensor_take": _whole_tensor_take,
    "materialised_checkpoint": _materialised_checkpoint,
    "tie_lost_on_save": _tie_lost_on_save,
    "whole_fused_read": _whole_fused_read,
}


def _applied(mutant: str | None):
    return MUTANTS[mutant]() if mutant else contextlib.nullcontext()


# --------------------------------------------------------------------------- storage of a tied model


def storage_report(model: LlamaModel) -> dict:
    """What this rank's model holds, measured on storages (a parameter that is a view into a
    larger tensor counts that tensor's bytes):
      head_is_embedding      lm_head.weight is the embedding's Parameter object;
      head_shares_storage    and lives in the same storage;
      parameter_bytes        bytes of the distinct storages behind all parameters;
      state_dict_bytes       the same over the state dict's parameter entries;
      state_dict_head_shares the state dict's lm_head.weight and embed.weight are one storage."""
    names = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v for k, v in model.state_dict().items() if k in names or k == "lm_head.weight"}
    head, embed = model.lm_head.weight, model.embed.weight

    def storage_bytes(tensors):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())

    in_state = state.get("lm_head.weight")
    return {
        "head_is_embedding": head is embed and "lm_head.weight" in names,
        "head_shares_storage": head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr(),
        "parameter_bytes": storage_bytes(names.values()),
        "state_dict_bytes": storage_bytes(state.values()),
        "state_dict_head_shares": in_state is not None and in_state.untyped_storage().data_ptr() == state["embed.weight"].untyped_storage().data_ptr(),
    }


def load_and_save(ctx, checkpoint_dir: str, out_dir: str, mutant: str | None = None) -> dict:
    """Load a checkpoint through DistributedCheckpointLoader, report its storage, save its shards to out_dir."""
    with _applied(mutant):
        model = model_loader.DistributedCheckpointLoader(checkpoint_dir, ctx.comm).load(torch.float32, ctx.device)
        report = storage_report(model)
        model_loader.save_shards(model, out_dir)
    return report


def built_reports(ctx, config, tensors: dict, shard_dirs: dict, mutant: str | None = None) -> dict:
    """Storage reports of the other construction paths, at this world's tp:
    "from_tensors" (full float32 tensors of `config`), "random_model" (`config`, bfloat16, as the
    sweeps build it) and "shards@{tp}" for each tpgate shard directory in `shard_dirs` ({tp: dir})."""
    out = {}
    with _applied(mutant):
        out["from_tensors"] = storage_report(LlamaModel.from_tensors(tensors, config, ctx.comm, dtype=torch.float32, device=ctx.device))
        out["random_model"] = storage_report(random_model(config, ctx.comm, dtype=torch.bfloat16, device=ctx.device))
        for saved_tp, directory in shard_dirs.items():
            out[f"shards@{saved_tp}"] = storage_report(model_loader.DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32, ctx.device))
    return out


# --------------------------------------------------------------------------- the tied gradient


def tied_gradient(ctx, config, tensors: dict, ids: torch.Tensor, grad_out: torch.Tensor, dtype=torch.float32, absolute: bool = False,
                  mutant: str | None = None) -> torch.Tensor:
    """This rank's gradient of the tied embedding / LM head weight after backward of
    sum(logits * grad_out): (padded_vocab / tp, hidden), the rank's rows of the padded table.
    ids: (batch, seq); grad_out: (batch, seq, vocab). `absolute`: |weights| and |grad_out|
    (the magnitude S of harness/tolerance.py, as harness/cases.py run_single(absolute=True))."""
    with _applied(mutant):
        model = LlamaModel.from_tensors(tensors, config, ctx.comm, dtype=dtype, device=ctx.device)
        if absolute:
            with torch.no_grad():
                for p in model.parameters():
                    p.abs_()
        logits = model(ids.to(ctx.device))
        logits.backward((grad_out.abs() if absolute else grad_out).to(ctx.device, dtype))
    return model.embed.weight.grad.detach().cpu()


# --------------------------------------------------------------------------- bytes read while loading


class _CountingSlice:
    """A safetensors lazy slice that adds the bytes of every tensor it returns to counts[name]."""

    def __init__(self, inner, name: str, counts: Counter):
        self._inner, self._name, self._counts = inner, name, counts

    def __getitem__(self, index):
        part = self._inner[index]
        self._counts[self._name] += part.numel() * part.element_size()
        return part

    def __getattr__(self, attr):  # get_shape, get_dtype: header only
        return getattr(self._inner, attr)


class _CountingHandle:
    """A safetensors file handle whose get_slice / get_tensor reads are counted by tensor name."""

    def __init__(self, inner, counts: Counter):
        self._inner, self._counts = inner, counts

    def get_slice(self, name):
        return _CountingSlice(self._inner.get_slice(name), name, self._counts)

    def get_tensor(self, name):
        tensor = self._inner.get_tensor(name)
        self._counts[name] += tensor.numel() * tensor.element_size()
        return tensor

    def __getattr__(self, attr):  # keys, metadata
        return getattr(self._inner, attr)

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)


@contextlib.contextmanager
def counted_reads():
    """Counter {tensor name: bytes read} of every safetensors file the loader opens meanwhile."""
    counts: Counter = Counter()
    real = model_loader._safe_open
    with mock.patch.object(model_loader, "_safe_open", lambda path: _CountingHandle(real(path), counts)):
        yield counts


def bytes_read(ctx, directories: list[str], mutant: str | None = None) -> dict[str, dict[str, int]]:
    """{directory: {tensor name: bytes this rank read}} while DistributedCheckpointLoader.load
    builds this rank's model from each checkpoint directory in turn."""
    out = {}
    with _applied(mutant), counted_reads() as counts:
        for directory in directories:
            counts.clear()
            model_loader.DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32, ctx.device)
            out[directory] = dict(counts)
    return out
