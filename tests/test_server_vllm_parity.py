"""vLLM 0.32's request fields on /v1/chat/completions and /v1/completions, end to end through the
``openai`` client's ``extra_body``: the ones honoured here (``stream_interval``,
``return_prompt_text``, an assistant message's earlier ``reasoning``, the sampling extras), the
ones accepted as the no-ops they are on a server like this one, and the ones refused with a 400
naming them because this server cannot do what they ask. ``cache_salt`` and the
``X-Vllm-Priority`` header are checked on the Responses and Messages APIs too."""

from __future__ import annotations

import math

import openai
import pytest
from pydantic import ValidationError
from server_utils import CHAT, MODEL_NAME, greedy_chat, greedy_completion, request, templated_server

from pagedserve.entrypoints.openai.embeddings_protocol import EmbeddingRequest, ScoreRequest
from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.entrypoints.openai.priority import MAX_PRIORITY, MIN_PRIORITY
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.entrypoints.openai.responses_protocol import ResponsesRequest
from pagedserve.entrypoints.openai.serving_base import header_priority
from pagedserve.entrypoints.openai.stream_interval import StreamGate
from pagedserve.entrypoints.openai.whole_vocabulary import resolve_whole_vocabulary
from pagedserve.outputs import CompletionOutput, RequestOutput

# Writes each message as <role>content, and an assistant's earlier thinking under both names.
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.reasoning is defined %}[{{ m.reasoning }}|{{ m.reasoning_content }}]{% endif %}"
    "{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)

INERT = {
    "watermarking": True,
    "session_id": "session-1",
    "vllm_xargs": {"label": "a", "weights": [1, 2.5, "x"]},
    "routed_experts_prompt_start": 2,
    "return_token_offsets": True,
    "mm_payload": "none",
    "return_mm_kwargs": False,
    "kv_transfer_params": {},
    "ec_transfer_params": None,
    "logprob_token_ids": [],  # an empty list: not given
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = templated_server(
        tmp_path_factory.mktemp("template"),
        tiny_model_dir("llama"),
        TEMPLATE,
        "--dtype", "float32",
        "--max-logprobs", "-1",
    )  # fmt: skip
    yield srv
    srv.close()


def test_inert_fields_change_nothing(client):
    """What vLLM too ignores on a server with no watermark, KV events, extensions or media: the
    answer is the one without them."""
    plain = greedy_completion(client, max_tokens=8, extra_body={"ignore_eos": True})
    given = greedy_completion(client, max_tokens=8, extra_body={**INERT, "ignore_eos": True})
    assert given.choices[0].text == plain.choices[0].text
    media = {"media_io_kwargs": {"image": {"size": 1}}, "mm_processor_kwargs": {"crop": True}}
    plain = greedy_chat(client, max_tokens=8, extra_body={"ignore_eos": True})
    given = greedy_chat(client, max_tokens=8, extra_body={**INERT, **media, "ignore_eos": True})
    assert given.choices[0].message.content == plain.choices[0].message.content


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_transfer_params", {"do_remote_decode": True}),
        ("ec_transfer_params", {"do_remote_encode": True}),
        ("stream_interval", 0),
        ("routed_experts_prompt_start", -1),
        ("vllm_xargs", {"nested": {"no": 1}}),
    ],
)
def test_what_cannot_run_is_refused(client, field, value):
    """A 400 naming the field, on both endpoints, where this server cannot do what it asks."""
    extra = {"extra_body": {field: value}}
    with pytest.raises(openai.BadRequestError) as chat_error:
        greedy_chat(client, max_tokens=2, logprobs=True, **extra)
    with pytest.raises(openai.BadRequestError) as completion_error:
        greedy_completion(client, max_tokens=2, logprobs=1, **extra)
    for error in (chat_error.value, completion_error.value):
        assert error.body["param"] == field and field in error.body["message"]


def test_logprob_token_ids(client):
    """At each position the listed tokens' logprobs (and the sampled one's) in place of the best
    ones: the same values the best ones have where they are the same tokens."""
    as_ids = {"return_tokens_as_token_ids": True}
    best = greedy_chat(client, max_tokens=3, logprobs=True, top_logprobs=3, extra_body=as_ids)
    first = best.choices[0].logprobs.content[0]
    top = {t.token: t.logprob for t in first.top_logprobs}
    listed = [int(t.removeprefix("token_id:")) for t in top][1:] + [300]
    extra = {**as_ids, "logprob_token_ids": listed}
    chat = greedy_chat(client, max_tokens=3, logprobs=True, extra_body=extra)
    assert chat.choices[0].message.content == best.choices[0].message.content
    for entry in chat.choices[0].logprobs.content:
        shown = [t.token for t in entry.top_logprobs]
        assert shown[0] == entry.token and set(shown[1:]) <= {f"token_id:{t}" for t in listed}
        assert set(shown) >= {f"token_id:{t}" for t in listed}
    shown = {t.token: t.logprob for t in chat.choices[0].logprobs.content[0].top_logprobs}
    for token in list(top)[1:]:
        assert shown[token] == pytest.approx(top[token], abs=1e-4)
    assert shown["token_id:300"] <= min(top.values())
    completion = greedy_completion(client, max_tokens=3, logprobs=0, extra_body=extra)
    for token, alternatives in zip(
        completion.choices[0].logprobs.tokens,
        completion.choices[0].logprobs.top_logprobs,
        strict=True,
    ):
        assert set(alternatives) == {token} | {f"token_id:{t}" for t in listed}


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ({"logprob_token_ids": [1]}, "needs logprobs"),
        ({"logprob_token_ids": [1], "logprobs": True, "use_beam_search": True}, "beam"),
        ({"logprob_token_ids": [1], "logprobs": 1, "echo": True, "max_tokens": 0}, "echo"),
        ({"logprob_token_ids": [10**7], "logprobs": True}, "vocabulary"),
        ({"logprob_token_ids": list(range(129)), "logprobs": True}, "1 to 128"),
    ],
)
def test_logprob_token_ids_errors(server, extra, why):
    """A 400 naming the field (the echo case on completions, the others on chat)."""
    if "echo" in extra:
        path, body = "/v1/completions", {"prompt": "Hi", **extra}
    else:
        path, body = "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **extra}
    status, answer = request(server.url + path, "POST", {"model": MODEL_NAME, **body})
    assert status == 400, answer
    assert answer["error"]["param"] == "logprob_token_ids" and why in answer["error"]["message"]


def test_minus_one_is_the_whole_vocabulary(client):
    """vLLM's -1 for top_logprobs, logprobs and prompt_logprobs, on a server started with
    --max-logprobs -1: every token's logprob, which together make the whole distribution."""
    chat = greedy_chat(client, max_tokens=1, logprobs=True, top_logprobs=-1)
    alternatives = chat.choices[0].logprobs.content[0].top_logprobs
    assert len(alternatives) > 1000
    assert sum(math.exp(a.logprob) for a in alternatives) == pytest.approx(1.0, abs=1e-3)
    extra = {"prompt_logprobs": -1, "return_tokens_as_token_ids": True}  # keys unique by id
    completion = greedy_completion(
        client, prompt=[5, 6], max_tokens=1, logprobs=-1, extra_body=extra
    )
    (top,) = completion.choices[0].logprobs.top_logprobs
    assert len(top) > 1000
    assert sum(math.exp(v) for v in top.values()) == pytest.approx(1.0, abs=1e-3)
    prompt_entries = completion.choices[0].model_extra["prompt_logprobs"]
    assert prompt_entries[0] is None and len(prompt_entries[1]) == len(alternatives)


def test_minus_one_needs_the_server_flag():
    """Where the server returns fewer alternatives, -1 is a 400 that names the field."""
    req = ChatCompletionRequest.model_validate(
        {"messages": CHAT, "logprobs": True, "top_logprobs": -1}
    )
    with pytest.raises(APIError) as error:
        resolve_whole_vocabulary(req, 1000, 20)
    assert error.value.param == "top_logprobs" and "--max-logprobs -1" in error.value.message
    resolve_whole_vocabulary(req, 1000, 1024)
    assert req.top_logprobs == 1024


# A small request on each endpoint that takes a priority (a background response too).
PRIORITY_REQUESTS = (
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2, "background": True}),
)


def test_priority_header(server):
    """vLLM's X-Vllm-Priority header stands for the body's priority on chat, completions and the
    Responses API: on this first-come server a non-zero one is refused as the field would be
    (a background response too, at once); one that is not an integer is ignored."""
    for path, body in PRIORITY_REQUESTS:
        body = {"model": MODEL_NAME, **body}
        status, answer = request(server.url + path, "POST", body, {"X-Vllm-Priority": "5"})
        assert status == 400 and answer["error"]["param"] == "priority"
        status, _ = request(server.url + path, "POST", body, {"X-Vllm-Priority": "high"})
        assert status == 200
        status, _ = request(
            server.url + path, "POST", {**body, "priority": 3}, {"X-Vllm-Priority": "0"}
        )
        assert status == 200


@pytest.mark.parametrize("priority", [MAX_PRIORITY + 1, MIN_PRIORITY - 1, 10**40])
def test_priority_outside_64_bits_is_refused(server, priority):
    """vLLM holds ``priority`` to a signed 64-bit integer: beyond it, in the body or the
    X-Vllm-Priority header, a 400 naming ``priority`` and the bound, not the first-come 400."""
    bound = str(MAX_PRIORITY if priority > 0 else MIN_PRIORITY)
    for path, body in PRIORITY_REQUESTS:
        body = {"model": MODEL_NAME, **body}
        for sent, headers in (
            ({**body, "priority": priority}, None),
            (body, {"X-Vllm-Priority": str(priority)}),
        ):
            status, answer = request(server.url + path, "POST", sent, headers)
            assert status == 400 and answer["error"]["param"] == "priority", (path, answer)
            assert bound in answer["error"]["message"]


def test_priority_at_the_64_bit_bounds_is_taken():
    """The bounds themselves are valid priorities (for a server started with priority
    scheduling), in the body and in the header."""
    for priority in (MIN_PRIORITY, MAX_PRIORITY):
        assert ChatCompletionRequest(messages=CHAT, priority=priority).priority == priority
        assert CompletionRequest(prompt="Hi", priority=priority).priority == priority
        assert ResponsesRequest(input="Hi", priority=priority).priority == priority
        assert header_priority({"x-vllm-priority": str(priority)}, 0) == priority
        assert ScoreRequest(text_1="a", text_2="b", priority=priority).priority == priority
    with pytest.raises(ValidationError):  # the pooling bodies are bounded as vLLM's are
        EmbeddingRequest(input="a", priority=MAX_PRIORITY + 1)


@pytest.mark.parametrize("salt", ["", "s" * 129, "user@example", "a/b", "a\\b", "a\x00b"], ids=repr)
def test_cache_salt_outside_the_rule_is_refused(client, salt):
    """vLLM's rule for ``cache_salt`` (1 to 128 characters, no '@', '/', '\\' or NUL): a salt
    outside it is a 400 naming it on chat, completions and the Responses API."""
    extra = {"extra_body": {"cache_salt": salt}}
    errors = []
    for call in (
        lambda: greedy_chat(client, max_tokens=2, **extra),
        lambda: greedy_completion(client, max_tokens=2, **extra),
        lambda: client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=2, **extra),
    ):
        with pytest.raises(openai.BadRequestError) as error:
            call()
        errors.append(error.value)
    assert all(error.body["param"] == "cache_salt" for error in errors)


def test_cache_salt_within_the_rule_is_served(client):
    """The longest salt allowed, of characters other than the forbidden ones, is served."""
    extra = {"extra_body": {"cache_salt": "k-ÿ:é" + "s" * 123}}
    assert greedy_chat(client, max_tokens=2, **extra).choices[0].message.content is not None
    assert greedy_completion(client, max_tokens=2, **extra).choices[0].text is not None
    answer = client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=2, **extra)
    assert answer.status in ("completed", "incomplete")


@pytest.mark.parametrize("choice", [None, "none", "auto", "required"])
def test_empty_tools_are_refused_on_chat(client, choice):
    """``tools: []`` on chat is a 400 naming ``tools``, whatever ``tool_choice`` says, as in
    vLLM (and OpenAI)."""
    extra = {} if choice is None else {"tool_choice": choice}
    with pytest.raises(openai.BadRequestError) as error:
        greedy_chat(client, max_tokens=2, tools=[], **extra)
    assert error.value.body["param"] == "tools"


def test_empty_tools_elsewhere_are_no_tools(server, client):
    """Where vLLM takes ``tools: []`` as no tools, so does this server: the Messages API and the
    Responses API."""
    body = {"model": MODEL_NAME, "max_tokens": 2, "tools": [], "messages": CHAT}
    status, answer = request(server.url + "/v1/messages", "POST", body)
    assert status == 200, answer
    answer = client.responses.create(model=MODEL_NAME, input="Hi", max_output_tokens=2, tools=[])
    assert answer.status in ("completed", "incomplete")


def test_prompt_embeds_is_refused(server):
    """Embeddings in place of a prompt: a 400 naming ``prompt_embeds``, not one about the
    missing ``prompt``."""
    for body in ({"prompt_embeds": "AAAA"}, {"prompt": "Hi", "prompt_embeds": ["AAAA"]}):
        status, answer = request(
            server.url + "/v1/completions", "POST", {"model": MODEL_NAME, **body}
        )
        assert status == 400 and answer["error"]["param"] == "prompt_embeds"


def _output(*choices: tuple[int, str | None]) -> RequestOutput:
    """An engine output whose choice ``i`` has ``choices[i]`` (tokens so far, finish reason)."""
    outputs = [
        CompletionOutput(i, "", list(range(n)), None, None, finish)
        for i, (n, finish) in enumerate(choices)
    ]
    return RequestOutput("r", None, [0], outputs, all(f for _, f in choices))


def test_stream_gate():
    """Which outputs become chunks: a prompt's first, one where a choice has ``interval`` tokens
    more than last sent, one where a choice finishes; each prompt of a request on its own."""
    gate = StreamGate(3)
    steps = [(1, None), (2, None), (3, None), (4, None), (5, None), (6, None), (7, "length")]
    assert [gate.passes(_output(step)) for step in steps] == [1, 0, 0, 1, 0, 0, 1]
    gate = StreamGate(2)
    sent = [
        gate.passes(_output((1, None), (1, None))),
        gate.passes(_output((1, None), (1, None)), prompt=1),  # another prompt's first
        gate.passes(_output((2, None), (2, None))),
        gate.passes(_output((3, None), (2, "stop"))),  # a choice finishes
        gate.passes(_output((4, None), (2, "stop"))),
        gate.passes(_output((5, None), (2, "stop"))),
    ]
    assert sent == [True, True, False, True, False, True]
    assert all(StreamGate(None).passes(_output((n, None))) for n in range(1, 4))


def _token_counts(chunks) -> list[int]:
    return [len(c.choices[0].model_extra["token_ids"]) for c in chunks]


def test_stream_interval(client):
    """Over HTTP: chunks of at least ``stream_interval`` tokens but for the first and the last
    (a chunk may hold more: outputs a slow reader missed come together); the text is the whole
    answer's."""
    extra = {"stream_interval": 4, "ignore_eos": True, "return_token_ids": True}
    whole = greedy_completion(client, max_tokens=10, extra_body={"ignore_eos": True})
    chunks = list(greedy_completion(client, max_tokens=10, stream=True, extra_body=extra))
    counts = _token_counts([c for c in chunks if c.choices])
    assert sum(counts) == 10 and len(counts) <= 4 and all(n >= 4 for n in counts[1:-1])
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    whole = greedy_chat(client, max_tokens=10, extra_body={"ignore_eos": True})
    chunks = list(greedy_chat(client, max_tokens=10, stream=True, extra_body=extra))
    counts = _token_counts(
        [c for c in chunks if c.choices and "token_ids" in c.choices[0].model_extra]
    )
    assert sum(counts) == 10 and len(counts) <= 4 and all(n >= 4 for n in counts[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_return_prompt_text(server, client):
    """``prompt_text``: the prompt as the chat template wrote it, the text of the prompt's
    tokens; in a stream, in the first chunk only."""
    extra = {"return_prompt_text": True, "return_token_ids": True}
    chat = greedy_chat(client, max_tokens=2, extra_body=extra)
    text = chat.model_extra["prompt_text"]
    assert text == f"<user>{CHAT[0]['content']}<assistant>"
    _, tokenized = request(
        server.url + "/tokenize", "POST", {"prompt": text, "add_special_tokens": False}
    )
    assert tokenized["tokens"] == chat.model_extra["prompt_token_ids"]
    assert "prompt_text" not in greedy_chat(client, max_tokens=2).model_extra
    chunks = list(greedy_chat(client, max_tokens=4, stream=True, extra_body=extra))
    assert chunks[0].model_extra["prompt_text"] == text
    assert all("prompt_text" not in c.model_extra for c in chunks[1:])


def test_earlier_reasoning_reaches_the_template(client):
    """An assistant message's ``reasoning`` (or its older name ``reasoning_content``) reaches the
    chat template under both names, as vLLM hands it over; another role's is not passed on."""
    messages = [
        {"role": "user", "content": "Hi", "reasoning": "not mine"},
        {"role": "assistant", "content": "Blue.", "reasoning_content": "think A"},
        {"role": "assistant", "content": "Red.", "reasoning": "think B"},
        {"role": "user", "content": "More?"},
    ]
    chat = greedy_chat(
        client, messages=messages, max_tokens=1, extra_body={"return_prompt_text": True}
    )
    assert chat.model_extra["prompt_text"] == (
        "<user>Hi<assistant>[think A|think A]Blue.<assistant>[think B|think B]Red."
        "<user>More?<assistant>"
    )


def test_sampling_extras_are_honoured(client):
    """vLLM's sampling extras reach the sampler: ``allowed_token_ids`` bounds every token,
    ``logit_bias`` moves the choice (a bias past 100 counts as 100, as vLLM clamps it),
    ``min_tokens`` holds a stop token back."""
    ids = {"return_token_ids": True, "ignore_eos": True}
    plain = greedy_completion(client, max_tokens=6, extra_body=ids).choices[0]
    generated = plain.model_extra["token_ids"]
    allowed = [generated[0] + 1, generated[0] + 7, 300]
    bounded = greedy_completion(
        client, max_tokens=6, extra_body={**ids, "allowed_token_ids": allowed}
    ).choices[0]
    assert set(bounded.model_extra["token_ids"]) <= set(allowed)
    favoured = 301
    biased = greedy_completion(
        client, max_tokens=4, logit_bias={str(favoured): 1000}, extra_body=ids
    ).choices[0]
    assert biased.model_extra["token_ids"] == [favoured] * 4
    banned = {str(t): -1000 for t in generated}
    avoided = greedy_completion(client, max_tokens=6, logit_bias=banned, extra_body=ids)
    assert not set(avoided.choices[0].model_extra["token_ids"]) & set(generated)
    stop = {"return_token_ids": True, "stop_token_ids": [generated[0]]}
    stopped = greedy_completion(client, max_tokens=6, extra_body=stop).choices[0]
    assert stopped.finish_reason == "stop" and len(stopped.model_extra["token_ids"]) == 1
    held = greedy_completion(client, max_tokens=6, extra_body={**stop, "min_tokens": 4}).choices[0]
    assert len(held.model_extra["token_ids"]) >= 4
    assert generated[0] not in held.model_extra["token_ids"][:4]
