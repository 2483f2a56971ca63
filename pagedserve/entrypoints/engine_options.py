"""The engine options of ``serve``, ``chat`` and ``generate``: flags, the EngineConfig they make,
and loading the engine with a one-line log of what was loaded."""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

logger = logging.getLogger("pagedserve")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="a Hugging Face model directory, a .gguf file, or a Hub id in the local cache "
        "(default: the packaged SmolLM2-135M-Instruct)",
    )
    g = parser.add_argument_group("engine")
    # vLLM's spelling; its own dest, as a positional with nargs="?" would overwrite a shared one.
    # Without it, argparse read --model as an abbreviation of --model-impl.
    g.add_argument(
        "--model", dest="model_option", metavar="MODEL", help="the model, as vLLM names it"
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    g.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    g.add_argument(
        "--device",
        default=None,
        help="auto | cpu | cuda[:N] (default auto: the GPU when PyTorch sees one)",
    )
    g.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    g.add_argument("--block-size", type=int, default=None, help="KV cache block size in tokens")
    g.add_argument("--kv-cache-memory", type=float, default=None, help="GiB for the KV cache pools")
    g.add_argument(
        "--kv-cache-dtype",
        default=None,
        help="auto (the model's dtype) | float32 | bfloat16 | float16: a 16-bit cache holds "
        "twice the tokens and speeds up decoding over long contexts",
    )
    g.add_argument("--max-num-seqs", type=int, default=None, help="most sequences per step")
    g.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="token budget of one step"
    )
    add_switches(g)
    g.add_argument(
        "--chat-template", default=None, help="a chat template file (jinja2), or the template"
    )
    g.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default=None,
        help="fcfs (default): requests in arrival order; priority: by each request's "
        "priority (lower first), then arrival, preempting the last in that order when the KV "
        "cache runs out",
    )
    g.add_argument(
        "--generation-config",
        default=None,
        help="auto (default): the model directory's generation_config.json gives its eos ids "
        "and the sampling defaults of requests that leave them out; vllm: none; or a directory "
        "holding a generation_config.json",
    )
    g.add_argument(
        "--runner",
        choices=["auto", "generate", "pooling"],
        default=None,
        help="generate: completions and chat; pooling: embeddings (/v1/embeddings); auto "
        "(default): pooling for a sentence-transformers directory or a bare decoder "
        "(LlamaModel, Qwen2Model...), else generate",
    )
    g.add_argument(
        "--pooler-config",
        type=json_object,
        default=None,
        help='a pooling model\'s pooler, as JSON: {"pooling_type": "LAST" | "MEAN" | "CLS", '
        '"normalize": true | false} (default: what the model directory says, else LAST '
        "and normalized)",
    )
    g.add_argument(
        "--enable-lora",
        action="store_true",
        default=None,
        help="serve LoRA adapters beside the model (see the server's --lora-modules)",
    )
    g.add_argument(
        "--max-lora-rank", type=int, default=None, help="the highest adapter rank (default 16)"
    )
    g.add_argument(
        "--speculative-config",
        type=json_object,
        default=None,
        help='speculative decoding by prompt lookup, as JSON: {"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}',
    )
    g.add_argument(
        "--hf-overrides",
        type=json_object,
        default=None,
        help="JSON set on the model's config before it loads (vLLM's), e.g. "
        "'{\"max_position_embeddings\": 4096}'",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="on a GPU: the share of its memory for the weights and the KV cache together "
        "(default: the KV cache takes 85%% of the memory free once the weights are in); "
        "no effect on the CPU (see --kv-cache-memory)",
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="split long prompts over steps (default on); off: a prompt runs whole in one step",
    )
    for short, name in (("-tp", "tensor-parallel-size"), ("-pp", "pipeline-parallel-size")):
        g.add_argument(
            short, "--" + name, type=int, default=None, help="1 only: one model on one device"
        )
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="accepted, no effect: only the architectures pagedserve implements load, and no "
        "code from a model's directory runs",
    )
    g.add_argument(
        "--override-generation-config",
        type=json_object,
        default=None,
        help="JSON over the model's generation config (requests' sampling defaults), in its "
        "keys: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens; e.g. "
        "'{\"temperature\": 0.5}'",
    )
    g.add_argument(
        "--max-logprobs",
        type=int,
        default=None,
        help="the most alternatives a request's logprobs, top_logprobs or prompt_logprobs may "
        "ask for (default 20; -1: the whole vocabulary)",
    )
    g.add_argument("--seed", type=int, default=None, help="engine seed")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


_ENGINE_FIELDS = (
    "tokenizer",
    "dtype",
    "device",
    "max_model_len",
    "block_size",
    "kv_cache_memory",
    "kv_cache_dtype",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enforce_eager",
    "generation_config",
    "scheduling_policy",
    "runner",
    "pooler_config",
    "enable_lora",
    "max_lora_rank",
    "speculative_config",
    "gpu_memory_utilization",
    "enable_chunked_prefill",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "trust_remote_code",
    "hf_overrides",
    "max_logprobs",
    "override_generation_config",
    "seed",
    "reasoning_parser",  # serve and run-batch only
)


def engine_config(args: argparse.Namespace, chat_template: str | None) -> Any:
    """An EngineConfig from the flags given; unset flags keep EngineConfig's defaults."""
    from pagedserve.config import EngineConfig

    given = {f: getattr(args, f, None) for f in _ENGINE_FIELDS}
    given = {f: value for f, value in given.items() if value is not None}
    return EngineConfig(model=args.model, chat_template=chat_template, **given)


def chat_template_arg(args: argparse.Namespace) -> str | None:
    """The ``--chat-template`` text, read (and so checked) before the model loads."""
    from pagedserve.tokenizer import read_chat_template

    if args.chat_template is None:
        return None
    try:
        return read_chat_template(args.chat_template)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --chat-template: {exc}") from exc


def generating_engine(args: argparse.Namespace, chat_template: str | None) -> Any:
    """The engine of ``chat`` and ``generate``, which need a model that generates."""
    engine = load_engine(args, chat_template)
    if engine.pooler is not None:
        raise SystemExit(
            f"error: {engine.model_name} runs as an embedding model (runner pooling); serve it "
            "for /v1/embeddings, or pass --runner generate"
        )
    return engine


def add_switches(group: argparse._ArgumentGroup) -> None:
    """``--enable-prefix-caching`` / ``--no-enable-prefix-caching`` and ``--enforce-eager``
    (``serve``, ``chat``, ``generate`` and the benchmarks)."""
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reuse the KV cache of shared prompt prefixes (default: on)",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="run decode steps module by module: no CUDA graphs on a GPU, no one-call "
        "decoder stack on the CPU",
    )


def lora_module(text: str) -> dict[str, str]:
    """One ``--lora-modules`` entry: ``name=path`` or vLLM's JSON ``{"name": ..., "path": ...}``."""
    if text.lstrip().startswith("{"):
        entry = json_object(text)
        if not isinstance(entry.get("name"), str) or not isinstance(entry.get("path"), str):
            raise argparse.ArgumentTypeError('a JSON entry needs "name" and "path"')
        return {"name": entry["name"], "path": entry["path"]}
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    return {"name": name, "path": path}


def load_engine(args: argparse.Namespace, chat_template: str | None) -> Any:
    from pagedserve.engine.llm_engine import LLMEngine

    started = time.monotonic()
    try:
        engine = LLMEngine(engine_config(args, chat_template))
    except (FileNotFoundError, ValueError) as exc:  # a bad model path or option: no traceback
        raise SystemExit(f"error: {exc}") from exc
    stats = engine.get_stats()
    block_size = engine.config.block_size
    logger.info(
        "loaded %s (%s on %s) in %.1f s; context length %d tokens; KV cache %d blocks x %d "
        "tokens = %d tokens (%s)",
        engine.model_name,
        str(getattr(engine, "dtype", engine.config.dtype)).removeprefix("torch."),
        getattr(engine, "device", engine.config.device),
        time.monotonic() - started,
        engine.max_model_len,
        stats.num_total_blocks,
        block_size,
        stats.num_total_blocks * block_size,
        str(engine.kv_cache_dtype).removeprefix("torch."),
    )
    return engine


def take_model_option(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--model`` given: it is the model (an error if the positional argument names another)."""
    given = getattr(args, "model_option", None)
    if given is None:
        return
    if args.model is not None and args.model != given:
        parser.error(f"the model is given twice: {args.model} and --model {given}")
    args.model = given
