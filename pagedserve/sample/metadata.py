"""Per-step batch tensors for the sampler, built from the sampling rows' parameters.

Each feature gets tensors only when some row of the step uses it, so a batch of plain greedy rows
builds nothing at all. Per-token features (logit bias, allowed tokens, banned stop tokens) are kept
sparse or limited to the rows that use them: a dense ``[batch, vocab]`` tensor per feature would be
tens of MB per step for a large vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch

from pagedserve.sample.bad_words import BadWordsIndex, bad_words_index, banned_next_tokens
from pagedserve.sample.structured_output import LLMatcher, allowed_tokens
from pagedserve.sample.thinking_budget import ThinkingTracker
from pagedserve.sampling_params import SamplingParams

T = TypeVar("T")

if TYPE_CHECKING:
    from pagedserve.engine.request import Request


@dataclass
class SamplingRow:
    """One sequence that samples this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far, not including the token being sampled
    generator: torch.Generator | None = None  # per-sequence RNG; None = the global RNG
    grammar: LLMatcher | None = None  # structured output: only tokens it allows may come next
    thinking: ThinkingTracker | None = None  # a thinking budget: it may force the next token

    @classmethod
    def of(cls, seq: Request) -> SamplingRow:
        """The row of a running sequence."""
        return cls(
            seq.params,
            seq.prompt_token_ids,
            seq.output_token_ids,
            seq.generator,
            seq.grammar,
            seq.thinking,
        )


class TokenMask(NamedTuple):
    """Rows ``rows`` may only sample the tokens where ``allowed`` ([len(rows), V] bool) is True."""

    rows: torch.Tensor
    allowed: torch.Tensor


class SparseTokenValues(NamedTuple):
    """Per-(row, token) entries given as three flat tensors of the same length."""

    rows: torch.Tensor
    tokens: torch.Tensor
    values: torch.Tensor | None  # None where the entries carry no value (a ban)


class Penalties(NamedTuple):
    """Penalties as sparse (row, token) entries, one per distinct token of a row: building and
    applying them costs O(tokens of the penalised rows), not O(batch x vocabulary)."""

    repetition: SparseTokenValues | None  # tokens of prompt + output; values: the row's factor
    frequency_presence: SparseTokenValues | None  # output tokens; values: freq * count + presence


@dataclass
class SamplingMetadata:
    """Everything the sampler needs about one step's rows, as tensors on the logits' device."""

    num_rows: int
    all_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; only when the batch mixes greedy and sampled rows
    temperature: torch.Tensor | None  # [B]; 1.0 on greedy rows; None when no division is needed
    min_p: torch.Tensor | None  # [B]
    top_k: torch.Tensor | None  # [B] long; the vocabulary size where disabled
    max_top_k: int  # largest k of a row that uses top-k (kept on the host: no device sync)
    top_p: torch.Tensor | None  # [B]
    generators: dict[int, torch.Generator]  # sampled rows that draw from their own generator
    allowed: TokenMask | None
    logit_bias: SparseTokenValues | None
    banned: SparseTokenValues | None  # stop tokens until min_tokens are out; bad words' ends
    penalties: Penalties | None
    num_logprobs: list[int | None]

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        eos_token_ids: set[int],
        device: torch.device,
    ) -> SamplingMetadata:
        num_rows = len(rows)
        params = [r.params for r in rows]
        greedy = [p.greedy for p in params]
        all_greedy = all(greedy)
        sampled = [i for i, g in enumerate(greedy) if not g]

        def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        temperature = min_p = top_k = top_p = greedy_mask = None
        max_top_k = vocab_size
        generators: dict[int, torch.Generator] = {}
        if not all_greedy:
            if len(sampled) < num_rows:
                greedy_mask = per_row(greedy, torch.bool)
            # Greedy rows get neutral values so they never force a feature on.
            temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
            if any(t != 1.0 for t in temps):
                temperature = per_row(temps, torch.float32)
            min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
            if any(m > 0.0 for m in min_ps):
                min_p = per_row(min_ps, torch.float32)
            top_ks = [
                vocab_size if g or p.top_k <= 0 else min(p.top_k, vocab_size)
                for p, g in zip(params, greedy, strict=True)
            ]
            if any(k < vocab_size for k in top_ks):
                top_k = per_row(top_ks, torch.long)
                max_top_k = max(k for k in top_ks if k < vocab_size)
            top_ps = [1.0 if g else p.top_p for p, g in zip(params, greedy, strict=True)]
            if any(tp < 1.0 for tp in top_ps):
                top_p = per_row(top_ps, torch.float32)
            generators = {i: rows[i].generator for i in sampled if rows[i].generator is not None}

        return cls(
            num_rows=num_rows,
            all_greedy=all_greedy,
            greedy=greedy_mask,
            temperature=temperature,
            min_p=min_p,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            generators=generators,
            allowed=_allowed_tokens(rows, vocab_size, eos_token_ids, device),
            logit_bias=_logit_bias(params, vocab_size, device),
            banned=_banned(rows, vocab_size, eos_token_ids, device),
            penalties=_penalties(rows, vocab_size, device),
            num_logprobs=[p.logprobs for p in params],
        )


def _allowed_tokens(
    rows: list[SamplingRow], vocab_size: int, eos_token_ids: set[int], device: torch.device
) -> TokenMask | None:
    """Rows limited by ``allowed_token_ids``, by a grammar, by a thinking budget's forced token,
    or by several (then by all at once; a forced token that the others do not allow, or that
    is banned now, is not forced: the row would have no token left)."""
    listed = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
    forced = _forced_tokens(rows, eos_token_ids)
    if not listed and not constrained and not forced:
        return None
    limited = sorted(set(listed) | set(constrained) | set(forced))
    local = {row: j for j, row in enumerate(limited)}
    allowed = torch.ones(len(limited), vocab_size, dtype=torch.bool)
    if listed:
        lists = [_allowed_tensor(rows[i].params, vocab_size) for i in listed]
        in_list = torch.zeros(len(listed), vocab_size, dtype=torch.bool)
        which = torch.repeat_interleave(
            torch.arange(len(listed)), torch.tensor([len(x) for x in lists])
        )
        in_list[which, torch.cat(lists)] = True
        allowed[[local[i] for i in listed]] = in_list
    if constrained:
        grammar_rows = [local[i] for i in constrained]
        allowed[grammar_rows] &= allowed_tokens([rows[i].grammar for i in constrained], vocab_size)
    for i, token in forced.items():
        if 0 <= token < vocab_size and allowed[local[i], token]:
            allowed[local[i]] = False
            allowed[local[i], token] = True
    return TokenMask(torch.tensor(limited, device=device), allowed.to(device))


def _allowed_tensor(p: SamplingParams, vocab_size: int) -> torch.Tensor:
    """A row's allowed_token_ids inside the vocabulary (:func:`_per_request`)."""
    ids = p.allowed_token_ids or ()
    return _per_request(p, "allowed_token_ids", lambda: _in_vocabulary(ids, vocab_size))


def _forced_tokens(rows: list[SamplingRow], eos_token_ids: set[int]) -> dict[int, int]:
    """Row -> the token its thinking budget forces, for the rows whose budget forces one."""
    forced = {}
    for i, r in enumerate(rows):
        if r.thinking is not None:
            r.thinking.advance(r.output_token_ids)
            token = r.thinking.forced_token()
            if token is not None and token not in _banned_now(r, eos_token_ids):
                forced[i] = token
    return forced


def _logit_bias(
    params: list[SamplingParams], vocab_size: int, device: torch.device
) -> SparseTokenValues | None:
    biased = [(i, _bias_tensors(p, vocab_size)) for i, p in enumerate(params) if p.logit_bias]
    return _sparse([(i, tokens) for i, (tokens, _) in biased], device, [v for _, (_, v) in biased])


def _sparse(
    parts: list[tuple[int, torch.Tensor]],
    device: torch.device,
    values: list[torch.Tensor] | None = None,
) -> SparseTokenValues | None:
    """The (row, token ids) ``parts`` (and their ``values``) as flat tensors; None if empty."""
    if not any(len(tokens) for _, tokens in parts):
        return None
    counts = torch.tensor([len(tokens) for _, tokens in parts])
    rows = torch.repeat_interleave(torch.tensor([i for i, _ in parts]), counts)
    return SparseTokenValues(
        rows.to(device),
        torch.cat([tokens for _, tokens in parts]).to(device),
        None if values is None else torch.cat(values).to(device),
    )


def _bias_tensors(p: SamplingParams, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's logit_bias as (token ids, values) inside the vocabulary (:func:`_per_request`)."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        kept = {t: b for t, b in (p.logit_bias or {}).items() if 0 <= t < vocab_size}
        tokens = torch.tensor(list(kept), dtype=torch.long)
        return tokens, torch.tensor(list(kept.values()), dtype=torch.float32)

    return _per_request(p, "logit_bias", build)


def _banned(
    rows: list[SamplingRow], vocab_size: int, eos_token_ids: set[int], device: torch.device
) -> SparseTokenValues | None:
    """Tokens a row may not sample now (:func:`_banned_now`), the stop tokens as a tensor
    built once per request."""
    parts = []
    for i, r in enumerate(rows):
        p = r.params
        if len(r.output_token_ids) < p.min_tokens:
            parts.append((i, _stop_tensor(p, eos_token_ids, vocab_size)))
        if p.bad_words_token_ids:
            words = banned_next_tokens(_bad_words(p), r.output_token_ids)
            parts.append((i, _in_vocabulary(words, vocab_size)))
    return _sparse(parts, device)


def _banned_now(row: SamplingRow, eos_token_ids: set[int]) -> set[int]:
    """A row's stop tokens (eos unless ignore_eos, plus stop_token_ids) while it is below
    min_tokens, and the tokens that would complete a bad word."""
    p = row.params
    banned: set[int] = set()
    if len(row.output_token_ids) < p.min_tokens:
        banned |= _stop_ids(p, eos_token_ids)
    if p.bad_words_token_ids:
        banned |= banned_next_tokens(_bad_words(p), row.output_token_ids)
    return banned


def _stop_ids(p: SamplingParams, eos_token_ids: set[int]) -> set[int]:
    """The tokens that would stop a request (eos unless ignore_eos, plus stop_token_ids), which
    it may not sample below its min_tokens."""
    return set(p.stop_token_ids or ()) | (set() if p.ignore_eos else eos_token_ids)


def _stop_tensor(p: SamplingParams, eos_token_ids: set[int], vocab_size: int) -> torch.Tensor:
    return _per_request(
        p, "stop_token_ids", lambda: _in_vocabulary(_stop_ids(p, eos_token_ids), vocab_size)
    )


def _bad_words(p: SamplingParams) -> BadWordsIndex:
    return _per_request(p, "bad_words", lambda: bad_words_index(p.bad_words_token_ids))


def _in_vocabulary(ids: Iterable[int], vocab_size: int) -> torch.Tensor:
    return torch.tensor([t for t in ids if 0 <= t < vocab_size], dtype=torch.long)


def _per_request(p: SamplingParams, key: str, build: Callable[[], T]) -> T:
    """``build()`` once per request, kept in its params' ``sampler_cache``: what a request's
    per-token fields become, rebuilt at every step, costs tens of ms per row and step for the
    thousands of entries a client may send."""
    cached = p.sampler_cache.get(key)
    if cached is None:
        cached = p.sampler_cache[key] = build()
    return cached


def _penalties(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> Penalties | None:
    repetition = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    additive = [
        i
        for i, r in enumerate(rows)
        if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
    ]
    if not repetition and not additive:
        return None
    rep = freq_pres = None
    if repetition:
        token_lists = [
            chain(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in repetition
        ]
        lengths = [
            len(rows[i].prompt_token_ids) + len(rows[i].output_token_ids) for i in repetition
        ]
        row, token, _ = _distinct_tokens(repetition, token_lists, lengths, vocab_size, device)
        factors = torch.tensor(
            [rows[i].params.repetition_penalty for i in range(len(rows))], device=device
        )
        rep = SparseTokenValues(row, token, factors[row])
    if additive:
        token_lists = [rows[i].output_token_ids for i in additive]
        lengths = [len(t) for t in token_lists]
        row, token, count = _distinct_tokens(additive, token_lists, lengths, vocab_size, device)
        frequency, presence = torch.tensor(
            [[r.params.frequency_penalty, r.params.presence_penalty] for r in rows], device=device
        ).unbind(1)
        freq_pres = SparseTokenValues(row, token, frequency[row] * count + presence[row])
    return Penalties(rep, freq_pres)


def _distinct_tokens(
    row_ids: list[int], token_lists: list, lengths: list[int], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, token, count) of every distinct token of each listed row, from one flat tensor."""
    tokens = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    row = torch.repeat_interleave(
        torch.tensor(row_ids, device=device), torch.tensor(lengths, device=device)
    )
    keys, counts = torch.unique(row * vocab_size + tokens, return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts.to(torch.float32)
