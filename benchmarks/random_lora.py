"""Writes a PEFT LoRA adapter with random weights on every projection of a Llama-family model,
for measuring adapter steps (`pagedserve bench throughput --lora-path DIR`): the cost of an
adapter depends on its rank and the projections it targets, not on its values.

Usage: .venv/bin/python benchmarks/random_lora.py OUT_DIR [--model PATH] [--rank 16]
(the model's shapes come from its config; default: the packaged SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagedserve.model.loader import load_config
from pagedserve.model_path import resolve_model


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection a Llama-family layer has, by its checkpoint name."""
    hidden, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inner, hidden),
        "mlp.up_proj": (inner, hidden),
        "mlp.down_proj": (hidden, inner),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    config = load_config(resolve_model(args.model))
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name, (out, inp) in projection_shapes(config).items():
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = 0.01 * torch.randn(
                args.rank, inp, generator=generator
            )
            tensors[f"{prefix}.lora_B.weight"] = 0.01 * torch.randn(
                out, args.rank, generator=generator
            )
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out / "adapter_model.safetensors")
    targets = sorted({name.rpartition(".")[2] for name in projection_shapes(config)})
    adapter = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank,
               "target_modules": targets, "bias": "none", "task_type": "CAUSAL_LM"}  # fmt: skip
    (args.out / "adapter_config.json").write_text(json.dumps(adapter, indent=2))


if __name__ == "__main__":
    main()
