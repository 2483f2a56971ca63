"""The preallocated K/V block pools of every layer, sized from a memory budget."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.attention import Attention

logger = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_CPU_KV_GIB = 2.0
DEFAULT_GPU_FRACTION = 0.85


def kv_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(
    budget_gib: float | None,
    bytes_per_token: int,
    block_size: int,
    device: torch.device,
    max_useful_tokens: int,
    gpu_memory_utilization: float | None = None,
) -> int:
    """How many blocks fit the budget: ``budget_gib`` if given; else on a GPU what
    ``gpu_memory_utilization`` of its memory leaves beside what is already held (the weights),
    or by default a share of its free memory; on the CPU a fixed default.

    Never more than ``max_useful_tokens`` worth: a tiny model would otherwise get millions of
    blocks it can never fill.
    """
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if budget_gib is None:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            # Memory PyTorch's allocator holds but no tensor uses (an earlier engine's freed
            # pools, say) is free to this engine, though the driver counts it as taken.
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if gpu_memory_utilization is None:
                budget_bytes = int(free * DEFAULT_GPU_FRACTION)
            else:
                held = total - free
                budget_bytes = min(int(total * gpu_memory_utilization) - held, free)
                if budget_bytes <= 0:
                    raise ValueError(
                        f"gpu_memory_utilization {gpu_memory_utilization} leaves no memory for "
                        f"the KV cache: {held / GIB:.1f} of the GPU's {total / GIB:.1f} GiB "
                        "are already held (the weights, other processes)"
                    )
        else:
            budget_bytes = int(DEFAULT_CPU_KV_GIB * GIB)
            if gpu_memory_utilization is not None:
                logger.info(
                    "gpu_memory_utilization has no effect on the CPU: the KV cache takes "
                    "kv_cache_memory GiB (%.1f by default)",
                    DEFAULT_CPU_KV_GIB,
                )
    else:
        budget_bytes = int(budget_gib * GIB)
    num_blocks = budget_bytes // max(1, bytes_per_token * block_size)  # 0 bytes: an encoder
    return int(max(1, min(num_blocks, -(-max_useful_tokens // block_size) + 1)))


def shared_sliding_window(model: nn.Module) -> int | None:
    """The sliding window of every attention layer, where all have the same one (then the
    blocks that a request's window has passed can go back to the pool); None otherwise."""
    windows = {m.sliding_window for m in model.modules() if isinstance(m, Attention)}
    return windows.pop() if len(windows) == 1 else None


def fitted_context(
    max_model_len: int, num_blocks: int, block_size: int, window: int | None, step_tokens: int
) -> int:
    """``max_model_len``, or what the cache holds where one request could need more at once.

    A request holds its whole context's blocks, or with a sliding ``window`` whose passed
    blocks are given back, the window's and those of the most tokens a step gives it
    (``step_tokens``; each end possibly in a partly used block). One block is then the null
    block that the passed places of block tables point to."""
    capacity = (num_blocks - (window is not None)) * block_size
    held = max_model_len if window is None else window + step_tokens + 2 * block_size
    if capacity >= min(held, max_model_len):
        return max_model_len
    logger.warning(
        "the KV cache holds %d tokens, fewer than the context length %d: "
        "lowering max_model_len to %d",
        capacity,
        max_model_len,
        capacity,
    )
    return capacity


class KVCache:
    """One K pool and one V pool per layer, ``[num_blocks + 1, block_size, num_kv_heads,
    head_dim]``: the scheduler hands out blocks ``0 .. num_blocks - 1``; the last one,
    :attr:`scratch_block`, belongs to no request (padded rows of a CUDA-graph step write there).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        # Zeroed, not empty: padded attention reads masked slots, and 0 * NaN garbage is NaN.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.block_size = block_size

    @classmethod
    def for_model(
        cls,
        hf_config: Any,
        num_layers: int,
        budget_gib: float | None,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_useful_tokens: int,
        gpu_memory_utilization: float | None = None,
    ) -> KVCache:
        """The pools of a model's ``num_layers`` attention layers (0 for an encoder, which keeps
        no K/V: its blocks then only count the tokens in flight), as many blocks as
        :func:`num_blocks_for_budget` gives."""
        hf = hf_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
        per_token = kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
        num_blocks = num_blocks_for_budget(
            budget_gib, per_token, block_size, device, max_useful_tokens, gpu_memory_utilization
        )
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB, %s)",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * block_size * per_token / GIB,
            str(dtype).removeprefix("torch."),
        )
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks ``src -> dst`` in every layer (copy-on-write of shared blocks)."""
        if not copies:
            return
        device = self.k[0].device
        src = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
        dst = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
        for pool in (*self.k, *self.v):
            pool.index_copy_(0, dst, pool.index_select(0, src))
