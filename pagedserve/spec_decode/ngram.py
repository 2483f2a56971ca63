"""Prompt lookup: draft tokens copied from where a sequence's latest n-gram occurred before, and
the check of those drafts against what the model samples at each of their positions."""

from __future__ import annotations

from weakref import WeakKeyDictionary

import numpy as np
import torch

from pagedserve.engine.request import Request
from pagedserve.sample.metadata import SamplingRow
from pagedserve.sample.sampler import draw_uniform
from pagedserve.spec_decode.config import SpeculativeConfig


def find_continuation(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed an earlier occurrence of the longest suffix of ``tokens``
    that is ``min_n`` to ``max_n`` tokens long; empty where no such suffix recurs.

    One vectorised pass per suffix length: ``ok[e]`` says whether the suffix's last ``t``
    tokens also end at position ``e`` (``e`` before the last position, so that a token follows).
    """
    length = len(tokens)
    if length <= min_n or k <= 0:
        return tokens[:0]
    body = tokens[:-1]
    ok = body == tokens[-1]
    end = -1
    for t in range(1, min(max_n, length - 1) + 1):
        if t > 1:
            ok[t - 1 :] &= body[: length - t] == tokens[length - t]
            ok[: t - 1] = False
        if t >= min_n:
            found = np.flatnonzero(ok)
            if not len(found):
                break
            # The latest occurrence with k tokens after it, else the earliest (the most after it)
            whole = found[found < length - k]
            end = int(whole[-1] if len(whole) else found[0])
        elif not ok.any():
            break
    if end < 0:
        return tokens[:0]
    return tokens[end + 1 : end + 1 + k]


# A sequence whose drafts all fail waits before it proposes again: 1, 2, 4 ... steps after
# consecutive misses, at most this many; a draft that stands ends the wait.
MAX_BACKOFF_STEPS = 16


class NgramSpeculator:
    """Proposes each decoding sequence's drafts for the next step and checks them after it.

    The check samples every position of a sequence's drafts (the position of its last known
    token, then one after each draft) as if the drafts before it were accepted: the same
    sampler, penalties and bans as without speculation. Drafts are accepted while each equals
    the token sampled at its position; the first token sampled where a draft differs, or after
    the last draft, follows them. Since a draft is one fixed token, accepting it exactly when
    the sample equals it draws every emitted token from the distribution the model gives there:
    greedy output is the same as without speculation, and sampled output has the same law.

    A seeded sampled sequence's generator draws once per position checked; after the check it
    is put back to where it stood before them and draws once per emitted token, so that ``seed``
    gives the answer it gives without speculation, whatever the step's budget or the other
    traffic let it check.

    A sequence whose drafts all fail proposes none for 1, then 2, 4 ... (at most
    ``MAX_BACKOFF_STEPS``) steps, until a draft stands again: rows that would be checked in vain
    cost arithmetic in every step they join (on 2 cores, 64 random-token prompts sampled with
    ``prompt_lookup_min`` 1: 624 and 636 output tok/s before, 676 and 647 with it).
    """

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.num_drafts = 0  # sequences whose drafts were checked
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # how often the draft at each position stood (it stands only if those before it did)
        self.accepted_per_pos = np.zeros(config.num_speculative_tokens, dtype=np.int64)
        # per sequence whose last checks all failed: [misses in a row, steps still to wait]
        self._backoff: WeakKeyDictionary[Request, list[int]] = WeakKeyDictionary()
        # per seeded sampled sequence being checked: its generator's state before the check
        self._draw_state: WeakKeyDictionary[Request, torch.Tensor] = WeakKeyDictionary()

    def propose(self, requests: list[Request], num_running: int) -> None:
        """Set the requests' drafts for their next step."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            for req in requests:
                req.spec_token_ids = []
            return
        for req in requests:
            self._propose(req)

    def _propose(self, req: Request) -> None:
        """None for a finished request, a grammar-constrained one (its grammar would have to
        take every draft before the model has checked it) or one with a thinking budget (which
        may force a token at any position)."""
        req.spec_token_ids = []
        if req.grammar is not None or req.thinking is not None or req.is_finished:
            return
        k = min(self.config.num_speculative_tokens, self.max_model_len - req.num_tokens - 1)
        if req.params.max_tokens is not None:
            k = min(k, req.params.max_tokens - req.num_output_tokens - 1)
        if k <= 0:
            return
        wait = self._backoff.get(req)
        if wait is not None and wait[1] > 0:
            wait[1] -= 1
            return
        tokens = np.fromiter(req.all_token_ids, np.int64, req.num_tokens)
        drafts = find_continuation(
            tokens, self.config.prompt_lookup_min, self.config.prompt_lookup_max, k
        )
        req.spec_token_ids = drafts.tolist()

    def stats(self) -> dict[str, int | tuple[int, ...]]:
        """The counters, by the names of :class:`EngineStats` (vLLM's metric names)."""
        return {
            "spec_decode_num_drafts": self.num_drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_num_accepted_tokens_per_pos": tuple(self.accepted_per_pos.tolist()),
        }

    def rows(self, req: Request) -> list[SamplingRow]:
        """One sampling row per position the request's drafts are checked at."""
        if req.generator is not None and not req.params.greedy:
            self._draw_state[req] = req.generator.get_state()
        drafts = req.spec_token_ids
        return [
            SamplingRow(
                req.params,
                req.prompt_token_ids,
                req.output_token_ids + drafts[:j] if j else req.output_token_ids,
                req.generator,
            )
            for j in range(len(drafts) + 1)
        ]

    def emitted(
        self, sequences: list[Request], spans: list[int], tokens: list[int], entries: list
    ) -> tuple[list[list[int]], list[list]]:
        """Per sequence, the tokens it emits and their logprobs entries, from the tokens sampled
        at its ``span`` rows (1 + its drafts; one row: the token it sampled)."""
        emitted, emitted_entries = [], []
        start = 0
        for req, span in zip(sequences, spans, strict=True):
            sampled = tokens[start : start + span]
            n = 1 + (self.accept(req, sampled) if span > 1 else 0)
            state = self._draw_state.pop(req, None)
            if state is not None and n < span:  # as if it had drawn for the emitted tokens only
                req.generator.set_state(state)
                for _ in range(n):
                    draw_uniform(req.generator)
            emitted.append(sampled[:n])
            emitted_entries.append(entries[start : start + n])
            start += span
        return emitted, emitted_entries

    def accept(self, req: Request, sampled: list[int]) -> int:
        """How many of the request's drafts stand, given the tokens sampled at their positions;
        the request's computed tokens drop the rejected drafts' K/V."""
        drafts = req.spec_token_ids
        accepted = 0
        while accepted < len(drafts) and sampled[accepted] == drafts[accepted]:
            accepted += 1
        req.num_computed_tokens -= len(drafts) - accepted
        self.num_drafts += 1
        self.num_draft_tokens += len(drafts)
        self.num_accepted_tokens += accepted
        self.accepted_per_pos[:accepted] += 1
        req.spec_token_ids = []
        if accepted:
            self._backoff.pop(req, None)
        else:
            wait = self._backoff.setdefault(req, [0, 0])
            wait[0] += 1
            wait[1] = min(2 ** (wait[0] - 1), MAX_BACKOFF_STEPS)
        return accepted
