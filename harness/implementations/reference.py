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
        with torch.no_grad():
            model.allocate_kv_cache(ids.shape[0], ids.shape[1] + new_tokens - 1)
            step = model(ids, 0, use_cache=True, last_only=True)[:, -1]
            tokens = []
            for i in range(new_tokens):
                tokens.append(step.argmax(-1))
                if i + 1 < new_tokens:
                    step = model(tokens[-1][:, None], ids.shape[1] + i, use_cache=True)[:, -1]
        return torch.stack(tokens, 1)

    def random(self, config: ModelConfig, ctx, dtype: torch.dtype, seed: int = 0):
        return random_model(config, ctx.comm, dtype, ctx.device, seed)


REFERENCE = Reference()
