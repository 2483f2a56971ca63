"""Beam search (vLLM's ``LLM.beam_search`` and ``use_beam_search``): the beams transformers'
beam search finds, the search's bookkeeping on scripted logprobs, and the server's answers."""

from __future__ import annotations

import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, request
from tiny_models import tiny_hf_model

from pagedserve import LLM, BeamSearchParams, SamplingParams
from pagedserve.engine.beam_search import Beam, best, search
from pagedserve.outputs import Logprob

PROMPT = [5, 900, 17, 4000, 33]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), device="cpu", kv_cache_memory=0.02)


def test_the_beams_transformers_finds(llm):
    hf = tiny_hf_model("llama")
    with torch.inference_mode():
        theirs = hf.generate(
            torch.tensor([PROMPT]),
            num_beams=3,
            num_return_sequences=3,
            max_new_tokens=5,
            do_sample=False,
            early_stopping=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    (ours,) = llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(3, 5))
    assert [o.token_ids for o in ours.outputs] == [
        s[len(PROMPT) :].tolist() for s in theirs.sequences
    ]
    scores = [o.cumulative_logprob / 5 for o in ours.outputs]
    assert scores == pytest.approx(theirs.sequences_scores.tolist(), abs=1e-4)
    assert all(o.finish_reason == "length" for o in ours.outputs)


def test_width_one_is_greedy_and_prompts_share_steps(llm):
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": [44, 12, 9]}]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    beams = llm.beam_search(prompts, BeamSearchParams(1, 6, ignore_eos=True))
    assert [b.outputs[0].token_ids for b in beams] == [g.outputs[0].token_ids for g in greedy]
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.num_blocks


def test_a_text_prompt_is_tokenized_as_generate_does(llm):
    (out,) = llm.beam_search("Hello there", BeamSearchParams(2, 3, ignore_eos=True))
    (plain,) = llm.generate("Hello there", SamplingParams(max_tokens=1), use_tqdm=False)
    assert out.prompt == "Hello there" and out.prompt_token_ids == plain.prompt_token_ids
    assert [len(o.token_ids) for o in out.outputs] == [3, 3]


def _scripted(table: dict[tuple[int, ...], dict[int, float]], params, eos=frozenset({0})):
    """Run ``search`` where a beam's next-token logprobs come from ``table`` (by its tokens)."""
    steps = search([1, 2], params, set(eos))
    sequences = next(steps)
    try:
        while True:
            candidates = [
                {t: Logprob(lp) for t, lp in table[tuple(seq[2:])].items()} for seq in sequences
            ]
            sequences = steps.send(candidates)
    except StopIteration as done:
        return done.value


def test_finished_beams_are_kept_and_ranked_by_length_penalty():
    table = {
        (): {0: -0.5, 5: -0.7, 6: -0.9, 7: -3.0},
        (5,): {8: -0.1, 0: -2.0, 9: -2.5, 7: -4.0},
        (6,): {8: -0.2, 9: -0.3, 0: -3.0, 7: -4.0},
        (5, 8): {9: -0.1, 8: -0.2, 0: -5.0, 7: -6.0},
        (6, 8): {9: -0.1, 8: -0.2, 0: -5.0, 7: -6.0},
        (6, 9): {9: -0.1, 8: -0.2, 0: -5.0, 7: -6.0},
    }
    beams = _scripted(table, BeamSearchParams(2, 3))
    # "0" right away ends a beam of length 0 (counted 1): -0.5; the live ones after 3 tokens:
    # 5 8 9: -0.9 / 3 = -0.3, 5 8 8: -1.0 / 3; with no length penalty, -0.5 wins over -0.9.
    assert [b.tokens for b in beams] == [[5, 8, 9], [5, 8, 8]]
    assert [b.tokens for b in _scripted(table, BeamSearchParams(2, 3, length_penalty=0.0))] == [
        [0],
        [5, 8, 9],
    ]
    ignored = _scripted(table, BeamSearchParams(2, 1, ignore_eos=True))
    assert [b.tokens for b in ignored] == [[0], [5]] and not ignored[0].finished


def test_best_counts_the_generated_length_without_the_eos():
    beams = [Beam([3, 0], -1.0, finished=True), Beam([3, 4], -1.5)]
    # -1.5 / 2 beats -1.0 / 1 (it would lose to -1.0 / 2, were the eos counted).
    assert best(beams, BeamSearchParams(1, 2))[0].tokens == [3, 4]
    assert best(beams, BeamSearchParams(1, 2, length_penalty=0.0))[0].tokens == [3, 0]


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.02"]
    srv = ServerProcess(args).wait_ready()
    yield srv
    srv.close()


def test_served_beam_search_matches_offline(server, llm):
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 5,
        "n": 3,
        "use_beam_search": True,
        "ignore_eos": True,
    }
    status, response = request(server.url + "/v1/completions", "POST", body)
    assert status == 200, response
    (offline,) = llm.beam_search([{"prompt_token_ids": PROMPT}], BeamSearchParams(3, 5, True))
    assert [c["text"] for c in response["choices"]] == [o.text for o in offline.outputs]
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert response["usage"]["completion_tokens"] == 15

    chat = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "n": 2,
        "use_beam_search": True,
    }
    status, response = request(server.url + "/v1/chat/completions", "POST", chat)
    assert status == 200, response
    assert len(response["choices"]) == 2
    assert all(c["message"]["role"] == "assistant" for c in response["choices"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"stream": True}, "stream"),
        ({"logprobs": 0}, "logprobs"),
        ({"stop": ["x"]}, "stop"),
        ({"n": 11}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
    ],
)
def test_what_beam_search_does_not_honour_is_a_400(server, change, param):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "use_beam_search": True}
    status, response = request(server.url + "/v1/completions", "POST", {**body, **change})
    assert status == 400, response
    assert response["error"]["param"] == param
