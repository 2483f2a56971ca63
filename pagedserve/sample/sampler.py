"""Vectorised sampling of one step's next tokens, for the whole batch at once.

Per step: logprobs of the raw model distribution (vLLM's default), the request-level logits
processors, then for sampled rows temperature, min-p, top-k and top-p, and a draw by inverse CDF
with one uniform number per row, which lets each row draw from its own generator so that ``seed``
reproduces whatever else is in the batch. Greedy rows take the argmax of the processed logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.sample.logits_processors import apply_logits_processors
from pagedserve.sample.metadata import SamplingMetadata, SamplingRow

__all__ = [
    "NO_TOKEN",
    "LogprobsEntry",
    "Sampler",
    "SamplerOutput",
    "SamplingRow",
    "make_generator",
]

# The "token" of a row whose constraints together allow none (allowed_token_ids, bad_words,
# stop tokens banned below min_tokens, a grammar): the sequence ends with finish_reason "error".
NO_TOKEN = -1


@dataclass
class LogprobsEntry:
    """Logprobs of one sampled position."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    rank: int  # 1-based rank of the token in the distribution
    top: list[tuple[int, float]]  # the N most likely (token_id, logprob), best first
    # With logprob_token_ids, ``top`` holds those tokens, in their order, and these are their
    # ranks; None: ``top``'s ranks are its positions
    top_ranks: list[int] | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[LogprobsEntry | None]  # per row; None where params.logprobs is None


def make_generator(
    seed: int | None, device: torch.device | str, index: int = 0
) -> torch.Generator | None:
    """The RNG of sequence ``index`` of a request: None (the global RNG) without a seed; else
    seeded with ``seed + index`` (as vLLM seeds the children of an ``n > 1`` request), so the
    sequences differ and each one reproduces."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + index) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class Sampler:
    """Turns one step's logits into next tokens (and logprobs) for every row."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int]):
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """``logits``: [len(rows), >= vocab_size], one row per sampling sequence. The tensor is
        changed in place: pass a copy to keep it."""
        logits = logits[:, : self.vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()
        meta = SamplingMetadata.build(rows, self.vocab_size, self.eos_token_ids, logits.device)
        # Logprobs are those of the raw model distribution, so they are taken first.
        wanted = [i for i, n in enumerate(meta.num_logprobs) if n is not None]
        index = None
        if 0 < len(wanted) < len(rows):
            index = torch.tensor(wanted, device=logits.device)
        raw_logprobs = None
        if wanted:
            raw_logprobs = torch.log_softmax(logits if index is None else logits[index], dim=-1)
        apply_logits_processors(logits, meta)
        stuck = None  # only masks and bans make a row all -inf
        if meta.allowed is not None or meta.banned is not None:
            stuck = torch.isneginf(logits.amax(dim=-1))
        tokens = sample(logits, meta)
        logprobs: list[LogprobsEntry | None] = [None] * len(rows)
        if raw_logprobs is not None:
            entries = gather_logprobs(
                raw_logprobs,
                tokens if index is None else tokens[index],
                [meta.num_logprobs[i] for i in wanted],
            )
            for k, (i, entry) in enumerate(zip(wanted, entries, strict=True)):
                listed = rows[i].params.logprob_token_ids
                logprobs[i] = (
                    entry if listed is None else with_listed(raw_logprobs[k], entry, listed)
                )
        if stuck is not None:
            tokens = tokens.masked_fill(stuck, NO_TOKEN)
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=logprobs)


def sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Next token per row from processed logits (changed in place): the argmax for greedy rows,
    a draw from the truncated, tempered distribution for the others."""
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    greedy_tokens = logits.argmax(dim=-1) if meta.greedy is not None else None
    tokens = inverse_cdf_draw(sampling_probs(logits, meta), meta.generators)
    if greedy_tokens is not None:
        tokens = torch.where(meta.greedy, greedy_tokens, tokens)
    return tokens


def sampling_probs(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The distribution sampled rows draw from: temperature, min-p, top-k, top-p, softmax."""
    if meta.temperature is not None:
        logits.div_(meta.temperature.unsqueeze(1))
    if meta.min_p is not None:
        apply_min_p(logits, meta.min_p)
    if meta.top_k is not None or meta.top_p is not None:
        apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
    return torch.softmax(logits, dim=-1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens whose probability is below ``min_p`` times the top token's. Compared in log
    space (``logit - max < log(min_p)``), which needs no softmax; min_p 0 gives -inf: no-op."""
    top = logits.amax(dim=-1, keepdim=True)
    logits.masked_fill_(logits - top < torch.log(min_p).unsqueeze(1), float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int, top_p: torch.Tensor | None
) -> None:
    """Keep each row's ``top_k`` best tokens, then the smallest set of best tokens whose mass in
    that renormalised distribution reaches ``top_p`` (a token is dropped when the mass strictly
    before it already does). Tokens tied with the last kept one are kept too."""
    num_candidates = max_top_k if top_p is None else max(max_top_k, _TOP_P_CANDIDATES)
    num_candidates = min(logits.shape[1], num_candidates)
    logits.masked_fill_(logits < _cutoff(logits, top_k, top_p, num_candidates), float("-inf"))


# Top-p looks for its cut-off among this many best tokens first, which is much cheaper than a
# sort of the vocabulary; rows whose nucleus is larger retry with 16 times as many, and so on up
# to a sort of the whole vocabulary.
_TOP_P_CANDIDATES = 256


def _cutoff(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None, k: int
) -> torch.Tensor:
    """[B, 1] lowest logit each row keeps (-inf: keeps all), searched among its ``k`` best."""
    num_rows, vocab = logits.shape
    if k == vocab:
        values = logits.sort(dim=-1, descending=True).values
    else:
        values = logits.topk(k, dim=-1).values
    position = torch.arange(k, device=logits.device)
    keep = torch.isfinite(values)
    cuts = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
    if top_k is not None:
        keep &= position < top_k.unsqueeze(1)
        cuts = cuts | (top_k < vocab)
    uncovered = None
    if top_p is not None:
        # Rows cut by top-k have all their survivors among the candidates; the others need the
        # normaliser of the whole row.
        within = cuts if k < vocab else torch.ones_like(cuts)
        total = torch.where(
            within.unsqueeze(1),
            values.masked_fill(~keep, float("-inf")).logsumexp(dim=-1, keepdim=True),
            logits.logsumexp(dim=-1, keepdim=True),
        )
        probs = torch.exp(values - total).masked_fill_(~keep, 0.0)
        mass = probs.cumsum(dim=-1)
        limit = top_p.unsqueeze(1)
        keep &= (mass - probs < limit) | (limit >= 1.0)
        cuts = cuts | (top_p < 1.0)
        uncovered = ~within & (top_p < 1.0) & (mass[:, -1] < top_p)
    last = keep.sum(dim=-1, keepdim=True).clamp_(min=1) - 1
    threshold = values.gather(1, last).masked_fill_(~cuts.unsqueeze(1), float("-inf"))
    if uncovered is not None and bool(uncovered.any()):
        rows = uncovered.nonzero().squeeze(1)
        sub_k = None if top_k is None else top_k[rows]
        threshold[rows] = _cutoff(logits[rows], sub_k, top_p[rows], min(vocab, k * 16))
    return threshold


# The draw inverts the cumulative distribution in two levels, over blocks of this many tokens and
# then inside the chosen block, so it never needs a float64 cumulative sum of the whole vocabulary.
_DRAW_BLOCK = 256


def draw_uniform(generator: torch.Generator) -> torch.Tensor:
    """The one uniform number a sampled row with its own generator takes from it."""
    return torch.rand(1, dtype=torch.float64, device=generator.device, generator=generator)


def inverse_cdf_draw(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Draw one token per row by inverting its cumulative distribution at a uniform number.

    One random number per row, so a row with its own generator costs one tiny draw from it
    (rows without share one vectorised draw), and its result does not depend on the batch. Sums
    run in float64 where they decide between tokens, so even tokens of tiny probability keep
    their share, and a token of probability 0 is never drawn."""
    num_rows, vocab = probs.shape
    uniform = torch.rand(num_rows, 1, dtype=torch.float64, device=probs.device)
    if generators:
        rows = torch.tensor(list(generators), device=probs.device)
        own = [draw_uniform(g) for g in generators.values()]
        uniform[rows] = torch.stack(own)
    pad = -vocab % _DRAW_BLOCK
    blocks = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = blocks.view(num_rows, -1, _DRAW_BLOCK)
    block_cdf = blocks.sum(dim=-1).to(torch.float64).cumsum(dim=-1)
    block, fraction = _invert(block_cdf, uniform)
    inner = blocks.gather(1, block.unsqueeze(2).expand(-1, -1, _DRAW_BLOCK)).squeeze(1)
    offset, _ = _invert(inner.to(torch.float64).cumsum(dim=-1), fraction)
    return (block * _DRAW_BLOCK + offset).squeeze(1).clamp_(max=vocab - 1)


def _invert(cdf: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the index i with ``cdf[i-1] <= u * total < cdf[i]`` (so its own mass is
    positive), and where in [0, 1) the point falls inside that index's mass."""
    total = cdf[:, -1:]
    point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    # The clamps only matter for a row with no possible token at all (NaN): no crash.
    index = torch.searchsorted(cdf, point, right=True).clamp_(max=cdf.shape[1] - 1)
    high = cdf.gather(1, index)
    low = torch.where(index > 0, cdf.gather(1, (index - 1).clamp_(min=0)), 0.0)
    return index, (point - low) / (high - low)


def with_listed(logprobs: torch.Tensor, entry: LogprobsEntry, listed: list[int]) -> LogprobsEntry:
    """``entry`` with the logprobs and ranks of the ``listed`` tokens (``logprob_token_ids``) in
    place of the best ones; ``logprobs``: the row's, [V]."""
    values = logprobs[torch.tensor(listed, device=logprobs.device)]
    ranks = (logprobs.unsqueeze(0) > values.unsqueeze(1)).sum(dim=-1) + 1
    top = list(zip(listed, values.tolist(), strict=True))
    return LogprobsEntry(entry.token_id, entry.logprob, entry.rank, top, ranks.tolist())


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]
) -> list[LogprobsEntry]:
    """Per row of ``logprobs`` ([N, V]): the logprob and rank of ``token_ids[row]`` and the
    ``num_top[row]`` best tokens. Works for any logprobs (prompt logprobs too)."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > chosen).sum(dim=-1, dtype=torch.int32) + 1
    top_values, top_ids = logprobs.topk(max(num_top), dim=-1)
    return [
        LogprobsEntry(
            token_id=t, logprob=lp, rank=rank, top=list(zip(ids[:n], values[:n], strict=True))
        )
        for t, lp, rank, ids, values, n in zip(
            token_ids.tolist(),
            chosen.squeeze(1).tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_values.tolist(),
            num_top,
            strict=True,
        )
    ]
