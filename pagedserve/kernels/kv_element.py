"""The K/V pool element types the C attention kernels are built for (``kv_element.h``): one
build of each kernel per type, picked by a ``-D`` define."""

from __future__ import annotations

import torch

_DEFINES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: (),
    torch.float16: ("-DKV_FLOAT16",),
    torch.bfloat16: ("-DKV_BFLOAT16",),
}


def kv_defines(dtype: torch.dtype) -> tuple[str, ...] | None:
    """The defines that build a kernel for pools of ``dtype``; None for a type it lacks."""
    return _DEFINES.get(dtype)
