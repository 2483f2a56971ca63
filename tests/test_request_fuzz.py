"""Seeded bad requests on every generating endpoint (see ``request_fuzz``): each is answered with
a status the API promises (never a 500 or a hang), errors in the endpoint's schema, streams that
end properly; bad requests sent together do not disturb good ones, and no KV block is left in
use afterwards. The server runs a tiny random model (errors do not need a real one)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from request_fuzz import ENDPOINTS, MODEL, Case, make_case, problem, send
from server_utils import request, role_template_server, wait_until_idle

MAX_LEN = 256
SEEDS = 80  # per endpoint, sent one after another
CONCURRENT_SEEDS = range(1000, 1020)  # per endpoint, sent together beside good requests
GOOD = {
    "model": MODEL,
    "prompt": "Once upon a time",
    "max_tokens": 48,
    "temperature": 0,
    "ignore_eos": True,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = role_template_server(
        tmp_path_factory,
        tiny_model_dir("llama"),
        "--max-model-len", str(MAX_LEN),
        "--kv-cache-memory", "0.25",
    )  # fmt: skip
    yield srv
    srv.close()


def check(url: str, case: Case) -> str | None:
    try:
        status, raw = send(url, case)
    except (OSError, TimeoutError) as exc:
        return f"{case}: no answer ({exc!r})"
    found = problem(case, status, raw)
    return None if found is None else f"{case}: {found}"


@pytest.mark.parametrize("endpoint", sorted(ENDPOINTS))
def test_bad_requests_get_clear_answers(server, endpoint):
    failures = [check(server.url, make_case(endpoint, seed)) for seed in range(SEEDS)]
    assert [f for f in failures if f] == []


def test_bad_requests_together_do_not_disturb_good_ones(server):
    status, expected = request(server.url + "/v1/completions", "POST", GOOD)
    assert status == 200
    bad = [make_case(e, seed) for seed in CONCURRENT_SEEDS for e in sorted(ENDPOINTS)]

    def run(item: Case | None) -> tuple[str | None, Any]:
        if item is None:  # a good request, among the bad ones
            return None, request(server.url + "/v1/completions", "POST", GOOD)
        return check(server.url, item), None

    items: list[Case | None] = list(bad)
    for i in range(0, len(items), len(items) // 6):
        items.insert(i, None)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, items))
    assert [failure for failure, _ in results if failure] == []
    good = [answer for item, (_, answer) in zip(items, results, strict=True) if item is None]
    texts = [(status, answer["choices"][0]["text"]) for status, answer in good]
    assert texts == [(200, expected["choices"][0]["text"])] * len(good)


def test_the_server_serves_and_holds_no_blocks_after_the_fuzz(server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    status, answer = request(server.url + "/v1/chat/completions", "POST", chat)
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:num_requests_waiting"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    assert "Traceback" not in server.output()


# What the fuzz found, each kept as a case of its own.
def post_raw(server, path: str, text: str) -> tuple[int, dict]:
    status, raw = send(server.url, Case("regression", path, text.encode(), []))
    return status, json.loads(raw)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_nan_logit_bias_is_400(server, path):
    """NaN was clamped into -100 (a silent ban of the token) and answered 200."""
    head = '"messages": [{"role": "user", "content": "hi"}]' if "chat" in path else '"prompt": "hi"'
    status, body = post_raw(
        server, path, f'{{{head}, "max_tokens": 2, "logit_bias": {{"5": NaN}}}}'
    )
    assert status == 400, body
    assert body["error"]["param"] == "logit_bias"


@pytest.mark.parametrize(
    "constraint",
    [
        {"structured_outputs": {"regex": "ab\\"}},
        {"guided_regex": "\\d\\"},
        {"structured_outputs": {"json": {"type": "string", "pattern": "a\\"}}},
        {"structured_outputs": {"json": {"patternProperties": {"x\\": {}}}}},
        {
            "structured_outputs": {
                "structural_tag": {
                    "triggers": ["<f"],
                    "structures": [
                        {
                            "begin": "<f>",
                            "schema": {"type": "string", "pattern": "a\\"},
                            "end": "</f>",
                        }
                    ],
                }
            }
        },
    ],
)
def test_a_regex_ending_in_a_lone_backslash_is_400(server, constraint):
    """The grammar engine dropped the backslash: ``ab\\`` constrained the answer to ``ab``."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **constraint}
    status, answer = request(server.url + "/v1/completions", "POST", body)
    assert status == 400, answer
    assert answer["error"]["param"] == "structured_outputs"  # guided_regex's too, as it is one
    assert "lone backslash" in answer["error"]["message"]


def test_an_escaped_backslash_ending_a_regex_is_kept(server):
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 4,
        "structured_outputs": {"regex": "a\\\\"},
    }
    status, answer = request(server.url + "/v1/completions", "POST", body)
    assert status == 200, answer
    assert answer["choices"][0]["text"] == "a\\"


def test_a_responses_stream_whose_constraint_fails_ends_in_an_error_event(server):
    """It ended with ``response.completed`` (status completed) over the cut text, where the
    same request unstreamed is a 400."""
    body = {
        "model": MODEL,
        "input": "hi",
        "max_output_tokens": 4,
        "temperature": 0,
        "structured_outputs": {"regex": "a{1000000}"},
    }
    assert request(server.url + "/v1/responses", "POST", body)[0] == 400
    status, text = request(server.url + "/v1/responses", "POST", {**body, "stream": True})
    assert status == 200
    kinds = [json.loads(line[5:])["type"] for line in text.splitlines() if line.startswith("data:")]
    assert kinds[-1] == "error" and "response.completed" not in kinds
    # In the background, the stored response fails with the same message as the error event.
    status, text = request(
        server.url + "/v1/responses", "POST", {**body, "stream": True, "background": True}
    )
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert status == 200 and events[-1]["type"] == "error"
    status, stored = request(server.url + f"/v1/responses/{events[0]['response']['id']}", "GET")
    assert status == 200 and stored["status"] == "failed"
    assert stored["error"]["message"] == events[-1]["message"]


def test_a_bad_prompt_logprobs_beside_echoed_logprobs_is_400(server):
    """With echo and logprobs the larger of the two counts was computed, and a negative
    prompt_logprobs passed unchecked."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": True, "logprobs": 2}
    status, answer = request(
        server.url + "/v1/completions", "POST", {**body, "prompt_logprobs": -5}
    )
    assert status == 400, answer
    assert answer["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("include", [["x"], ["message.output_text.logprob"]])
def test_an_unknown_responses_include_is_400(server, include):
    """It was ignored: a misspelt logprobs include gave an answer without logprobs."""
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, "include": include}
    status, answer = request(server.url + "/v1/responses", "POST", body)
    assert status == 400, answer
    assert answer["error"]["param"] == "include"
