"""``pagedserve bench latency``: the end-to-end time of one batch, over several iterations.

Each iteration generates a fresh batch of random prompts, so the prefix cache cannot turn later
iterations into cache hits.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from pagedserve.bench.datasets import allowed_token_ids, random_token_requests
from pagedserve.bench.engine_args import add_engine_args, engine_kwargs
from pagedserve.sampling_params import SamplingParams

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts in the batch")
    parser.add_argument("--input-len", type=int, default=32, help="tokens per prompt")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--num-iters-warmup", type=int, default=2, help="untimed iterations")
    parser.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--output-json", default=None, help="write the results to this file")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def run(llm: Any, args: argparse.Namespace) -> dict:
    """Time ``num_iters`` batches after ``num_iters_warmup`` untimed ones."""
    vocab = allowed_token_ids(llm.get_tokenizer())
    params = SamplingParams(
        temperature=args.temperature, ignore_eos=True, max_tokens=args.output_len
    )

    def one_batch(seed: int) -> float:
        requests = random_token_requests(
            vocab, args.batch_size, args.input_len, args.output_len, seed=seed
        )
        prompts = [{"prompt_token_ids": r.prompt} for r in requests]
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start

    total = args.num_iters_warmup + args.num_iters
    iters = tqdm(range(total), desc="Iterations", disable=args.disable_tqdm)
    timings = [one_batch(args.seed + i) for i in iters]
    latencies = np.array(timings[args.num_iters_warmup :])
    return {
        "avg_latency": float(latencies.mean()),
        "latencies": latencies.tolist(),
        "percentiles": {str(p): float(np.percentile(latencies, p)) for p in PERCENTILES},
    }


def format_result(result: dict) -> str:
    lines = [f"Avg latency: {result['avg_latency']:.4f} seconds"]
    lines += [
        f"{p}% percentile latency: {value:.4f} seconds"
        for p, value in result["percentiles"].items()
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    from pagedserve.entrypoints.llm import LLM

    llm = LLM(**engine_kwargs(args))
    result = run(llm, args)
    print(format_result(result))
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    add_cli_args(_parser)
    main(_parser.parse_args())
