"""`reference`: tpgate's own TP stack (impl/), as an implementation of the protocol."""
from __future__ import annotations

import torch

from impl.architecture import ModelConfig
from impl.model import random_model
from impl.model_loader import DistributedCheckpointLoader


class Reference:
    name = "reference"
    capabilities = frozenset({"greedy", "random"})

    def check(self, config: ModelConfig, tp: int) -> None:
        config.check_tp(tp)  # TPConfigError: the reference's limits are tpgate's own input contract

    def load(self, directory: str, ctx, dtype: torch.dtype):
        return DistributedCheckpointLoader(directory, ctx.comm).load(dtype, ctx.device)

    def logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids)

    def greedy(self, model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return model.generate(ids, new_tokens)  # temperature 0: selected on the vocabulary shards, with the KV cache

    def random(self, config: ModelConfig, ctx, dtype: torch.dtype, seed: int = 0):
        return random_model(config, ctx.comm, dtype, ctx.device, seed)


REFERENCE = Reference()
