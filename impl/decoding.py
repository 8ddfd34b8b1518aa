"""Fast decode: a static KV cache and one decode step compiled and captured as a CUDA graph.

Eager decode is launch-bound: an 8B model's step is ~1,300 small kernels whose launch costs
more than the weights take to read. `StaticDecoder` makes every shape of the decode step
independent of the position — the position is a device tensor, the KV cache is written with
`index_copy_` and attention runs over the whole cache under a mask — so the step is traced
once by torch.compile (fullgraph: no graph break, hence no hidden host round trip) and, on
CUDA, captured once as a CUDA graph and replayed for every token. The loop never reads a
device value on the host: the next token goes from the sampler's output into the graph's
static input buffer by a device copy.

The step is the model's own `forward`, so at TP > 1 the same step carries its collectives:
under torch.compile the c10d calls in `impl/communication.py` are traced as functional
collectives, and NCCL kernels are captured into the graph like any other kernel
(suites/correctness/test_static_decode.py checks the traced graph at world sizes 2 and 4).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from . import kernels
from .architecture import require
from .model import LlamaModel, sample

GRAPH_FREE_COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs")
OUTPUTS = ("logits", "tokens")
ATTENTION_KERNELS = ("auto", "torch", "triton")


class StaticDecoder:
    """Decode `batch` sequences of up to `max_seq_len` tokens with `model` (any TP degree).

    The decoder (re)allocates the model's KV cache and owns it: a later `allocate_kv_cache` or
    `model.generate` makes this decoder refuse to run rather than replay into freed memory.

    compile: a torch.compile backend name ("inductor", or "eager"/"aot_eager" to check tracing
    without code generation), or None for eager kernels. compile_mode is passed to
    torch.compile (e.g. "max-autotune-no-cudagraphs"; never a cudagraph mode: the graph is
    captured here, explicitly). cuda_graph: capture the step (default: when on CUDA).
    output: what one step returns — "logits" (batch, vocab), for any sampling, or "tokens"
    (batch, 1), the greedy token selected on the vocabulary shards (`LlamaModel.greedy`: no
    logits gathered); a "tokens" decoder generates greedily only.
    attention_kernel: "triton" runs each layer's rotary, cache writes and attention as one fused
    kernel (impl/kernels.py), "torch" as PyTorch ops; "auto": triton on a CUDA device where Triton
    is installed, the model is not float64 and its attention has no feature the kernel lacks
    (ParallelAttention.unfused_features: q/k norms, soft-capping, sliding windows, a custom scale),
    else torch; "triton" with such a feature is a TPConfigError naming it. The model's attention layers keep the choice until changed.
    Timings of the first call (compile) and of the capture are kept in `self.setup_s`.
    """

    def __init__(self, model: LlamaModel, batch: int, max_seq_len: int, compile: str | None = "inductor", compile_mode: str | None = None,
                 cuda_graph: bool | None = None, output: str = "logits", attention_kernel: str = "auto"):
        require(isinstance(batch, int) and batch >= 1, "batch", batch, "must be an integer >= 1")
        require(output in OUTPUTS, "output", output, f"must be one of {OUTPUTS}")
        require(attention_kernel in ATTENTION_KERNELS, "attention_kernel", attention_kernel, f"must be one of {ATTENTION_KERNELS}")
        device = next(model.parameters()).device
        cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
        require(not cuda_graph or device.type == "cuda", "cuda_graph", cuda_graph, f"needs the model on a CUDA device, not {device}")
        # torch.compile's own cudagraph modes would capture a second time, around our capture
        require(compile_mode in GRAPH_FREE_COMPILE_MODES, "compile_mode", compile_mode, f"must be one of {GRAPH_FREE_COMPILE_MODES} (the graph is captured by cuda_graph=True)")
        dtype = next(model.parameters()).dtype
        unfused = sorted({f for layer in model.layers for f in layer.attention.unfused_features()})
        if attention_kernel == "auto":
            attention_kernel = "triton" if device.type == "cuda" and kernels.available(device, dtype) and not unfused else "torch"
        require(attention_kernel == "torch" or not unfused, "attention_kernel", attention_kernel, f"the fused decode kernel does not implement {unfused}: use torch")
        require(attention_kernel == "torch" or kernels.available(device, dtype), "attention_kernel", attention_kernel,
                f"needs Triton, a CUDA device (or TRITON_INTERPRET=1 on the CPU) and a model in one of {kernels.KERNEL_DTYPES}; "
                f"found {dtype} on {device}, Triton {'present' if kernels.triton else 'absent'}")
        for layer in model.layers:
            layer.attention.decode_kernel = attention_kernel
        self.attention_kernel = attention_kernel
        model.allocate_kv_cache(batch, max_seq_len)
        self._cache = model.layers[0].attention.k_cache  # the graph holds its address
        self.model, self.batch, self.max_seq_len, self.device, self.output = model, batch, max_seq_len, device, output
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)  # static input of the step
        self.position = torch.zeros((), dtype=torch.long, device=device)  # tokens already cached
        self.step = self._eager_step if compile is None else torch.compile(self._eager_step, backend=compile, mode=compile_mode, fullgraph=True, dynamic=False)
        self.use_graph, self.graph, self.logits = cuda_graph, None, None
        self.setup_s: dict[str, float] = {}

    @torch.no_grad()
    def _eager_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token (batch, 1) long, position () long -> logits (batch, vocab) or, with output
        "tokens", the greedy next token (batch, 1) long; replicated on every rank."""
        if self.output == "tokens":
            return self.model.greedy(token, position, use_cache=True)[:, None]
        return self.model(token, position, use_cache=True)[:, -1]

    @torch.no_grad()
    def replay(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """Logits (batch, vocab) — or the greedy token (batch, 1) with output "tokens" — of the
        step that feeds `token` (batch, 1) at `position` (tokens already cached); the returned
        tensor is the graph's output buffer, overwritten by the next replay. Both inputs reach the
        graph by device-side copies: no host sync."""
        self.warm_up()
        self.token.copy_(token)
        self.position.fill_(position)
        return self._run_step()

    def _run_step(self) -> torch.Tensor:
        # a later allocate_kv_cache (another decoder, generate) would leave the graph writing freed memory
        require(self.model.layers[0].attention.k_cache is self._cache, "model KV cache", "reallocated",
                "belongs to this decoder while it is used: build one StaticDecoder per model at a time")
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.step(self.token, self.position)

    @torch.no_grad()
    def warm_up(self) -> None:
        """Compile (first call) and capture the graph; both write only cache slot max_seq_len-1,
        which every real decode overwrites before it is attended to. Idempotent."""
        if "compile_s" in self.setup_s:
            return
        self.position.fill_(self.max_seq_len - 1)
        started = time.perf_counter()
        side = torch.cuda.Stream() if self.use_graph else None
        if side is not None:  # warm-up off the default stream, as CUDA graph capture requires
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else nullcontext():
            for _ in range(3):
                self.step(self.token, self.position)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
        self.setup_s["compile_s"] = time.perf_counter() - started
        if self.use_graph:
            started = time.perf_counter()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.token, self.position)
            torch.cuda.synchronize()
            self.setup_s["capture_s"] = time.perf_counter() - started

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """Same contract and same sampling as `LlamaModel.generate` (ids (batch, prompt) ->
        (batch, max_new_tokens)); the prompt is prefilled eagerly, each further token is one
        replay. `on_step(step)` is called after each step is enqueued (for timing; it must not sync)."""
        require(ids.dim() == 2 and ids.shape[0] == self.batch, "ids.shape", tuple(ids.shape), f"must be (batch={self.batch}, prompt)")
        require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "must be >= 1")
        require(self.output == "logits" or temperature == 0, "temperature", temperature, 'must be 0 with output="tokens" (the step returns greedy tokens, not logits)')
        prompt = ids.shape[1]
        # the last token is returned, never fed back: prompt + max_new_tokens - 1 positions are cached
        require(prompt + max_new_tokens - 1 <= self.max_seq_len, "prompt + max_new_tokens - 1", prompt + max_new_tokens - 1, f"must be <= max_seq_len={self.max_seq_len} of the static KV cache")
        self.warm_up()
        generator = torch.Generator(device=ids.device).manual_seed(seed)
        out = torch.empty(self.batch, max_new_tokens, dtype=torch.long, device=ids.device)

        def pick(step_output: torch.Tensor) -> torch.Tensor:  # a step's output -> tokens (batch,)
            return step_output[:, 0] if self.output == "tokens" else sample(step_output.float(), temperature, top_k, top_p, generator)

        prefill = self.model.greedy(ids, 0, use_cache=True)[:, None] if self.output == "tokens" else self.model(ids, 0, use_cache=True, last_only=True)[:, -1]
        for step in range(max_new_tokens):
            out[:, step] = pick(prefill if step == 0 else self.replay(out[:, step - 1, None], prompt + step - 1))
            if on_step is not None:
                on_step(step)
        return out

