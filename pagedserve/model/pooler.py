"""Embeddings from a decoder's hidden states: which rows to pool, and how (vLLM's pooler).

A model directory says how it was trained to embed in sentence-transformers' files:
``modules.json`` lists a ``Pooling`` module (its ``config.json`` names the mode: last token,
mean or CLS) and, for unit-length output, a ``Normalize`` one. Without them a decoder pools its
last token and normalizes, as vLLM's default for causal LMs run as embedding models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedserve.pooling_params import PoolingParams

POOLING_TYPES = ("LAST", "MEAN", "CLS")

_SENTENCE_TRANSFORMERS_MODES = {
    "pooling_mode_lasttoken": "LAST",
    "pooling_mode_mean_tokens": "MEAN",
    "pooling_mode_cls_token": "CLS",
}


@dataclass(frozen=True)
class PoolerConfig:
    """``pooling_type`` (LAST, MEAN or CLS) and whether embeddings are normalized by default;
    ``matryoshka_dimensions`` are the lengths ``dimensions`` may ask for (empty: any up to the
    hidden size; None: the model is not a Matryoshka model, so none)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    hidden_size: int = 0
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )

    @property
    def needs_every_row(self) -> bool:
        """Whether every prompt position's hidden state counts (so none may come from the
        prefix cache): true for mean and CLS pooling."""
        return self.pooling_type != "LAST"

    def check(self, params: PoolingParams) -> None:
        """Raise ``ValueError`` for ``dimensions`` this model cannot give."""
        dims = params.dimensions
        if dims is None:
            return
        if self.matryoshka_dimensions is None:
            raise ValueError(
                "this model does not support Matryoshka representations, so `dimensions` "
                "cannot shorten its embeddings"
            )
        allowed = self.matryoshka_dimensions
        if (allowed and dims not in allowed) or dims > self.hidden_size:
            shown = ", ".join(map(str, allowed)) if allowed else f"1 to {self.hidden_size}"
            raise ValueError(f"dimensions must be one of {shown}, got {dims}")

    def partial(self, rows: torch.Tensor, start: int, prompt_len: int) -> torch.Tensor | None:
        """This step's share of one request's embedding, from the final hidden states ``rows``
        of its prompt positions ``start`` onward: the last row (LAST, once the chunk ends the
        prompt), the rows' float32 sum (MEAN), the first position's row (CLS); None where the
        chunk holds nothing of it."""
        if self.pooling_type == "MEAN":
            return rows.float().sum(0)
        if self.pooling_type == "CLS":
            return rows[0].float() if start == 0 else None
        return rows[-1].float() if start + len(rows) == prompt_len else None

    def pooled_state(self, pooled: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """The pooled hidden state from the accumulated :meth:`partial` results (a classifier's
        head takes it as it is)."""
        return pooled / prompt_len if self.pooling_type == "MEAN" else pooled

    def finish(self, pooled: torch.Tensor, prompt_len: int, params: PoolingParams) -> list[float]:
        """The request's embedding from its accumulated :meth:`partial` results."""
        pooled = self.pooled_state(pooled, prompt_len)
        if params.dimensions is not None:
            pooled = pooled[: params.dimensions]
        normalize = self.normalize if params.normalize is None else params.normalize
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=0)
        return pooled.tolist()


def label_scores(logits: torch.Tensor) -> list[float]:
    """A cross-encoder's scores from its label logits: the sigmoid of a single logit (the
    relevance of the pair, as sentence-transformers' CrossEncoder scores it), else the softmax."""
    logits = logits.float()
    if logits.numel() == 1:
        return torch.sigmoid(logits).tolist()
    return torch.softmax(logits, dim=-1).tolist()


def load_pooler_config(
    model_path: str,
    hf_config: Any,
    overrides: dict[str, Any] | None = None,
    default_type: str = "LAST",
) -> PoolerConfig:
    """The pooler of the model at ``model_path``: sentence-transformers' files if it has them,
    else ``default_type`` pooling (last token for decoders, CLS for BERT encoders) with
    normalization; ``overrides`` (vLLM's ``--pooler-config``: ``pooling_type``,
    ``normalize``) win."""
    settings: dict[str, Any] = {"pooling_type": default_type, "normalize": True}
    settings.update(_sentence_transformers_pooler(Path(model_path)))
    for key, value in (overrides or {}).items():
        if key not in settings:
            raise ValueError(f"unknown pooler config key {key!r}; known: pooling_type, normalize")
        settings[key] = value.upper() if key == "pooling_type" else bool(value)
    dims = getattr(hf_config, "matryoshka_dimensions", None)
    if dims is not None:
        matryoshka: tuple[int, ...] | None = tuple(int(d) for d in dims)
    else:
        matryoshka = () if getattr(hf_config, "is_matryoshka", False) else None
    return PoolerConfig(
        hidden_size=hf_config.hidden_size, matryoshka_dimensions=matryoshka, **settings
    )


def sentence_transformers_max_length(model_path: str) -> int | None:
    """``max_seq_length`` of ``sentence_bert_config.json``: the longest input the model was
    trained to embed (sentence-transformers cuts longer ones; here they are a 400, as in vLLM,
    unless ``truncate_prompt_tokens`` shortens them)."""
    config = Path(model_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    length = json.loads(config.read_text()).get("max_seq_length")
    return int(length) if length else None


def has_sentence_transformers_pooler(model_path: str) -> bool:
    """Whether the directory is a sentence-transformers embedding model (a Pooling module)."""
    return bool(_sentence_transformers_pooler(Path(model_path)))


def _sentence_transformers_pooler(model_dir: Path) -> dict[str, Any]:
    modules_file = model_dir / "modules.json"
    if not model_dir.is_dir() or not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        return {}
    pooling_file = model_dir / kinds["Pooling"].get("path", "") / "config.json"
    mode = "LAST"
    if pooling_file.is_file():
        pooling = json.loads(pooling_file.read_text())
        chosen = [t for key, t in _SENTENCE_TRANSFORMERS_MODES.items() if pooling.get(key)]
        if len(chosen) != 1:
            raise ValueError(
                f"{pooling_file}: exactly one of last-token, mean or CLS pooling is supported"
            )
        mode = chosen[0]
    return {"pooling_type": mode, "normalize": "Normalize" in kinds}
