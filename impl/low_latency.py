"""Which all-reduce algorithm a message of a given size takes on the low-latency communicator.

Decode all-reduces are small ((batch, hidden) activations: 8 KiB for one Llama-3-8B token in
bf16), so their time is almost all fixed latency: NCCL's ring pays a kernel launch plus 2(w-1)
synchronised steps. Over peer-to-peer buffers (symmetric memory, no NVLink multicast):
  one_shot   every rank reads all w inputs and sums them: one step, w x the bytes read per rank;
  two_shot   a reduce-scatter then an all-gather over the same buffers: two steps, bytes as a ring;
  nccl       large messages, where bandwidth dominates and NCCL's ring is as good.
The thresholds are one definition, read by the communicator that runs the algorithm and by the
cost model that prices it (harness/perf_model.py), so a projection prices what would run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .architecture import require
from .communication import ProcessGroupCommunicator

ALGORITHMS = ("one_shot", "two_shot", "nccl")
# Bytes of the reduced tensor (per rank). One-shot reads w x the message per rank, so its edge over
# two-shot ends where that read costs more than a step's latency (~256 KiB on NVLink 4, as in
# vLLM's and TensorRT-LLM's custom all-reduce heuristics); beyond a few MiB the ring wins.
ONE_SHOT_MAX_BYTES = 256 * 1024
TWO_SHOT_MAX_BYTES = 8 * 1024 * 1024


def choose_all_reduce(nbytes: int, world_size: int) -> str:
    """The algorithm the low-latency communicator runs for an all-reduce of `nbytes` per rank
    on `world_size` ranks: one_shot, two_shot or nccl (see the module doc)."""
    require(isinstance(nbytes, int) and nbytes >= 0, "nbytes", nbytes, "must be an integer >= 0")
    require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    if world_size == 1:
        return "nccl"  # nothing to sum: the communicator returns its input, as NCCL's path does
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return "one_shot"
    return "two_shot" if nbytes <= TWO_SHOT_MAX_BYTES else "nccl"


class LowLatencyCommunicator(ProcessGroupCommunicator):
    """A ProcessGroupCommunicator whose all-reduce runs over symmetric memory where
    `choose_all_reduce` picks one_shot or two_shot, and NCCL's all-reduce otherwise.

    One staging buffer of `max_bytes` is allocated in symmetric memory and exchanged with the
    group's peers at construction (a collective: every rank of `group` constructs it together),
    so no call allocates or rendezvouses and a decode step that uses it can be captured in a
    CUDA graph. A call stages the tensor (any shape, float32 or bfloat16) in the buffer and sums
    the ranks' buffers (peer-to-peer loads; never NVLink multicast); it returns the sum, in a new
    tensor (one-shot) or in the input's storage (two-shot), as the Communicator contract allows.
    Under torch.compile one-shot traces (it has a fake-tensor kernel); two-shot does not, so a
    compiled graph takes NCCL for the messages two-shot would carry.

    Where symmetric memory cannot serve this group (not CUDA, a backend other than NCCL, ranks
    sharing a GPU, torch without the ops, a failed rendezvous), construction still succeeds and
    `fallback_reason` says why: every all-reduce is then NCCL's (or gloo's), results unchanged.
    At world size 1 all_reduce returns its input, as ProcessGroupCommunicator's does;
    `symmetric_all_reduce` runs the symmetric path at any world size (the one-GPU check)."""

    DTYPES = (torch.float32, torch.bfloat16)  # the dtypes the symmetric-memory reduction kernels dispatch on

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
                 max_bytes: int = TWO_SHOT_MAX_BYTES):
        super().__init__(group)
        require(isinstance(max_bytes, int) and max_bytes > 0 and max_bytes % 16 == 0, "max_bytes", max_bytes,
                "must be a positive multiple of 16 (the kernels' vector width)")
        self.max_bytes, self.buffer = max_bytes, None
        self.group_name = (group or dist.group.WORLD).group_name
        self.fallback_reason = self._unavailable(torch.device(device) if device is not None else None)
        if self.fallback_reason is None:
            try:
                from torch.distributed import _symmetric_memory as symm_mem

                self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
                symm_mem.rendezvous(self.buffer, self.group_name)
            except Exception as e:  # noqa: BLE001 - any failure to set up means the NCCL path, said in fallback_reason
                self.buffer, self.fallback_reason = None, f"symmetric memory setup failed: {type(e).__name__}: {e}"

    def _unavailable(self, device: torch.device | None) -> str | None:
        if device is None or device.type != "cuda":
            return f"device {device}: symmetric memory needs CUDA"
        backend = str(dist.get_backend(self.group))
        if backend != "nccl":
            return f"backend {backend}: symmetric memory runs beside NCCL (ranks sharing a GPU use gloo)"
        if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out") or not hasattr(torch.ops.symm_mem, "two_shot_all_reduce_"):
            return f"torch {torch.__version__} has no symm_mem one_shot/two_shot all-reduce ops"
        return None

    def algorithm(self, tensor: torch.Tensor) -> str:
        """What all_reduce runs for `tensor`: one_shot, two_shot or nccl."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer is None or tensor.dtype not in self.DTYPES or nbytes > self.max_bytes:
            return "nccl"
        return choose_all_reduce(nbytes, self.world_size)

    def all_reduce(self, tensor):
        if self.world_size == 1:
            return tensor
        algorithm = self.algorithm(tensor)
        if algorithm == "two_shot" and torch.compiler.is_compiling():
            algorithm = "nccl"  # two-shot has no fake-tensor kernel in torch 2.11: NCCL keeps the compiled graph whole
        return super().all_reduce(tensor) if algorithm == "nccl" else self.symmetric_all_reduce(tensor, algorithm)

    def symmetric_all_reduce(self, tensor: torch.Tensor, algorithm: str = "one_shot") -> torch.Tensor:
        """The sum of `tensor` over the group through the symmetric buffer with `algorithm`
        (one_shot: one kernel that stages this rank's input and sums all ranks', into a new
        tensor; two_shot: staged, summed in the buffers, copied back into `tensor`). At world
        size 1 it still runs the kernels (a sum of one)."""
        require(algorithm in ("one_shot", "two_shot"), "algorithm", algorithm, "must be one_shot or two_shot")
        require(self.buffer is not None, "LowLatencyCommunicator", "no symmetric buffer", f"it fell back: {self.fallback_reason}")
        nbytes = tensor.numel() * tensor.element_size()
        require(tensor.dtype in self.DTYPES, "tensor.dtype", tensor.dtype, f"must be one of {self.DTYPES}")
        require(nbytes <= self.max_bytes, "tensor bytes", nbytes, f"must be <= max_bytes={self.max_bytes}")
        staged = self.buffer[:nbytes].view(tensor.dtype).view(tensor.shape)
        if algorithm == "one_shot":  # never in place: peers are still reading this rank's buffer while it sums
            return torch.ops.symm_mem.one_shot_all_reduce_copy(staged, tensor.contiguous(), "sum", self.group_name)
        staged.copy_(tensor)
        torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
        return tensor.copy_(staged)
