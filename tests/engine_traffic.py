"""Seeded random traffic for the engine chaos test (tests/test_engine_chaos.py): prompts that
share random prefixes, random lengths, parallel sampling, stops, and arrival steps."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

VOCAB_SIZE = 49152  # tests/tiny_models.py's


@dataclass
class PlannedRequest:
    """One request of the traffic: what it asks and at which engine step it arrives.

    ``stop_from_output`` asks the test to pick a stop (a token id or a piece of text) from what
    the request generates alone, so that the stop fires partway through."""

    request_id: str
    prompt: list[int]
    arrival_step: int
    max_tokens: int
    n: int = 1
    seed: int | None = None  # None: greedy; else sampled at temperature 0.8 with this seed
    stop_from_output: str | None = None  # "token" | "text" | None
    priority: int = 0  # lower first, where the engine schedules by priority
    params: dict = field(default_factory=dict)  # filled in by the test (stops)


def make_traffic(seed: int, num_requests: int = 16, max_prompt: int = 40) -> list[PlannedRequest]:
    """``num_requests`` requests, most of them on one of three shared prefixes (the prefix cache
    hits), some exact repeats of an earlier prompt, some a short pattern repeated, arriving over
    the first 30 steps."""
    rng = random.Random(seed)
    bases = [[rng.randrange(3, VOCAB_SIZE) for _ in range(24)] for _ in range(3)]
    planned: list[PlannedRequest] = []
    for i in range(num_requests):
        if planned and rng.random() < 0.15:
            prompt = list(rng.choice(planned).prompt)
        elif rng.random() < 0.25:  # a pattern repeated: n-gram speculation finds drafts
            unit = [rng.randrange(3, VOCAB_SIZE) for _ in range(rng.randrange(2, 6))]
            prompt = (unit * max_prompt)[: rng.randrange(8, max_prompt + 1)]
        else:
            shared = rng.choice([0, 4, 8, 13, 16, 21, 24])
            tail = rng.randrange(1 if shared else 2, max_prompt - shared + 1)
            prompt = rng.choice(bases)[:shared] + [
                rng.randrange(3, VOCAB_SIZE) for _ in range(tail)
            ]
            prompt = prompt[:max_prompt]
        kind = rng.random()
        req = PlannedRequest(
            request_id=f"s{seed}-r{i}",
            prompt=prompt,
            arrival_step=rng.randrange(0, 30),
            max_tokens=rng.randrange(1, 17),
            priority=rng.randrange(3),
        )
        if kind < 0.15:
            req.n = rng.choice([2, 3])
        elif kind < 0.4:  # sampled sequences of one prompt differ: each writes its own K/V
            req.seed, req.n = rng.randrange(1000), rng.choice([1, 2, 3])
        elif kind < 0.55:
            req.stop_from_output = "token"
        elif kind < 0.7:
            req.stop_from_output = "text"
        planned.append(req)
    planned.sort(key=lambda r: r.arrival_step)
    return planned
