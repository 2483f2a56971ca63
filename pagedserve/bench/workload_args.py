"""Workload flags shared by the benchmarks: which prompts, how long, how many."""

from __future__ import annotations

import argparse


def add_workload_args(parser: argparse.ArgumentParser, num_prompts: int = 64) -> None:
    """``--dataset random|sharegpt|custom|FILE.jsonl`` and the lengths of random prompts
    (vLLM's names too)."""
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--dataset",
        "--dataset-name",
        default="random",
        help="'random'; 'sharegpt' (a ShareGPT JSON file at --dataset-path); 'custom' or a "
        'path: a JSONL file of {"prompt": ..., "output_len"?: ...} objects',
    )
    group.add_argument(
        "--dataset-path", default=None, help="the file of --dataset sharegpt or custom"
    )
    group.add_argument(
        "--sharegpt-output-len",
        action="store_true",
        help="ShareGPT prompts generate --output-len tokens, not their reply's length",
    )
    group.add_argument("--num-prompts", type=int, default=num_prompts, help="requests to send")
    group.add_argument(
        "--input-len", "--random-input-len", type=int, default=128, help="random prompt tokens"
    )
    group.add_argument(
        "--output-len",
        "--random-output-len",
        type=int,
        default=128,
        help="tokens to generate (random dataset, and file prompts without output_len)",
    )
    group.add_argument(
        "--prefix-len",
        "--random-prefix-len",
        type=int,
        default=0,
        help="random prompts start with one shared random prefix of this many tokens",
    )
