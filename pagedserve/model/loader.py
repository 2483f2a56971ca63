"""Load a model (HF directory or GGUF file) into our Llama-family implementation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from pagedserve.model.gguf_loader import gguf_config, gguf_weights, open_gguf, quantized_blocks
from pagedserve.model.hf_config import hf_config, safetensors_weights
from pagedserve.model.layers.linear import bf16_panels_available
from pagedserve.model.registry import get_model_class

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

logger = logging.getLogger(__name__)


def load_config(path: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """The transformers config of a resolved model path (see ``pagedserve.model_path``), with
    vLLM's ``hf_overrides`` set on it (a dict value merged into a dict attribute, key by key)."""
    model = Path(path)
    if model.suffix == ".gguf":
        if not model.is_file():
            raise FileNotFoundError(f"GGUF file {model} does not exist")
        config = gguf_config(open_gguf(str(model)))
    elif not model.is_dir():
        raise FileNotFoundError(f"model path {model} does not exist")
    else:
        config = hf_config(model)
    for key, value in (overrides or {}).items():
        current = getattr(config, key, None)
        if isinstance(value, dict) and isinstance(current, dict):
            value = {**current, **value}
        setattr(config, key, value)
    return config


def bf16_matmuls_in_float32(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether the model runs in float32 with bfloat16 matmuls where ``dtype`` bfloat16 is
    asked for: on a CPU whose C GEMM multiplies bfloat16 panels (AVX512-BF16). There the
    weights and each matmul's inputs are rounded to bfloat16 and summed in float32, the rest
    (norms, rotary, attention over a bfloat16 KV cache, the residual stream) runs in float32, as
    under ``torch.autocast``; and the model takes the C kernels, which run float32 only.
    PyTorch's own bfloat16 modules ran 32 x 1024-token prompts (32 tokens out) at 876 total
    tok/s on this project's 2-core machine, half of the float32 C path's 1723."""
    return (
        dtype == torch.bfloat16 and torch.device(device).type == "cpu" and bf16_panels_available()
    )


def load_model(
    path: str,
    dtype: torch.dtype,
    device: torch.device | str,
    pooling: bool = False,
    hf_overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """Build the model for ``path``'s architecture on ``device`` in ``dtype`` and load its
    weights (GGUF tensors are dequantized; on CPU in float32 the projections also keep Q4_0,
    Q4_1, Q4_K, Q6_K and Q8_0 tensors' blocks for steps of few rows; see
    :func:`bf16_matmuls_in_float32` for bfloat16 on CPU). The result is in eval mode without
    gradients.

    A ``pooling`` model (embeddings) has no lm head: a checkpoint's is skipped.
    ``hf_overrides`` change the config first (see :func:`load_config`)."""
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    panel_dtype = torch.float32
    if bf16_matmuls_in_float32(dtype, device):
        dtype, panel_dtype = torch.float32, torch.bfloat16
        logger.info("bfloat16 on this CPU: float32 modules, bfloat16 matmuls (AVX512-BF16)")
    config = load_config(path, hf_overrides)
    model_class = get_model_class(config)
    if pooling:
        config.tie_word_embeddings = True  # no lm_head module; its weights are skipped
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config)
    model.load_weights(_weights(path, config))
    if (
        Path(path).suffix == ".gguf"
        and torch.device(device).type == "cpu"
        and dtype == torch.float32
    ):
        model.load_quantized(quantized_blocks(open_gguf(path), config))  # for decode steps
    model.requires_grad_(False)
    model.prepack(panel_dtype, with_head=not pooling)
    return model.eval()


def _weights(path: str, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    if Path(path).suffix == ".gguf":
        return gguf_weights(open_gguf(path), config)
    return safetensors_weights(Path(path))


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created with ``torch.empty`` in the default dtype: set it while building."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
