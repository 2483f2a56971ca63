"""Parameters of one embedding request (vLLM's ``PoolingParams`` for the ``embed`` task)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """How to turn one prompt's hidden states into its embedding.

    ``dimensions`` keeps only the first that many values (Matryoshka models, whose config says
    ``is_matryoshka`` or lists ``matryoshka_dimensions``); ``normalize`` scales the result to
    unit length (None: the model's pooler config decides, as vLLM's does).
    """

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int) or self.dimensions < 1
        ):
            raise ValueError(f"dimensions must be an integer >= 1, got {self.dimensions!r}")
