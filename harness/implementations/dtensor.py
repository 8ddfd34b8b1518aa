"""`dtensor`: PyTorch's own tensor parallelism (parallelize_module over a plain model,
impl/dtensor_peer.py), as an implementation of the protocol."""
from __future__ import annotations

import torch

from impl.architecture import ModelConfig, TPConfigError
from impl.dtensor_peer import check_dtensor_tp, load_dtensor_model, parallelize, random_plain_model, tp_mesh

from . import Unsupported


class DTensorPeer:
    name = "dtensor"
    capabilities = frozenset({"greedy", "random"})

    def check(self, config: ModelConfig, tp: int) -> None:
        try:
            check_dtensor_tp(config, tp)
        except TPConfigError as e:
            raise Unsupported(self.name, str(e)) from None

    def load(self, directory: str, ctx, dtype: torch.dtype):
        return load_dtensor_model(directory, ctx, dtype)

    def logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(ids)

    def greedy(self, model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate_greedy(ids, new_tokens)

    def random(self, config: ModelConfig, ctx, dtype: torch.dtype, seed: int = 0):
        model = random_plain_model(config, dtype, ctx.device, seed)
        return parallelize(model, tp_mesh(ctx)) if ctx.comm.world_size > 1 else model


DTENSOR = DTensorPeer()
