"""Where and in what precision the engine runs: the device, the model's dtype, the KV cache's."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_one_device(tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """vLLM's parallel sizes: 1 is all pagedserve runs."""
    for name, value in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("pipeline_parallel_size", pipeline_parallel_size),
    ):
        if value != 1:
            raise ValueError(
                f"{name} {value}: pagedserve runs one model on one device (the CPU or one GPU); "
                "run one server per device behind a load balancer instead"
            )


def resolve_device(name: str) -> torch.device:
    """The device to run on: ``auto`` is the GPU when PyTorch sees one (as vLLM picks), else the
    CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu or cuda[:N]; got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N]; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} needs a GPU and a CUDA build of PyTorch; this PyTorch "
            f"({torch.__version__}) sees none"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is float32 on the CPU, bfloat16 on a GPU that has it and float16 on an older one
    (as vLLM falls back on GPUs before compute capability 8.0)."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
            return torch.bfloat16 if native else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The K/V pools' element type: the model's (``auto``) or a named one. A 16-bit cache halves
    the memory per token and the bytes decode attention reads; float16 keeps more precision,
    bfloat16 float32's range."""
    if name == "auto":
        return model_dtype
    if name not in DTYPES:
        hint = " (fp8 KV caches are not supported)" if name.startswith("fp8") else ""
        raise ValueError(
            f"kv_cache_dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}{hint}"
        )
    return DTYPES[name]
