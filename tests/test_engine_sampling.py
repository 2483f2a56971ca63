"""Sampling parameters through the whole engine on the packaged model."""

import pytest

from pagedserve import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, kv_cache_memory=0.25)


PROMPT = "Write a short story about a robot who learns to paint."


def _gen(llm, params, prompt=PROMPT):
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs


def test_seed_reproduces_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, seed=1234)
    alone = _gen(llm, params)[0].token_ids
    again = _gen(llm, params)[0].token_ids
    crowd = llm.generate(
        [PROMPT, "Hello", PROMPT],
        [
            params,
            SamplingParams(temperature=1.0, max_tokens=30),
            SamplingParams(temperature=1.0, max_tokens=24, seed=99),
        ],
        use_tqdm=False,
    )
    assert alone == again == crowd[0].outputs[0].token_ids
    assert crowd[2].outputs[0].token_ids != alone


def test_top_k_1_is_greedy(llm):
    greedy = _gen(llm, SamplingParams(temperature=0, max_tokens=20))[0].token_ids
    top1 = _gen(llm, SamplingParams(temperature=0.9, top_k=1, max_tokens=20))[0].token_ids
    assert top1 == greedy


def test_stop_strings_cut_text(llm):
    full = _gen(llm, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0]
    words = full.text.split()
    stop = words[len(words) // 2]
    cut = _gen(llm, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    kept = _gen(
        llm,
        SamplingParams(
            temperature=0,
            max_tokens=40,
            ignore_eos=True,
            stop=stop,
            include_stop_str_in_output=True,
        ),
    )[0]
    assert kept.text == full.text[: full.text.index(stop) + len(stop)]


def test_stop_token_ids_and_max_tokens(llm):
    full = _gen(llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    target = full.token_ids[4]
    out = _gen(
        llm, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[target])
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_min_tokens_and_eos(llm):
    chat = [{"role": "user", "content": "Say just: yes"}]
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=50), use_tqdm=False)[0].outputs[
        0
    ]
    assert short.finish_reason == "stop" and short.stop_reason is None
    longer = llm.chat(
        chat,
        SamplingParams(temperature=0, max_tokens=50, min_tokens=len(short.token_ids) + 5),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(longer.token_ids) >= len(short.token_ids) + 5


def _contains(tokens: list[int], seq: list[int]) -> bool:
    return any(tokens[i : i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


def test_bad_words(llm):
    """vLLM's bad_words: the output never holds the token sequences that spell them, one token
    or several (a word with its punctuation, as " norm" then ",")."""
    greedy = {"temperature": 0, "max_tokens": 40, "ignore_eos": True}
    plain = _gen(llm, SamplingParams(**greedy))[0]
    tokenizer = llm.get_tokenizer()

    def num_tokens(word: str) -> int:
        return len(tokenizer.encode(" " + word, add_special_tokens=False))

    words = plain.text.split()
    one = next(w for w in words if w.isalpha() and len(w) > 3 and num_tokens(w) == 1)
    several = next(w for w in words if num_tokens(w) > 1)
    for word in (one, several):
        params = SamplingParams(**greedy, bad_words=[word])
        out = _gen(llm, params)[0]
        assert out.token_ids != plain.token_ids and params.bad_words_token_ids
        assert not any(_contains(out.token_ids, seq) for seq in params.bad_words_token_ids)
        assert word not in out.text.split()


def test_logprobs_shape(llm):
    out = _gen(llm, SamplingParams(temperature=0, max_tokens=5, logprobs=4, ignore_eos=True))[0]
    assert len(out.logprobs) == 5
    for tid, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert tid in entry and entry[tid].rank == 1  # greedy takes the top token
        assert len(entry) == 4
        ranks = sorted(lp.rank for lp in entry.values())
        assert ranks == [1, 2, 3, 4]
        assert all(isinstance(lp.decoded_token, str) for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs, strict=True))
    )


def test_bad_requests_are_refused_and_leave_nothing(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(ValueError, match="context length"):
        engine.add_request("y", [1] * (engine.max_model_len + 1), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("z", [1, 2, 3], SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="needs detokenize"):  # as vLLM: no text, no match
        SamplingParams(stop=["x"], detokenize=False)
    assert not engine.has_unfinished_requests()


def test_params_changed_between_calls_take_effect(llm):
    """The sampler builds a request's bias and allowed-token tensors once; a params object
    reused after a change to those fields gets them built from the new values."""
    params = SamplingParams(temperature=0, max_tokens=4, allowed_token_ids=[11, 12])
    assert set(_gen(llm, params)[0].token_ids) <= {11, 12}
    params.allowed_token_ids = [13]
    assert _gen(llm, params)[0].token_ids == [13] * 4
    params.allowed_token_ids = None
    params.logit_bias = {14: 100.0}
    assert _gen(llm, params)[0].token_ids == [14] * 4
