"""The K/V pool element types the C attention and K/V-store kernels are built for
(``kv_element.h``): one build of each kernel per type, picked by a ``-D`` define."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels.cpu_build import Signature, bind_kernel

_DEFINES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: (),
    torch.float16: ("-DKV_FLOAT16",),
    torch.bfloat16: ("-DKV_BFLOAT16",),
}


def bind_kv_kernel(
    name: str, signatures: dict[str, Signature], kv_dtype: torch.dtype
) -> ctypes.CDLL | None:
    """:func:`~pagedserve.kernels.cpu_build.bind_kernel` of the build of ``name`` for pools of
    ``kv_dtype``; None if it has no such build."""
    defines = _DEFINES.get(kv_dtype)
    return None if defines is None else bind_kernel(name, signatures, defines)
