"""A sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE).

Each token's router logits go through a softmax (in float32); its ``top_k`` experts are the
most probable ones, their probabilities (renormalised to sum to 1 where the model says so) the
weights of their outputs. The experts are SwiGLU MLPs whose weights are stacked in ``[E, ...]``
tensors at load time, named as transformers 5 names its fused experts (``gate_up_proj``: each
expert's gate rows then its up rows; ``down_proj``).

The step's token-expert pairs are sorted by expert, so each expert that has tokens multiplies
all of them in one GEMM (one Python iteration per such expert, never per token); the weighted
results are summed back into their tokens' rows with ``index_add_``. On the CPU in float32 each
expert's weights are packed for the C GEMM (gate/up with the activation fused), as dense
projections are (:mod:`pagedserve.model.layers.linear`); bfloat16 panels too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import packed_gemm
from pagedserve.model.layers.activation import silu_and_mul
from pagedserve.model.layers.linear import Linear, can_pack, linear
from pagedserve.model.strict_loading import check_floating

# A per-expert checkpoint projection (the Hub's names: Qwen's, then Mixtral's w1/w3/w2) ->
# (the stacked parameter it goes into, its shard there: 0 gate rows, 1 up rows, None all).
EXPERT_PROJECTIONS: dict[str, tuple[str, int | None]] = {
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", None),
    "w1": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "w2": ("down_proj", None),
}
# One loaded piece of the stacked weights: (parameter, expert, shard).
Piece = tuple[str, int, int | None]


class FusedExperts(nn.Module):
    """``num_experts`` SwiGLU experts, their weights stacked: ``gate_up_proj [E, 2 I, H]`` and
    ``down_proj [E, H, I]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        self.packed_gate_up: list[torch.Tensor] = []
        self.packed_down: list[torch.Tensor] = []

    def pieces(self) -> set[Piece]:
        """Every piece a checkpoint must fill."""
        gate_up = {("gate_up_proj", e, s) for e in range(self.num_experts) for s in (0, 1)}
        return gate_up | {("down_proj", e, None) for e in range(self.num_experts)}

    def load(self, name: str, tensor: torch.Tensor, source: str = "") -> set[Piece]:
        """Copy a checkpoint tensor in; ``name`` is relative to this module: a stacked weight
        (``gate_up_proj``, ``down_proj``: transformers 5's layout) or one expert's projection
        (``3.gate_proj.weight``, ``3.w1.weight``: the Hub's). ``source``, the checkpoint's
        name for it, is what an error names. Returns the pieces it filled."""
        source = source or f"experts.{name}"
        check_floating(source, tensor)
        if name in ("gate_up_proj", "down_proj"):
            _copy(source, getattr(self, name).data, tensor)
            return {p for p in self.pieces() if p[0] == name}
        expert, _, rest = name.partition(".")
        projection, _, leaf = rest.partition(".")
        if not expert.isdigit() or projection not in EXPERT_PROJECTIONS or leaf != "weight":
            raise ValueError(f"checkpoint weight {source!r} matches no expert parameter")
        index = int(expert)
        if index >= self.num_experts:
            raise ValueError(
                f"checkpoint weight {source!r} is expert {index}, but the config has "
                f"{self.num_experts} experts (0..{self.num_experts - 1}; "
                "num_experts / num_local_experts)"
            )
        stacked, shard = EXPERT_PROJECTIONS[projection]
        target = getattr(self, stacked).data[index]
        if shard is not None:
            target = target[shard * self.intermediate : (shard + 1) * self.intermediate]
        _copy(source, target, tensor)
        return {(stacked, index, shard)}

    def prepack(self, panel_dtype: torch.dtype) -> None:
        """Pack each expert's weights for the C GEMM where that path applies (call after
        loading)."""
        if not can_pack(self.gate_up_proj):
            return
        self.packed_gate_up = [packed_gemm.pack(w, True, panel_dtype) for w in self.gate_up_proj]
        self.packed_down = [packed_gemm.pack(w, False, panel_dtype) for w in self.down_proj]

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index``'s output on rows ``x [n, H]`` (n > 0)."""
        if self.packed_gate_up and not torch.is_grad_enabled():
            hidden = packed_gemm.linear(
                x, self.packed_gate_up[index], self.intermediate, None, gated=True
            )
            down = self.packed_down[index]
        else:
            hidden = silu_and_mul(F.linear(x, self.gate_up_proj[index]))
            down = None
        return linear(hidden, self.down_proj[index], None, down)

    def forward(
        self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j weights[t, j] * expert[expert_ids[t, j]](x[t])`` for every row ``t`` of
        ``x [T, H]``; ``expert_ids``, ``weights``: ``[T, top_k]``."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // top_k
        gathered = x.index_select(0, token_of)
        outputs = torch.empty_like(gathered)
        start = 0
        for index, count in enumerate(counts):
            if count:
                end = start + count
                outputs[start:end] = self.expert(index, gathered[start:end])
                start = end
        outputs.mul_(weights.flatten()[order].to(outputs.dtype).unsqueeze(1))
        return torch.zeros_like(x).index_add_(0, token_of, outputs)


def _copy(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if tensor.shape != target.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}"
        )
    target.copy_(tensor)


class SparseMoeBlock(nn.Module):
    """Router (``gate``), experts, and optionally a shared expert that every token goes
    through, its output scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE)."""

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        intermediate: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(top_k, int) or not 0 < top_k <= num_experts:
            raise ValueError(
                f"num_experts_per_tok {top_k!r} must be in 1..{num_experts}, the number of experts"
            )
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = Linear(hidden, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden, intermediate)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            Linear(hidden, 1, bias=False) if shared_expert is not None else None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's ``(expert ids, float32 weights)``, ``[T, top_k]`` each."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return expert_ids, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.clone()
        expert_ids, weights = self.route(x)
        out = self.experts(x, expert_ids, weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = self.shared_expert(x)
            out += torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out
