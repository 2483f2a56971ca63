"""vLLM's ``repetition_detection``: an answer that ends in a pattern repeated ``min_count``
times stops there with ``finish_reason`` ``"repetition"``."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sample.repetition import RepetitionDetectionParams, ends_in_repetition


def params(max_size: int, count: int, min_size: int = 0) -> RepetitionDetectionParams:
    return RepetitionDetectionParams(max_size, min_size, count)


def test_a_pattern_repeated_min_count_times_at_the_end():
    assert ends_in_repetition([9, 1, 2, 1, 2, 1, 2], params(2, 3))
    assert not ends_in_repetition([9, 1, 2, 1, 2, 1, 3], params(2, 3))
    assert not ends_in_repetition([9, 1, 2, 1, 2], params(2, 3))  # twice only
    assert ends_in_repetition([5, 5, 5], params(3, 3))  # a pattern of 1 within the sizes
    assert not ends_in_repetition([5, 5, 5], params(3, 3, min_size=2))
    assert ends_in_repetition([7, 1, 2, 3, 1, 2, 3], params(4, 2, min_size=3))
    assert not ends_in_repetition([1, 1, 1, 1], params(0, 0))  # off


@pytest.mark.parametrize(
    "fields",
    [(3, 0, 1), (1, 2, 2), (-1, 0, 2), (2, 0, True), (2.5, 0, 2)],
)
def test_bad_settings_are_refused(fields):
    with pytest.raises(ValueError, match="repetition_detection"):
        RepetitionDetectionParams(*fields)


def test_the_engine_stops_a_looping_answer(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), kv_cache_memory=0.05)
    token = llm.get_tokenizer().encode(" the", add_special_tokens=False)[0]
    loop = {"temperature": 0, "max_tokens": 20, "logit_bias": {token: 100.0}}
    detect = params(2, 4)
    (out,) = llm.generate(["Hi"], SamplingParams(**loop, repetition_detection=detect))[0].outputs
    assert out.token_ids == [token] * 4
    assert (out.finish_reason, out.stop_reason) == ("repetition", "repetition_detected")
    held = SamplingParams(**loop, repetition_detection=detect, min_tokens=6)
    (out,) = llm.generate(["Hi"], held)[0].outputs
    assert len(out.token_ids) == 6 and out.finish_reason == "repetition"
    (free,) = llm.generate(["Hi"], SamplingParams(**loop))[0].outputs
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.num_blocks
