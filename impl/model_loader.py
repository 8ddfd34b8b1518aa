"""Checkpoints: Hugging Face safetensors in, tpgate per-rank shards out and back in.

A rank reads only its slices: `HFCheckpoint` maps tensor names to safetensors lazy slices,
and the layers' `from_full` slices them, so the full tensor is never materialised on a
rank that needs a shard (replicated tensors such as norms excepted).

`save_shards` writes one safetensors file per rank plus `tpgate-shards.json` (TP degree,
config, and each tensor's ShardSpec as its parameter declares it, impl/sharding.py).
`ShardCheckpoint` reads such a directory back at any TP degree: it rebuilds each full tensor
from every rank's file with `unshard` and the stored spec (one tensor at a time) and hands it
to the same `from_tensors` path.

Every problem is a CheckpointError naming the tensor and the file, raised before any
weight is copied: missing or unexpected keys, shape or dtype mismatch, unreadable files,
pickle checkpoints (never unpickled here).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from .architecture import Communicator, ModelConfig, TPConfigError
from .model import LlamaModel, checkpoint_shapes
from .sharding import ShardSpec, spec_of, unshard

FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SHARD_METADATA = "tpgate-shards.json"
SHARD_FORMAT = "tpgate-shards/2"  # /2: each tensor's layout is its ShardSpec (impl/sharding.py)
CONVERT_HINT = (
    "tpgate never unpickles checkpoints. Convert it once, in an environment you trust, with: "
    "python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('OUT', safe_serialization=True)\""
)


class CheckpointError(ValueError):
    """A checkpoint tpgate cannot load; the message names the tensor and/or file."""


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError and OSError: header corrupt, file truncated, unreadable
        size = path.stat().st_size if path.is_file() else None
        raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes; {type(e).__name__}: {e}); "
                              "a safetensors file is an 8-byte header length, a JSON header and the tensor data it describes: "
                              "re-download or re-save it") from None


def read_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint directory holds config.json beside the weights)")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{path}: malformed config ({type(e).__name__}: {e})") from None


class HFCheckpoint(Mapping):
    """name -> safetensors lazy slice, over `model.safetensors` or an index of shard files."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        index, single = self.directory / "model.safetensors.index.json", self.directory / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: malformed index ({type(e).__name__}: {e})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.directory / file).is_file():
                    names = sorted(n for n, f in weight_map.items() if f == file)
                    raise CheckpointError(f"{self.directory / file}: shard file named in {index.name} is missing (holds {names[0]} and {len(names) - 1} more)")
            self.file_of = {name: self.directory / file for name, file in weight_map.items()}
        elif single.is_file():
            self.file_of = None
            handle = _safe_open(single)
            self.file_of = {name: single for name in handle.keys()}
        else:
            pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(f"{self.directory}: only pickle checkpoints found ({', '.join(pickles)}); {CONVERT_HINT}")
            raise CheckpointError(f"{self.directory}: no model.safetensors or model.safetensors.index.json")
        self._handles = {}
        for file in sorted(set(self.file_of.values())):
            handle = self._handles[file] = _safe_open(file)
            in_file = set(handle.keys())
            for name, f in self.file_of.items():
                if f == file and name not in in_file:
                    raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")

    def __getitem__(self, name):
        if name not in self.file_of:
            raise KeyError(name)
        return self._handles[self.file_of[name]].get_slice(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self):
        return len(self.file_of)

    def validate(self, config: ModelConfig) -> None:
        """Keys, shapes and dtypes against the config, reading headers only."""
        expected = checkpoint_shapes(config)
        present = {n for n in self.file_of if not n.endswith(IGNORED_SUFFIXES)}
        if config.tie_word_embeddings:
            present.discard("lm_head.weight")  # some exporters store the tied copy too
        missing = sorted(set(expected) - present)
        if missing:
            where = self.file_of and sorted(set(map(str, self.file_of.values())))
            raise CheckpointError(f"tensor {missing[0]} missing from {where} ({len(missing)} missing in all; required by {self.directory / 'config.json'})")
        unexpected = sorted(present - set(expected))
        if unexpected:
            raise CheckpointError(f"{self.file_of[unexpected[0]]}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all) for a {config.extra.get('model_type')} config")
        for name, shape in expected.items():
            part = self[name]
            if tuple(part.get_shape()) != tuple(shape):
                raise CheckpointError(f"{self.file_of[name]}: tensor {name} has shape {tuple(part.get_shape())}, the config implies {tuple(shape)}")
            if part.get_dtype() not in FLOAT_DTYPES:
                raise CheckpointError(f"{self.file_of[name]}: tensor {name} has dtype {part.get_dtype()}, expected one of {sorted(FLOAT_DTYPES)}")


class DistributedCheckpointLoader:
    """Load rank comm.rank's shards of a checkpoint directory (Hugging Face or tpgate shards)."""

    def __init__(self, directory: str | Path, comm: Communicator):
        self.directory, self.comm = Path(directory), comm

    def load(self, dtype=torch.float32, device="cpu", sequence_parallel=False) -> LlamaModel:
        shards = (self.directory / SHARD_METADATA).is_file()
        source = ShardCheckpoint(self.directory) if shards else None
        config = source.config if shards else read_config(self.directory)
        try:  # the cheapest check first: no tensor header is read for a config that cannot shard
            config.check_tp(self.comm.world_size)
        except TPConfigError as e:
            raise CheckpointError(f"{self.directory / ('tpgate-shards.json' if shards else 'config.json')}: cannot shard {self.comm.world_size} ways: {e}") from None
        if not shards:
            source = HFCheckpoint(self.directory)
            source.validate(config)
        with torch.device("cpu"):
            model = LlamaModel.from_tensors(source, config, self.comm, dtype=dtype, device=device, sequence_parallel=sequence_parallel)
        return model


# --------------------------------------------------------------------------- tpgate shards


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shard_file(rank: int, tp: int) -> str:
    return f"rank{rank:03d}-of-{tp:03d}.safetensors"


def save_shards(model: LlamaModel, directory: str | Path) -> Path:
    """Every rank writes its own file; rank 0 also writes the metadata, last, so a
    directory with metadata is complete. Call on every rank (it ends in a barrier)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    comm, tp = model.comm, model.comm.world_size
    params = dict(model.named_parameters(remove_duplicate=False))
    state = {k: v for k, v in model.state_dict().items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    _atomic_save(state, directory / shard_file(comm.rank, tp))
    comm.barrier()
    if comm.rank == 0:
        meta = {"format": SHARD_FORMAT, "tp": tp, "config": asdict(model.config), "files": [shard_file(r, tp) for r in range(tp)],
                "layout": {k: spec_of(params[k]).to_json() if k in params else None for k in state}}
        path = directory / SHARD_METADATA
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)
    comm.barrier()
    return directory


class ShardCheckpoint(Mapping):
    """A tpgate shard directory seen as full tensors in Hugging Face naming (any target TP)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / SHARD_METADATA
        try:
            self.meta = json.loads(meta_path.read_text())
            config = dict(self.meta["config"])
            self.tp = int(self.meta["tp"])
        except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: malformed shard metadata ({type(e).__name__}: {e})") from None
        self.config = ModelConfig(**config)
        for file in self.meta["files"]:
            if not (self.directory / file).is_file():
                raise CheckpointError(f"{self.directory / file}: rank shard named in {SHARD_METADATA} is missing")
        self._handles = [_safe_open(self.directory / f) for f in self.meta["files"]]
        self._names = list(checkpoint_shapes(self.config))
        expected = {k for k, v in self.meta.get("layout", {}).items()}
        for handle, file in zip(self._handles, self.meta["files"]):  # before any weight is copied
            missing = sorted(expected - set(handle.keys()))
            if missing:
                raise CheckpointError(f"{self.directory / file}: tensor {missing[0]} missing ({len(missing)} in all)")
        self._fused: tuple[str, list] | None = None  # last rebuilt fused tensor: q, k, v (or gate, up) are asked for in turn
        if self.meta.get("format") != SHARD_FORMAT:
            raise CheckpointError(f"{meta_path}: format {self.meta.get('format')!r}, expected {SHARD_FORMAT!r} (save the shards again with this tpgate)")
        try:
            self._specs = {k: ShardSpec.from_json(v) if v is not None else ShardSpec(None) for k, v in self.meta["layout"].items()}
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path}: malformed layout ({type(e).__name__}: {e})") from None

    def _full(self, local_name: str) -> list[torch.Tensor]:
        """The full tensors (one per segment) of a local tensor, rebuilt from every rank's file as
        its stored spec says; the last one is kept (q, k, v, or gate, up, are asked for in turn)."""
        if self._fused is None or self._fused[0] != local_name:
            self._fused = (local_name, unshard(self._locals(local_name), self._specs[local_name]))
        return self._fused[1]

    def _locals(self, local_name: str) -> list[torch.Tensor]:
        """Rank r's tensor `local_name`, for every rank of the saved TP degree."""
        out = []
        for handle, file in zip(self._handles, self.meta["files"]):
            if local_name not in handle.keys():
                raise CheckpointError(f"{self.directory / file}: tensor {local_name} missing")
            out.append(handle.get_tensor(local_name))
        return out

    def __getitem__(self, name: str) -> torch.Tensor:
        local, segment = self._local_of(name)
        full = self._full(local)
        return torch.cat(full) if segment is None else full[segment]  # None: a fused tensor, all segments end to end

    @staticmethod
    def _local_of(name: str) -> tuple[str, int | None]:
        """(tpgate's local tensor name, segment index; None: every segment) of a Hugging Face tensor name."""
        top = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "lm_head.weight", "model.norm.weight": "norm.weight"}
        if name in top:
            return top[name], 0
        if not name.startswith("model.layers."):
            raise KeyError(name)
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        fused = {"self_attn.q_proj": ("attention.qkv", 0), "self_attn.k_proj": ("attention.qkv", 1), "self_attn.v_proj": ("attention.qkv", 2),
                 "mlp.gate_proj": ("mlp.gate_up", 0), "mlp.up_proj": ("mlp.gate_up", 1), "self_attn.o_proj": ("attention.o_proj", 0),
                 "mlp.down_proj": ("mlp.down", 0), "input_layernorm": ("input_norm", 0), "post_attention_layernorm": ("post_attention_norm", 0),
                 "self_attn.q_norm": ("attention.q_norm", 0), "self_attn.k_norm": ("attention.k_norm", 0),
                 "pre_feedforward_layernorm": ("pre_feedforward_norm", 0), "post_feedforward_layernorm": ("post_feedforward_norm", 0)}
        # Phi-3's fused tensors are their local tensor whole; Mixtral's router and experts (impl/moe.py)
        fused.update({"self_attn.qkv_proj": ("attention.qkv", None), "mlp.gate_up_proj": ("mlp.gate_up", None),
                      "block_sparse_moe.gate": ("mlp.router", 0)})
        expert = re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])", module)
        if expert:
            e, w = expert.groups()
            fused[module] = {"w1": (f"mlp.experts.{e}.gate_up", 0), "w3": (f"mlp.experts.{e}.gate_up", 1), "w2": (f"mlp.experts.{e}.down", 0)}[w]
        if module not in fused:
            raise KeyError(name)
        local, segment = fused[module]
        return f"layers.{layer}.{local}.{leaf}", segment

    def __iter__(self):
        return iter(self._names)

    def __len__(self):
        return len(self._names)
