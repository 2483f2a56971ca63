"""Writes a random-weight Mixtral (Mixture-of-Experts) model directory with SmolLM2's tokenizer,
for measuring MoE steps (`pagedserve bench throughput --model DIR`): what a step costs depends on
the shapes and on how tokens spread over the experts, which random routers spread about evenly.

Usage: .venv/bin/python benchmarks/random_mixtral.py OUT_DIR [--hidden 512] [--layers 8]
    [--experts 8] [--top-k 2] [--intermediate 1024] [--dense]
(``--dense``: a Llama of the same active size instead, intermediate ``top_k * intermediate``,
for comparison)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from random_weights import save_random
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--dense", action="store_true")
    args = parser.parse_args()
    shapes = dict(
        vocab_size=49152,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if args.dense:
        config = LlamaConfig(**shapes, intermediate_size=args.top_k * args.intermediate)
        model = LlamaForCausalLM(config)
    else:
        config = MixtralConfig(
            **shapes,
            intermediate_size=args.intermediate,
            num_local_experts=args.experts,
            num_experts_per_tok=args.top_k,
        )
        model = MixtralForCausalLM(config)
    save_random(model, args.out)


if __name__ == "__main__":
    main()
