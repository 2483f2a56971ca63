"""The API flags that set every request's defaults (vLLM's): ``--response-role``,
``--return-tokens-as-token-ids``, ``--enable-force-include-usage``,
``--default-chat-template-kwargs``, ``--override-generation-config``,
``--trust-request-chat-template``, ``--metrics-prefix``; the per-request
``stream_options.continuous_usage_stats`` and vLLM's older ``guided_*`` fields; ``GET /load``
and the dev-mode ``POST /reset_prefix_cache``."""

from __future__ import annotations

import json
import time

import pytest
from server_utils import MODEL_NAME, metrics, open_stream, request, templated_server

from pagedserve import LLM

TEMPLATE = (
    "{{ greeting }}|{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = templated_server(
        tmp_path_factory.mktemp("template"),
        tiny_model_dir("llama"),
        TEMPLATE,
        "--dtype", "float32",
        "--response-role", "bot",
        "--return-tokens-as-token-ids",
        "--enable-force-include-usage",
        "--default-chat-template-kwargs", '{"greeting": "Hello"}',
        "--override-generation-config", '{"max_new_tokens": 3, "temperature": 0}',
        "--enable-server-load-tracking",
        "--trust-request-chat-template",
        "--metrics-prefix", "vllm:",
        env={"VLLM_SERVER_DEV_MODE": "1"},
    )  # fmt: skip
    yield srv
    srv.close()


def post(server, path: str, body: dict):
    status, answer = request(server.url + path, "POST", {"model": MODEL_NAME, **body})
    assert status == 200, answer
    return answer


def stream(server, path: str, body: dict) -> list[dict]:
    """The parsed chunks of a streamed answer."""
    status, text = request(server.url + path, "POST", {"model": MODEL_NAME, "stream": True, **body})
    assert status == 200, text
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_role_defaults_and_template_kwargs(server, smollm2_tokenizer):
    answer = post(server, "/v1/chat/completions", {"messages": CHAT, "return_token_ids": True})
    assert answer["choices"][0]["message"]["role"] == "bot"
    assert answer["usage"]["completion_tokens"] == 3  # max_new_tokens from the override
    prompt = smollm2_tokenizer.decode(answer["prompt_token_ids"])
    assert prompt.startswith("Hello|<user>Tell me a story<assistant>")
    own = {"messages": CHAT, "chat_template_kwargs": {"greeting": "Hey"}, "return_token_ids": True}
    answer = post(server, "/v1/chat/completions", own)
    assert smollm2_tokenizer.decode(answer["prompt_token_ids"]).startswith("Hey|")
    partial = CHAT + [{"role": "assistant", "content": "Once"}]
    body = {"messages": partial, "add_generation_prompt": False, "continue_final_message": True}
    assert post(server, "/v1/chat/completions", body)["choices"][0]["message"]["role"] == (
        "assistant"  # the role of the message it continues
    )


def test_trusted_request_chat_template(server):
    """With --trust-request-chat-template a request's own template (and kwargs) render it."""
    template = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ flavour }}]{% endfor %}"
    body = {
        "messages": CHAT,
        "chat_template": template,
        "chat_template_kwargs": {"flavour": "mint"},
    }
    tokens = post(server, "/tokenize", body)["tokens"]
    text = post(server, "/detokenize", {"tokens": tokens})["prompt"]
    assert text == "[user|Tell me a story|mint]"


def test_logprobs_name_tokens_by_id(server):
    body = {"messages": CHAT, "logprobs": True, "top_logprobs": 2}
    content = post(server, "/v1/chat/completions", body)["choices"][0]["logprobs"]["content"]
    assert all(t["token"].startswith("token_id:") for t in content)
    assert all(a["token"].startswith("token_id:") for t in content for a in t["top_logprobs"])


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Once"})],
)
def test_streams_carry_usage(server, path, body):
    plain = stream(server, path, {**body, "max_tokens": 4, "ignore_eos": True})
    assert all(c["usage"] is None for c in plain[:-1])  # forced: the usage chunk comes last
    assert plain[-1]["choices"] == [] and plain[-1]["usage"]["completion_tokens"] == 4
    options = {"continuous_usage_stats": True}
    chunks = stream(server, path, {**body, "max_tokens": 4, "ignore_eos": True,
                                   "stream_options": options})  # fmt: skip
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4
    prompt = chunks[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    assert all(
        c["usage"]["total_tokens"] == prompt + n for c, n in zip(chunks[:-1], counts, strict=True)
    )


def test_legacy_guided_fields_constrain(server):
    body = {"prompt": "Is it?", "max_tokens": 5, "temperature": 1.0, "seed": 3}
    for seed in range(4):
        answer = post(
            server, "/v1/completions", {**body, "seed": seed, "guided_choice": ["yes", "no"]}
        )
        assert answer["choices"][0]["text"] in ("yes", "no")
    answer = post(server, "/v1/completions", {**body, "guided_regex": "[0-9]{3}", "max_tokens": 8})
    assert len(answer["choices"][0]["text"]) == 3 and answer["choices"][0]["text"].isdigit()
    both = {**body, "model": MODEL_NAME, "guided_regex": "a", "guided_choice": ["b"]}
    status, answer = request(server.url + "/v1/completions", "POST", both)
    assert status == 400 and answer["error"]["param"] == "guided_choice"


def test_override_generation_config_keys(tiny_model_dir):
    path = tiny_model_dir("llama")
    llm = LLM(path, override_generation_config={"temperature": 0.3, "max_new_tokens": 7})
    assert llm.llm_engine.generation_config.sampling_defaults == {
        "temperature": 0.3,
        "max_tokens": 7,
    }
    with pytest.raises(ValueError, match="do_sample not taken"):
        LLM(path, override_generation_config={"do_sample": True})


def test_load_counts_requests_in_flight(server):
    assert request(server.url + "/load")[1] == {"server_load": 0}
    # About 4 MB of chunks, more than the sockets hold: unread, the stream stays in flight.
    body = {"model": MODEL_NAME, "prompt": "Once", "max_tokens": 250, "ignore_eos": True}
    body |= {"n": 8, "logprobs": 20, "stream": True}
    conn, resp = open_stream(server.url, "/v1/completions", body)
    try:
        resp.readline()
        assert request(server.url + "/load")[1] == {"server_load": 1}
    finally:
        conn.close()  # the client goes away: the request is aborted
    deadline = time.monotonic() + 30
    while request(server.url + "/load")[1]["server_load"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert request(server.url + "/load")[1] == {"server_load": 0}


def test_reset_prefix_cache(server, tiny_model_dir):
    def cached() -> int:
        answer = post(server, "/v1/completions", {"prompt": "word " * 40})
        return answer["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached()
    assert cached() > 0
    assert request(server.url + "/reset_prefix_cache", "POST")[1] == {"success": True}
    assert cached() == 0
    llm = LLM(tiny_model_dir("llama"))
    llm.generate(["word " * 40], use_tqdm=False)
    assert llm.reset_prefix_cache()


def test_reasoning_effort_and_documents_reach_the_template(server):
    """OpenAI's reasoning_effort reaches the template (and "none" turns enable_thinking off,
    unless chat_template_kwargs say otherwise); vLLM's documents reach it too."""
    template = (
        "{{ reasoning_effort }}|{{ enable_thinking }}|"
        "{% for d in documents or [] %}[{{ d.title }}]{% endfor %}"
    )

    def rendered(**extra):
        body = {"messages": CHAT, "chat_template": template, "return_token_ids": True, **extra}
        ids = post(server, "/v1/chat/completions", body)["prompt_token_ids"]
        return post(server, "/detokenize", {"tokens": ids})

    assert rendered(reasoning_effort="none")["prompt"] == "none|False|"
    assert rendered(reasoning_effort="high")["prompt"] == "high|True|"
    kwargs = {"chat_template_kwargs": {"enable_thinking": True}}
    assert rendered(reasoning_effort="none", **kwargs)["prompt"] == "none|True|"
    docs = [{"title": "A", "text": "x"}, {"title": "B", "text": "y"}]
    assert rendered(documents=docs)["prompt"] == "||[A][B]"


def test_request_id_and_truncation_side(server):
    """vLLM's request_id names the answer (even when two requests share it); truncation_side
    "right" keeps a prompt's first truncate_prompt_tokens tokens."""
    ids = [post(server, "/v1/chat/completions", {"messages": CHAT, "request_id": "same"})["id"]
           for _ in range(2)]  # fmt: skip
    assert ids == ["chatcmpl-same", "chatcmpl-same"]
    status, answer = request(
        server.url + "/v1/chat/completions",
        "POST",
        {"model": MODEL_NAME, "messages": CHAT, "request_id": "body"},
        headers={"X-Request-Id": "header"},
    )
    assert status == 200 and answer["id"] == "chatcmpl-header"
    prompt = list(range(100, 110))
    body = {"prompt": prompt, "truncate_prompt_tokens": 3, "return_token_ids": True}
    answer = post(server, "/v1/completions", {**body, "request_id": "r1"})
    assert answer["id"] == "cmpl-r1" and answer["choices"][0]["prompt_token_ids"] == prompt[-3:]
    answer = post(server, "/v1/completions", {**body, "truncation_side": "right"})
    assert answer["choices"][0]["prompt_token_ids"] == prompt[:3]


def test_metrics_under_vllms_names(server):
    post(server, "/v1/completions", {"prompt": "Once"})
    m = metrics(server.url)
    assert m["vllm:generation_tokens_total"] > 0 and "vllm:num_requests_running" in m
    assert not any(name.startswith("pagedserve:") for name in m)
