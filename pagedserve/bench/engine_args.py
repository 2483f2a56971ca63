"""Engine flags shared by the offline benchmarks, passed through to ``LLM(**kwargs)``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pagedserve.entrypoints.engine_options import add_switches, json_object

# flag dest -> (type, help); a flag left unset keeps EngineConfig's default
_ENGINE_FLAGS: dict[str, tuple[Callable[[str], Any], str]] = {
    "tokenizer": (str, "tokenizer path (default: the model's own)"),
    "dtype": (str, "auto | float32 | bfloat16 | float16"),
    "device": (str, "auto | cpu | cuda[:N]"),
    "max_model_len": (int, "context length (default: the model's)"),
    "block_size": (int, "KV cache block size in tokens"),
    "kv_cache_memory": (float, "GiB for the KV cache"),
    "kv_cache_dtype": (str, "auto (the model's dtype) | float32 | bfloat16 | float16"),
    "max_num_seqs": (int, "most sequences in one step"),
    "max_num_batched_tokens": (int, "token budget of one step"),
    "gpu_memory_utilization": (float, "on a GPU: its share for weights and KV cache"),
    "speculative_config": (
        json_object,
        'speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, ...}',
    ),
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` and the engine options; unset ones keep the engine's defaults."""
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="model path (default: the packaged model)")
    for dest, (kind, help_text) in _ENGINE_FLAGS.items():
        group.add_argument("--" + dest.replace("_", "-"), type=kind, default=None, help=help_text)
    add_switches(group)
    group.add_argument("--seed", type=int, default=0, help="engine and workload seed")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``LLM(...)`` keyword arguments given on the command line."""
    kwargs: dict[str, Any] = {"model": args.model, "seed": args.seed}
    for dest in [*_ENGINE_FLAGS, "enable_prefix_caching", "enforce_eager"]:
        value = getattr(args, dest)
        if value is not None:
            kwargs[dest] = value
    return kwargs
