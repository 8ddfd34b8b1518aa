"""`tpgate verify` wall time on a ~100M-parameter checkpoint of each model family.

    python3 -m harness.sweeps.verify_wall_time [--families llama,qwen3,...] [--tp 1,2,4]
        [--extra-args "--diagnose"] [--work DIR] [--out results.json]

For each family a random checkpoint of about 100M parameters is written once with transformers'
own `save_pretrained` into --work (reused when present), then `tpgate verify DIR --tp ...` runs
as a user runs it (one subprocess: interpreter start, worlds, references and every TP degree),
once as is and, with --extra-args, once more with those arguments; the wall time of each is
printed and written to --out. The configs are shaped like the families' small production
models (GQA, the family's own features on), scaled down to ~100M parameters.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

COMMON = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4, vocab_size=32003,
              max_position_embeddings=512)
FAMILIES = {  # name: (transformers config class, kwargs)
    "llama": ("LlamaConfig", dict(COMMON, num_hidden_layers=8)),
    "qwen3": ("Qwen3Config", dict(COMMON, num_hidden_layers=8, head_dim=128)),
    "gemma2": ("Gemma2Config", dict(COMMON, num_hidden_layers=12, head_dim=64, sliding_window=8, query_pre_attn_scalar=64)),
    "gemma3": ("Gemma3TextConfig", dict(COMMON, num_hidden_layers=12, head_dim=64, sliding_window=8, query_pre_attn_scalar=64)),
    "phi3": ("Phi3Config", dict(COMMON, num_hidden_layers=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mixtral": ("MixtralConfig", dict(COMMON, num_hidden_layers=6, intermediate_size=1024, num_local_experts=4, num_experts_per_tok=2)),
}


def write_family(name: str, directory: Path) -> int:
    """The family's ~100M-parameter random checkpoint in `directory` (written if absent); its parameter count."""
    import transformers

    config_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if not (directory / "config.json").is_file():
        model.save_pretrained(directory, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def timed_verify(directory: Path, tps: str, extra: list[str]) -> tuple[float, int]:
    """(wall seconds, exit status) of one `tpgate verify` subprocess."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness.cli", "verify", str(directory), "--tp", tps, *extra],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.perf_counter() - start, done.returncode


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--tp", default="1,2,4")
    p.add_argument("--extra-args", default="", help="arguments for the second, compared run (e.g. --diagnose)")
    p.add_argument("--work", default="/tmp/tpgate-verify-wall-time")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    names = args.families.split(",")
    for name in names:
        if name not in FAMILIES:
            p.error(f"--families: {name!r} is not one of {', '.join(FAMILIES)}")
    rows = []
    for name in names:
        directory = Path(args.work) / name
        params = write_family(name, directory)
        row = {"family": name, "parameters": params, "tp": args.tp}
        row["seconds"], row["rc"] = timed_verify(directory, args.tp, [])
        if args.extra_args:
            row["seconds_with_extra"], row["rc_with_extra"] = timed_verify(directory, args.tp, shlex.split(args.extra_args))
            row["extra_args"] = args.extra_args
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
