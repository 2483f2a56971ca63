"""Sampler: processed distributions, draws that follow them, seeds, logprobs, batch invariance."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from pagedserve.sample.bad_words import bad_words_index, banned_next_tokens
from pagedserve.sample.logits_processors import apply_logits_processors
from pagedserve.sample.metadata import SamplingMetadata
from pagedserve.sample.sampler import (
    NO_TOKEN,
    Sampler,
    SamplingRow,
    inverse_cdf_draw,
    make_generator,
    sampling_probs,
)
from pagedserve.sampling_params import SamplingParams

V = 8
EOS = 7
CPU = torch.device("cpu")


def make_row(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    generator: torch.Generator | None = None,
    **params,
) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), prompt or [0], output or [], generator)


def processed(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    meta = SamplingMetadata.build(rows, logits.shape[1], {EOS}, CPU)
    return apply_logits_processors(logits.clone(), meta)


def base_logits() -> torch.Tensor:
    return torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


# Reference transforms on one row, in float64 numpy, written from the definitions.
def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_probs(
    logits: np.ndarray,
    temperature: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> np.ndarray:
    x = logits.astype(np.float64) / temperature
    p = softmax(x)
    if min_p > 0:
        x = np.where(p < min_p * p.max(), -np.inf, x)
    if top_k > 0:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x < kth, -np.inf, x)
    if top_p < 1.0:
        p = softmax(x)
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        drop = order[before >= top_p]
        x[drop] = -np.inf
    return softmax(x)


def draw_counts(logits: torch.Tensor, n: int, **params) -> np.ndarray:
    """Sample ``n`` rows of the same logits and params in one batch; counts per token."""
    torch.manual_seed(1234)
    rows = [make_row(**params) for _ in range(n)]
    out = Sampler(V, {EOS})(logits.expand(n, -1).clone(), rows)
    return np.bincount(out.token_ids, minlength=V)


def assert_follows(counts: np.ndarray, expected: np.ndarray) -> None:
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts}"
    n = counts.sum()
    result = chisquare(counts[support], expected[support] / expected.sum() * n)
    assert result.pvalue > 1e-3, f"observed {counts}, expected {expected * n}"


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1.0},
        {"temperature": 0.7},
        {"temperature": 1.5, "top_k": 3},
        {"temperature": 1.0, "top_p": 0.8},
        {"temperature": 0.9, "top_k": 5, "top_p": 0.7},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 2.0, "min_p": 0.1, "top_p": 0.9},
    ],
)
def test_draws_follow_processed_distribution(params):
    logits = base_logits()
    expected = reference_probs(logits.numpy(), **params)
    # The cut-offs must not sit on a float boundary, or the test would check rounding.
    assert_follows(draw_counts(logits, 20000, **params), expected)


def test_draws_follow_penalised_distribution():
    logits = base_logits()
    params = {
        "temperature": 1.0,
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.4,
        "presence_penalty": 0.3,
        "logit_bias": {6: 2.5},
    }
    prompt, output = [0, 5], [1, 1, 5]
    x = logits.numpy().astype(np.float64).copy()
    x[6] += 2.5
    for t in {0, 1, 5}:
        x[t] = x[t] / 1.3 if x[t] > 0 else x[t] * 1.3
    x[1] -= 0.4 * 2 + 0.3
    x[5] -= 0.4 * 1 + 0.3
    torch.manual_seed(99)
    n = 20000
    rows = [make_row(prompt, output, **params) for _ in range(n)]
    tokens = Sampler(V, {EOS})(logits.expand(n, -1).clone(), rows).token_ids
    assert_follows(np.bincount(tokens, minlength=V), softmax(x))


@pytest.mark.parametrize("scale", [0.3, 2.0, 6.0])
def test_top_k_top_p_on_a_large_vocabulary(scale):
    """Flat rows have nuclei beyond the first candidates the cut-off is searched in."""
    torch.manual_seed(8)
    vocab = 5000
    specs = [(0, 0.9), (0, 0.99), (40, 1.0), (600, 0.95), (300, 0.5), (0, 1.0), (1, 0.9)]
    logits = torch.randn(len(specs), vocab) * scale
    rows = [make_row(temperature=1.0, top_k=k, top_p=p) for k, p in specs]
    meta = SamplingMetadata.build(rows, vocab, {EOS}, CPU)
    probs = sampling_probs(logits.clone(), meta)
    for i, (k, p) in enumerate(specs):
        expected = reference_probs(logits[i].numpy(), top_k=k, top_p=p)
        assert np.array_equal(probs[i].numpy() > 0, expected > 0), (scale, k, p)
        np.testing.assert_allclose(probs[i].numpy(), expected, rtol=1e-4, atol=1e-7)


def test_draw_across_blocks_follows_probs_and_skips_zeros():
    vocab = 700  # not a multiple of the draw's block size
    support = [0, 5, 255, 256, 300, 511, 512, 699]
    weights = torch.tensor([1.0, 3.0, 0.5, 2.0, 1e-3, 4.0, 1.5, 2.5])
    probs = torch.zeros(vocab)
    probs[support] = weights / weights.sum()
    torch.manual_seed(21)
    n = 30000
    tokens = inverse_cdf_draw(probs.expand(n, -1).clone(), {})
    counts = np.bincount(tokens.numpy(), minlength=vocab)
    assert_follows(counts, probs.double().numpy())
    generator = torch.Generator().manual_seed(0)
    one_hot = torch.zeros(1, vocab)
    one_hot[0, 699] = 1.0
    assert all(inverse_cdf_draw(one_hot, {0: generator}).item() == 699 for _ in range(200))


def test_penalties_and_bias_change_logits_exactly():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0, 0.0, 3.0, -2.0]])
    prompt, output = [0, 1], [2, 2, 3, 4]

    rep = processed(logits, [make_row(prompt, output, repetition_penalty=2.0)])
    expected = [1.0, -2.0, 0.25, -1.0, 0.5, 0.0, 3.0, -2.0]  # tokens 0..4 seen
    torch.testing.assert_close(rep[0], torch.tensor(expected))

    freq = processed(logits, [make_row(prompt, output, frequency_penalty=0.5)])
    expected = [2.0, -1.0, 0.5 - 1.0, -0.5 - 0.5, 1.0 - 0.5, 0.0, 3.0, -2.0]  # output only
    torch.testing.assert_close(freq[0], torch.tensor(expected))

    pres = processed(logits, [make_row(prompt, output, presence_penalty=-0.5)])
    expected = [2.0, -1.0, 1.0, 0.0, 1.5, 0.0, 3.0, -2.0]
    torch.testing.assert_close(pres[0], torch.tensor(expected))

    bias = processed(logits, [make_row(prompt, output, logit_bias={1: 5.0, 7: -100.0})])
    expected = [2.0, 4.0, 0.5, -0.5, 1.0, 0.0, 3.0, -102.0]
    torch.testing.assert_close(bias[0], torch.tensor(expected))

    # All at once: bias first, then repetition, then frequency and presence.
    both = processed(
        logits,
        [
            make_row(
                prompt,
                output,
                logit_bias={1: 3.0},
                repetition_penalty=2.0,
                frequency_penalty=1.0,
                presence_penalty=0.5,
            )
        ],
    )
    expected = [1.0, 1.0, 0.25 - 2.5, -1.0 - 1.5, 0.5 - 1.5, 0.0, 3.0, -2.0]
    torch.testing.assert_close(both[0], torch.tensor(expected))


def test_processors_only_touch_their_rows():
    logits = torch.randn(4, V)
    rows = [
        make_row(),
        make_row([1], [2, 2], frequency_penalty=1.0),
        make_row(logit_bias={3: 1.0}),
        make_row(allowed_token_ids=[0, 1]),
    ]
    out = processed(logits, rows)
    torch.testing.assert_close(out[0], logits[0])
    expected = logits[1].clone()
    expected[2] -= 2.0
    torch.testing.assert_close(out[1], expected)
    expected = logits[2].clone()
    expected[3] += 1.0
    torch.testing.assert_close(out[2], expected)
    torch.testing.assert_close(out[3, :2], logits[3, :2])
    assert torch.isneginf(out[3, 2:]).all()


def test_allowed_token_ids():
    torch.manual_seed(0)
    n = 2000
    rows = [make_row(allowed_token_ids=[2, 5]) for _ in range(n)]
    tokens = Sampler(V, {EOS})(torch.randn(n, V), rows).token_ids
    assert set(tokens) == {2, 5}
    greedy = Sampler(V, {EOS})(
        base_logits()[None].clone(), [make_row(temperature=0, allowed_token_ids=[3, 6])]
    )
    assert greedy.token_ids == [3]


def test_constraints_that_leave_no_token_give_no_token():
    """allowed_token_ids all banned (here below min_tokens): NO_TOKEN, greedy or sampled, and
    the other rows as they are; the engine ends such a sequence with finish_reason error."""
    rows = [
        make_row(temperature=0, allowed_token_ids=[EOS], min_tokens=2),
        make_row(temperature=1.0, allowed_token_ids=[EOS], min_tokens=2, logprobs=1),
        make_row(temperature=0, allowed_token_ids=[3]),
    ]
    out = Sampler(V, {EOS})(base_logits().repeat(3, 1), rows)
    assert out.token_ids == [NO_TOKEN, NO_TOKEN, 3]


def test_min_tokens_masks_stop_tokens():
    logits = torch.zeros(1, V)
    logits[0, EOS] = 10.0
    logits[0, 4] = 9.0
    logits[0, 3] = 8.0
    sampler = Sampler(V, {EOS})

    def greedy(output: list[int], **params) -> int:
        return sampler(logits.clone(), [make_row([0], output, temperature=0, **params)]).token_ids[
            0
        ]

    assert greedy([1], min_tokens=3) == 4
    assert greedy([1], min_tokens=3, stop_token_ids=[4]) == 3
    assert greedy([1, 1, 1], min_tokens=3, stop_token_ids=[4]) == EOS
    assert greedy([1], min_tokens=0) == EOS
    # With ignore_eos the eos token does not stop the sequence, so it is not masked.
    assert greedy([1], min_tokens=3, ignore_eos=True) == EOS


def test_bad_words_ban_the_token_that_completes_them():
    logits = torch.zeros(1, V)
    logits[0, 4] = 10.0
    logits[0, 3] = 9.0
    logits[0, 2] = 8.0
    sampler = Sampler(V, {EOS})

    def greedy(output: list[int], words: list[list[int]]) -> int:
        row = make_row([3, 4], output, temperature=0, bad_words=["w"])
        row.params.bad_words_token_ids = words
        return sampler(logits.clone(), [row]).token_ids[0]

    assert greedy([], [[4]]) == 3  # a one-token word is never sampled
    assert greedy([1], [[1, 4]]) == 3  # the token that would complete the word
    assert greedy([1, 2], [[1, 4]]) == 4  # the word's start is not right before
    assert greedy([5, 1], [[5, 1, 4], [1, 3]]) == 2  # both end here
    assert greedy([], [[3, 4]]) == 4  # only generated tokens count, not the prompt's


def test_top_k_one_is_greedy():
    torch.manual_seed(3)
    logits = torch.randn(64, 1000)
    rows = [make_row(temperature=1.3, top_k=1) for _ in range(64)]
    out = Sampler(1000, {EOS})(logits.clone(), rows)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_is_argmax_after_penalties():
    logits = base_logits()[None].clone()
    row = make_row([0], [0], temperature=0, repetition_penalty=4.0)
    assert Sampler(V, {EOS})(logits, [row]).token_ids == [1]


def test_fixed_seed_reproduces():
    logits = torch.randn(1, 500)

    def run(seed: int, index: int = 0, steps: int = 20) -> list[int]:
        generator = make_generator(seed, CPU, index)
        sampler = Sampler(500, {EOS})
        row = make_row(generator=generator, temperature=1.0, top_p=0.95)
        return [sampler(logits.clone(), [row]).token_ids[0] for _ in range(steps)]

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, index=1) == run(8)  # sequence i of a request uses seed + i, as in vLLM
    assert make_generator(None, CPU) is None


def test_mixed_batch_matches_rows_alone():
    torch.manual_seed(11)
    logits = torch.randn(5, 300)
    specs = [
        ({"temperature": 0}, None),
        ({"temperature": 0.8, "top_k": 20}, 1),
        ({"temperature": 1.0, "repetition_penalty": 1.5, "frequency_penalty": 0.5}, 2),
        ({"temperature": 0, "presence_penalty": 1.0, "logit_bias": {4: 3.0}}, None),
        ({"temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "logprobs": 2}, 3),
    ]

    def rows_for(seed_offset: int) -> list[SamplingRow]:
        rows = []
        for params, seed in specs:
            generator = None if seed is None else make_generator(seed + seed_offset, CPU)
            rows.append(make_row([1, 2, 3], [4, 4, 5], generator, **params))
        return rows

    sampler = Sampler(300, {EOS})
    for step in range(5):
        batch = sampler(logits.clone(), rows_for(100 * step))
        alone = [
            sampler(logits[i : i + 1].clone(), [row]).token_ids[0]
            for i, row in enumerate(rows_for(100 * step))
        ]
        assert batch.token_ids == alone


def test_logprobs_are_raw_top_n_sorted_with_rank():
    torch.manual_seed(5)
    logits = torch.randn(3, 50)
    rows = [
        make_row(temperature=0.5, repetition_penalty=2.0, logit_bias={0: 50.0}, logprobs=5),
        make_row(temperature=0, logprobs=0),
        make_row(temperature=1.0),
    ]
    out = Sampler(50, {EOS})(logits.clone(), rows)
    raw = torch.log_softmax(logits, dim=-1)

    first = out.logprobs[0]
    assert first is not None and out.token_ids[0] == 0 == first.token_id  # biased to token 0
    assert first.logprob == pytest.approx(raw[0, 0].item())
    assert first.rank == int((raw[0] > raw[0, 0]).sum()) + 1
    assert len(first.top) == 5
    values = [lp for _, lp in first.top]
    assert values == sorted(values, reverse=True)
    expected = torch.topk(raw[0], 5)
    assert [t for t, _ in first.top] == expected.indices.tolist()
    assert values == pytest.approx(expected.values.tolist())

    second = out.logprobs[1]
    assert second is not None and second.top == []
    assert second.rank == 1 and second.token_id == out.token_ids[1] == int(logits[1].argmax())
    assert second.logprob == pytest.approx(raw[1].max().item())
    assert out.logprobs[2] is None

    # The same entries when every row of the batch wants logprobs.
    rows[2] = make_row(temperature=0, logprobs=1)
    again = Sampler(50, {EOS})(logits.clone(), rows).logprobs
    assert again[1] == second
    assert again[2] is not None and again[2].top == [(int(raw[2].argmax()), again[2].logprob)]


def test_logprob_token_ids_replace_the_best_with_the_listed():
    """vLLM's logprob_token_ids: the listed tokens' raw logprobs and true ranks, in their order,
    instead of the top-N (and with logprobs implied); the sampled token's entry is unchanged, and
    so are the other rows'."""
    torch.manual_seed(6)
    logits = torch.randn(3, 50)
    listed = [7, 2, 41]
    rows = [
        make_row(temperature=0, logprob_token_ids=listed),
        make_row(temperature=0, logprobs=3),
        make_row(temperature=0, logprobs=3, logprob_token_ids=[int(logits[2].argmin())]),
    ]
    assert rows[0].params.logprobs == 0
    out = Sampler(50, {EOS})(logits.clone(), rows)
    raw = torch.log_softmax(logits, dim=-1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == int(logits[0].argmax()) and first.rank == 1
    assert [t for t, _ in first.top] == listed
    assert [lp for _, lp in first.top] == pytest.approx(raw[0, listed].tolist())
    assert first.top_ranks == [int((raw[0] > raw[0, t]).sum()) + 1 for t in listed]
    assert out.logprobs[1] is not None and len(out.logprobs[1].top) == 3
    assert out.logprobs[1].top_ranks is None
    assert out.logprobs[2] is not None and out.logprobs[2].top_ranks == [50]
    with pytest.raises(ValueError, match="logprob_token_ids"):
        SamplingParams(logprob_token_ids=[])
    with pytest.raises(ValueError, match="logprob_token_ids"):
        SamplingParams(logprob_token_ids=list(range(129)))


def test_all_greedy_fast_path_and_padded_vocab():
    logits = torch.randn(6, 12)
    logits[:, 10:] = 100.0  # padding columns beyond the vocabulary are never sampled
    rows = [make_row(temperature=0) for _ in range(6)]
    out = Sampler(10, {EOS})(logits.clone(), rows)
    assert out.token_ids == logits[:, :10].argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 6


def test_random_rows_never_pick_impossible_tokens():
    torch.manual_seed(2)
    logits = torch.randn(256, 100)
    rows = [make_row(temperature=0.8, top_k=4) for _ in range(256)]
    out = Sampler(100, {EOS})(logits.clone(), rows)
    top4 = logits.topk(4, dim=-1).indices
    assert all(t in top4[i].tolist() for i, t in enumerate(out.token_ids))


def test_per_token_fields_are_built_once_per_request():
    """A request's logit_bias, allowed_token_ids, stop tokens (before min_tokens) and bad words
    are derived on its first step and reused after: rebuilt from 10,000 entries at every step
    they slowed the whole batch."""
    logits = torch.randn(3, V)
    shared = SamplingParams(
        logit_bias={1: 2.0, 4: -1.0, V + 5: 9.0},
        allowed_token_ids=[1, 2, 4, V],
        min_tokens=5,
        stop_token_ids=[2, V + 1],
        bad_words=["w"],
    )
    shared.bad_words_token_ids = [[3, 4], [5]]
    rows = [SamplingRow(shared, [0], [3]), make_row(), SamplingRow(shared, [0], [1])]
    first = processed(logits, rows)
    built = dict(shared.sampler_cache)
    assert set(built) == {"logit_bias", "allowed_token_ids", "stop_token_ids", "bad_words"}
    torch.testing.assert_close(processed(logits, rows), first)
    assert all(shared.sampler_cache[k] is v for k, v in built.items())
    expected = torch.full((2, V), float("-inf"))
    expected[1, 4] = logits[2, 4] - 1.0  # 1 is allowed and biased, 2 stops, 4 allowed
    expected[:, 1] = logits[[0, 2], 1] + 2.0  # after [3], 4 would complete the bad word
    torch.testing.assert_close(first[[0, 2]], expected)
    torch.testing.assert_close(first[1], logits[1])


def test_bad_words_index_bans_what_a_scan_of_every_word_bans():
    rng = random.Random(0)
    for _ in range(200):
        words = [[rng.randrange(4) for _ in range(rng.randint(1, 3))] for _ in range(6)]
        output = [rng.randrange(4) for _ in range(rng.randint(0, 5))]
        scanned = {w[-1] for w in words if len(w) - 1 <= len(output) and
                   output[len(output) - len(w) + 1 :] == w[:-1]}  # fmt: skip
        assert banned_next_tokens(bad_words_index(words), output) == scanned
