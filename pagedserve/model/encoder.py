"""What every encoder model (BERT, ModernBERT) shares: how the engine treats it, and the step's
inputs as separate sequences."""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.linear import Linear


class Encoder(nn.Module):
    """Each input attends to all of itself, so the engine gives an encoder no KV pools, no
    chunked prefill and no prefix caching (``is_encoder``); it embeds, it cannot generate."""

    is_encoder = True
    default_pooling_type = "CLS"  # vLLM's default for encoders without a Pooling module

    @staticmethod
    def input_lengths(meta: AttentionMetadata) -> list[int]:
        """The length of each input of the step, in order."""
        cu = meta.query_start_loc_cpu
        return [b - a for a, b in zip(cu, cu[1:], strict=False)]

    def rope_offset(self, prompt_len: int) -> int:
        return 0

    def prepack(self, panel_dtype: torch.dtype = torch.float32, with_head: bool = True) -> None:
        """Pack the projections for the CPU GEMM."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack(panel_dtype)
