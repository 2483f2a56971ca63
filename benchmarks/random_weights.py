"""What the random-model writers share: a transformers model's weights made random (norms near
1, the rest small noise, seeded) and saved with SmolLM2's tokenizer beside them."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from pagedserve.model_path import packaged_model_path
from pagedserve.tokenizer import load_tokenizer


def save_random(model: PreTrainedModel, out: Path) -> None:
    """Fill ``model`` with seeded random weights and save it, with SmolLM2's tokenizer, at
    ``out``."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.05 * torch.randn_like(param)
            param.copy_(1 + noise if "norm" in name else noise)
    model.save_pretrained(out)
    load_tokenizer(str(packaged_model_path())).save_pretrained(out)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
