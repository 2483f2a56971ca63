"""``pagedserve bench throughput``: offline generation through ``LLM``, requests and tokens per
second (the measurement of ``vllm bench throughput``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pagedserve.bench.datasets import (
    SampleRequest,
    allowed_token_ids,
    dataset_requests,
    random_token_requests,
)
from pagedserve.bench.engine_args import add_engine_args, engine_kwargs
from pagedserve.bench.workload_args import add_workload_args
from pagedserve.lora.request import LoRARequest
from pagedserve.sampling_params import SamplingParams


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_workload_args(parser)
    parser.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (vLLM's benchmark samples at 1.0); EOS is always ignored",
    )
    parser.add_argument(
        "--lora-path",
        default=None,
        help="a PEFT LoRA adapter directory every request runs with (vLLM's flag)",
    )
    parser.add_argument("--output-json", default=None, help="write the results to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def make_requests(args: argparse.Namespace, tokenizer: Any) -> list[SampleRequest]:
    from_file = dataset_requests(args, tokenizer)
    if from_file is not None:
        return from_file
    vocab = allowed_token_ids(tokenizer)
    return random_token_requests(
        vocab, args.num_prompts, args.input_len, args.output_len, args.prefix_len, args.seed
    )


def run(
    llm: Any,
    requests: list[SampleRequest],
    temperature: float,
    use_tqdm: bool,
    lora_request: LoRARequest | None = None,
) -> dict:
    """Generate every request in one ``generate`` call (each with ``lora_request``, if given)
    and measure it."""
    prompts = [
        {"prompt_token_ids": r.prompt} if isinstance(r.prompt, list) else r.prompt for r in requests
    ]
    params = [
        SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=r.expected_output_len)
        for r in requests
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_request)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "elapsed_time": elapsed,
        "num_requests": len(requests),
        "total_prompt_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "total_num_tokens": prompt_tokens + output_tokens,
        "requests_per_second": len(requests) / elapsed,
        "tokens_per_second": (prompt_tokens + output_tokens) / elapsed,
        "output_tokens_per_second": output_tokens / elapsed,
    }


def format_result(result: dict) -> str:
    return (
        f"Throughput: {result['requests_per_second']:.2f} requests/s, "
        f"{result['tokens_per_second']:.2f} total tokens/s, "
        f"{result['output_tokens_per_second']:.2f} output tokens/s\n"
        f"Total num prompt tokens:  {result['total_prompt_tokens']}\n"
        f"Total num output tokens:  {result['total_output_tokens']}"
    )


def main(args: argparse.Namespace) -> None:
    from pagedserve.entrypoints.llm import LLM

    kwargs, lora = engine_kwargs(args), None
    if args.lora_path is not None:
        rank = json.loads((Path(args.lora_path) / "adapter_config.json").read_text())["r"]
        kwargs.update(enable_lora=True, max_lora_rank=rank)
        lora = LoRARequest("bench", 1, args.lora_path)
    llm = LLM(**kwargs)
    requests = make_requests(args, llm.get_tokenizer())
    result = run(llm, requests, args.temperature, not args.disable_tqdm, lora)
    print(format_result(result))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    add_cli_args(_parser)
    main(_parser.parse_args())
