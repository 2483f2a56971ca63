"""A reasoning model's thinking held to ``thinking_token_budget`` (vLLM's), and its
``reasoning_tokens`` counted: the tracker on its own, then through the engine on a tiny random
model whose thinking is set up by its prompt (random weights never write the markers)."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.reasoning_parsers import Thinking
from pagedserve.sample.sampler import Sampler, SamplingRow
from pagedserve.sample.thinking_budget import (
    ThinkingMarkers,
    ThinkingTracker,
    count_reasoning_tokens,
)

START, END = (1, 2), (3, 4)


def forced(tracker: ThinkingTracker, tokens: list[int]) -> int | None:
    tracker.advance(tokens)
    return tracker.forced_token()


def test_a_section_the_answer_opens_is_held_to_its_budget():
    markers = ThinkingMarkers(START, END, from_start=False)
    tracker = ThinkingTracker(markers, 2, prompt_token_ids=[7, 8])
    out = [9]
    assert forced(tracker, out) is None  # not thinking yet
    out += [1, 2, 10]
    assert forced(tracker, out) is None  # one token thought
    out += [11]
    assert forced(tracker, out) == 3  # two: the end marker, token by token
    out += [3]
    assert forced(tracker, out) == 4
    out += [4, 12]
    assert forced(tracker, out) is None  # answering
    out += [1, 2]
    assert forced(tracker, out) is None  # a new section gets the budget again
    out += [13, 14]
    assert forced(tracker, out) == 3


def test_thinking_in_the_prompt_counts_and_a_begun_marker_is_finished():
    markers = ThinkingMarkers(START, END, from_start=False)
    tracker = ThinkingTracker(markers, 3, prompt_token_ids=[7, 1, 2, 20, 21])
    assert forced(tracker, []) is None  # two of three thought in the prompt
    assert forced(tracker, [22]) == 3
    # the model began the marker itself as the budget ran out: it is finished, not restarted
    tracker = ThinkingTracker(markers, 3, prompt_token_ids=[1, 2, 20, 21])
    assert forced(tracker, [3]) == 4
    # a prompt whose thinking is closed (thinking turned off) does not think
    closed = ThinkingTracker(markers, 0, prompt_token_ids=[1, 2, 3, 4])
    assert forced(closed, []) is None


def test_a_template_that_opens_thinking_thinks_from_the_first_token():
    markers = ThinkingMarkers(START, END, from_start=True)
    assert forced(ThinkingTracker(markers, 0, prompt_token_ids=[7]), []) == 3
    tracker = ThinkingTracker(markers, 1, prompt_token_ids=[7])
    assert forced(tracker, [1, 2]) is None  # a leading start marker opens it again
    assert forced(tracker, [1, 2, 5]) == 3


def test_an_answer_a_grammar_holds_thinks_only_where_it_opens_with_the_marker():
    """A JSON schema's text is no thinking, whatever the template or the prompt opened, or a
    JSON string holds."""
    markers = ThinkingMarkers(START, END, from_start=True)
    tracker = ThinkingTracker(markers, 0, prompt_token_ids=[1, 2, 7], constrained=True)
    assert forced(tracker, [1, 2]) == 3  # it opens with the marker: it thinks
    tracker = ThinkingTracker(markers, 0, prompt_token_ids=[1, 2, 7], constrained=True)
    assert forced(tracker, [5, 6, 1, 2]) is None  # a marker inside it (in a JSON string)


@pytest.mark.parametrize(
    ("thinking", "tokens", "expected"),
    [
        (Thinking.OPENED, [1, 2, 5, 6, 3, 4, 8, 9], 2),
        (Thinking.OPENED, [9, 1, 2, 5, 3, 4], 1),  # whitespace before the marker
        (Thinking.OPENED, [1, 2, 5, 6, 7], 3),  # cut while thinking
        (Thinking.NONE, [8, 9, 1, 2, 5, 3, 4], 0),  # a marker within the content
        (Thinking.FROM_START, [5, 6, 3, 4, 8], 2),
        (Thinking.FROM_START, [5, 1, 2, 6, 3, 4], 4),  # a start marker inside the reasoning
    ],
)
def test_reasoning_tokens_leave_the_markers_out(thinking, tokens, expected):
    markers = ThinkingMarkers(START, END, from_start=False)
    assert count_reasoning_tokens(markers, tokens, thinking) == expected


@pytest.mark.parametrize(
    ("thinking", "tokens"),
    [
        (Thinking.OPENED, [1, 2, 5, 3, 4, 8, 1, 2, 6, 6, 3, 4, 9]),
        (Thinking.FROM_START, [5, 3, 4, 8, 1, 2, 6, 6, 3, 4, 9]),
    ],
)
def test_only_the_first_thinking_section_is_reasoning(thinking, tokens):
    """The split gives reasoning_content the first section only (the text after the first
    </think> is content): a later section's tokens were counted as reasoning too."""
    markers = ThinkingMarkers(START, END, from_start=False)
    assert count_reasoning_tokens(markers, tokens, thinking) == 1


def test_a_forked_sequence_keeps_its_own_count():
    tracker = ThinkingTracker(ThinkingMarkers(START, END, True), 2, [7])
    tracker.advance([5])
    child = tracker.copy()
    assert forced(tracker, [5, 6]) == 3
    assert child.forced_token() is None


@pytest.mark.parametrize("ban", ["bad_words", "min_tokens"])
def test_a_banned_marker_token_is_not_forced(ban):
    """A row whose forced token is banned (a bad word's end, a stop token below min_tokens)
    samples as if nothing were forced: forcing it left the row no token at all (an argmax over
    -inf everywhere, or NaN probabilities)."""
    params = SamplingParams(temperature=0, min_tokens=10 if ban == "min_tokens" else 0)
    if ban == "bad_words":
        params.bad_words_token_ids = [[3, 4]]
    else:
        params.stop_token_ids = [4]
    tracker = ThinkingTracker(ThinkingMarkers(START, END, from_start=True), 1, [7])
    row = SamplingRow(params, [7], [5, 3], thinking=tracker)
    logits = torch.arange(50, dtype=torch.float32).unsqueeze(0)
    assert Sampler(50, {0})(logits, [row]).token_ids == [49]


@pytest.mark.parametrize("budget", [1.5, True, -2, "4"])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="thinking_token_budget"):
        SamplingParams(thinking_token_budget=budget)


def test_minus_one_is_no_limit():
    assert SamplingParams(thinking_token_budget=-1).thinking_token_budget is None


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), reasoning_parser="deepseek_r1", kv_cache_memory=0.05)


def ids(llm, text):
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def generate(llm, prompt, n=1, **kwargs):
    params = SamplingParams(max_tokens=16, ignore_eos=True, n=n, seed=3, **kwargs)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_the_engine_forces_the_end_marker_after_the_budget(llm, budget):
    """deepseek_r1's template opens <think>: an answer thinks from its first token."""
    end = ids(llm, "</think>")
    free = generate(llm, "Hello", temperature=0)[0].token_ids
    held = generate(llm, "Hello", temperature=0, thinking_token_budget=budget)[0].token_ids
    assert held[:budget] == free[:budget]
    assert held[budget : budget + len(end)] == end
    assert len(held) == 16 and end[0] not in held[budget + len(end) :]


def test_prompt_thinking_counts_and_every_sampled_sequence_is_held(llm):
    end = ids(llm, "</think>")
    prompt = {"prompt_token_ids": [*ids(llm, "Hi"), *ids(llm, "<think>"), *ids(llm, " one two")]}
    thought = len(ids(llm, " one two"))
    outputs = generate(llm, prompt, n=3, temperature=1.0, thinking_token_budget=thought + 2)
    assert len({tuple(o.token_ids) for o in outputs}) == 3
    for o in outputs:
        assert o.token_ids[2 : 2 + len(end)] == end


def test_a_budget_does_not_force_the_marker_into_a_grammars_answer(llm):
    """deepseek_r1 thinks from the first token, but not in an answer a grammar holds: the end
    marker was forced into it (inside a tool call's JSON arguments, say)."""
    grammar = StructuredOutputsParams(regex="[^\n]{1,60}")
    free = generate(llm, "Hello", temperature=0, structured_outputs=grammar)
    held = generate(
        llm, "Hello", temperature=0, structured_outputs=grammar, thinking_token_budget=0
    )
    assert held == free


def test_drafts_do_not_get_past_the_budget(llm, tiny_model_dir):
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    spec = LLM(
        tiny_model_dir("llama"),
        reasoning_parser="deepseek_r1",
        kv_cache_memory=0.05,
        speculative_config=ngram,
    )
    prompt = "a b a b a b a b"
    for budget in (None, 3):
        plain = generate(llm, prompt, temperature=0, thinking_token_budget=budget)
        assert generate(spec, prompt, temperature=0, thinking_token_budget=budget) == plain


def test_a_budget_needs_a_reasoning_parser(tiny_model_dir):
    plain = LLM(tiny_model_dir("llama"), kv_cache_memory=0.05)
    with pytest.raises(ValueError, match="reasoning parser"):
        generate(plain, "Hello", thinking_token_budget=4)
    assert plain.llm_engine.get_stats().num_free_blocks == plain.llm_engine.num_blocks
