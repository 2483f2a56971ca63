"""Writes a random-weight OLMo 2 model directory of SmolLM2-135M's shape (30 layers of 576, 9
query and 3 key/value heads of 64, MLP 1536, tied head) with SmolLM2's tokenizer, for measuring
OLMo 2's steps (`pagedserve bench throughput --model DIR`): no OLMo 2 checkpoint that small is
published, and a step's cost depends on the shapes only.

Usage: .venv/bin/python benchmarks/random_olmo2.py OUT_DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path

from random_weights import save_random
from transformers import Olmo2Config, Olmo2ForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    config = Olmo2Config(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    model = Olmo2ForCausalLM(config)
    save_random(model, args.out)


if __name__ == "__main__":
    main()
