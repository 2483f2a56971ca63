"""The OpenAI-compatible server, end to end: a real ``pagedserve serve`` process on the packaged
SmolLM2, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import time

import openai
import pydantic
import pytest
from server_utils import (
    CHAT,
    MODEL_NAME,
    PROMPT,
    greedy_chat,
    greedy_completion,
    request,
)


def test_chat_completion_object(server, client):
    before = int(time.time())
    r = greedy_chat(client)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert before - 1 <= r.created <= time.time() + 1
    assert r.model == MODEL_NAME
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    _, tokenized = request(server.url + "/tokenize", "POST", {"messages": CHAT})
    assert r.usage.prompt_tokens == tokenized["count"]
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_non_stream(client):
    full = greedy_chat(client)
    chunks = list(greedy_chat(client, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in content_chunks)
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(greedy_chat(client, stream=True, max_tokens=4))
    assert all(c.choices and c.usage is None for c in chunks)


def test_completion_stream_equals_non_stream(client):
    full = greedy_completion(client)
    assert full.id.startswith("cmpl-") and full.object == "text_completion"
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"
    chunks = list(greedy_completion(client, stream=True, stream_options={"include_usage": True}))
    *content_chunks, usage_chunk = chunks
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in content_chunks) == full.choices[0].text
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 16
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_n_choices(client):
    r = greedy_chat(client, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 3 * 8
    assert all(c.message.content is not None for c in r.choices)
    chunks = list(greedy_chat(client, n=2, max_tokens=6, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    single = greedy_chat(client, max_tokens=6).choices[0].message.content
    assert texts == {0: single, 1: single}  # greedy: every choice is the same text
    completions = greedy_completion(client, n=2, max_tokens=5)
    assert [c.index for c in completions.choices] == [0, 1]
    assert completions.usage.completion_tokens == 10


def test_chat_logprobs_layout(client):
    r = greedy_chat(client, logprobs=True, top_logprobs=3, max_tokens=8)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    plain = greedy_chat(client, logprobs=True, max_tokens=4).choices[0].logprobs.content
    assert all(e.top_logprobs == [] for e in plain)
    streamed = list(greedy_chat(client, logprobs=True, top_logprobs=2, max_tokens=8, stream=True))
    entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]


def test_completion_logprobs_layout(client):
    r = greedy_completion(client, logprobs=2, max_tokens=8)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 2 <= len(top) <= 3
        assert top[token] == pytest.approx(logprob) and max(top.values()) == pytest.approx(logprob)


def test_completion_echo(client):
    plain = greedy_completion(client, max_tokens=6)
    echoed = greedy_completion(client, max_tokens=6, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    streamed = list(greedy_completion(client, max_tokens=6, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text
    with_logprobs = greedy_completion(client, max_tokens=6, echo=True, logprobs=1)
    lp = with_logprobs.choices[0].logprobs
    num_prompt = with_logprobs.usage.prompt_tokens
    assert len(lp.tokens) == num_prompt + 6
    assert "".join(lp.tokens) == with_logprobs.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert all(len(top) >= 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset[num_prompt] == len(PROMPT)


def test_completion_echo_only_scores_the_prompt(client):
    """echo with max_tokens 0 returns the prompt and its logprobs, generating nothing (how
    lm-evaluation-harness scores a text)."""
    scored = greedy_completion(client, max_tokens=0, echo=True, logprobs=1)
    (choice,) = scored.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == PROMPT
    generated = greedy_completion(client, max_tokens=6, echo=True, logprobs=1).choices[0].logprobs
    num_prompt = len(lp.tokens)
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(generated.token_logprobs[1:num_prompt], abs=1e-4)
    chunks = list(greedy_completion(client, max_tokens=0, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError):
        greedy_completion(client, max_tokens=0)


def test_stop_string_in_stream(client):
    full = greedy_completion(client, max_tokens=24).choices[0].text
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[2]
    cut = full.index(stop)
    chunks = list(greedy_completion(client, max_tokens=24, stop=[stop], stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"
    kept = greedy_completion(
        client, max_tokens=24, stop=stop, extra_body={"include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == full[: cut + len(stop)]
    assert kept.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    def sample(seed):
        return (
            client.completions.create(
                model=MODEL_NAME, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=seed
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_completion_prompt_forms(server, client):
    single = greedy_completion(client, max_tokens=6).choices[0].text
    other = greedy_completion(client, prompt="Once upon a time", max_tokens=6).choices[0].text
    batch = greedy_completion(client, prompt=[PROMPT, "Once upon a time"], max_tokens=6)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [single, other]
    _, tokenized = request(server.url + "/tokenize", "POST", {"prompt": PROMPT})
    ids = tokenized["tokens"]
    assert greedy_completion(client, prompt=ids, max_tokens=6).choices[0].text == single
    both = greedy_completion(client, prompt=[ids, ids], max_tokens=6)
    assert [c.text for c in both.choices] == [single, single]
    assert both.usage.prompt_tokens == 2 * len(ids)


def test_chat_content_parts_and_roles(client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "Name three colours."}]},
    ]
    as_parts = greedy_chat(client, messages=messages, max_tokens=8)
    messages[-1] = {"role": "user", "content": "Name three colours."}
    as_string = greedy_chat(client, messages=messages, max_tokens=8)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_continue_final_message(server, client):
    partial = [*CHAT, {"role": "assistant", "content": "Red, green and"}]
    body = {"messages": partial, "add_generation_prompt": False, "continue_final_message": True}
    _, tokenized = request(server.url + "/tokenize", "POST", body)
    _, text = request(server.url + "/detokenize", "POST", {"tokens": tokenized["tokens"]})
    assert text["prompt"].endswith("Red, green and")
    r = greedy_chat(
        client,
        messages=partial,
        max_tokens=4,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert r.usage.prompt_tokens == tokenized["count"]


def test_tokenize_detokenize_round_trip(server):
    status, tokenized = request(server.url + "/tokenize", "POST", {"prompt": PROMPT})
    assert status == 200 and tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == 2048
    status, text = request(server.url + "/detokenize", "POST", {"tokens": tokenized["tokens"]})
    assert status == 200 and text == {"prompt": PROMPT}


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model"
    assert request(server.url + "/health")[0] == 200
    status, version = request(server.url + "/version")
    assert status == 200 and version["version"]


def test_unknown_fields_are_ignored(server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, "no_such_field": {"x": 1}}
    status, r = request(server.url + "/v1/completions", "POST", body)
    assert status == 200 and r["usage"]["completion_tokens"] == 2


def test_text_response_format_and_tools_not_chosen_are_served(client):
    """What the server can honour runs: a ``text`` response format, and tools the client tells
    the model not to call (``tool_choice`` ``none``)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    chat = greedy_chat(
        client, max_tokens=4, response_format={"type": "text"}, tools=[tool], tool_choice="none"
    )
    assert chat.choices[0].message.content and not chat.choices[0].message.tool_calls


CAT_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CAT_CHAT = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]


def test_response_format_json_schema(client):
    r = greedy_chat(
        client,
        messages=CAT_CHAT,
        max_tokens=100,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "cat", "schema": CAT_SCHEMA},
        },
    )
    cat = json.loads(r.choices[0].message.content)
    assert set(cat) == {"name", "age"} and isinstance(cat["age"], int)
    assert r.choices[0].finish_reason == "stop"


def test_response_format_json_object_streams(client):
    chunks = greedy_chat(
        client,
        messages=CAT_CHAT,
        max_tokens=100,
        response_format={"type": "json_object"},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)


def test_openai_parse_fills_a_pydantic_model(client):
    """The client's structured-output helper: it sends the model's JSON schema and parses the
    answer back into the model."""

    class Cat(pydantic.BaseModel):
        name: str
        age: int

    r = client.chat.completions.parse(
        model=MODEL_NAME, messages=CAT_CHAT, max_tokens=100, temperature=0, response_format=Cat
    )
    assert isinstance(r.choices[0].message.parsed, Cat)


def test_structured_outputs_choice_on_completions(client):
    """vLLM's ``structured_outputs`` extra, here a choice, on the completions endpoint."""
    choices = ["Paris", "London", "Rome"]
    r = greedy_completion(
        client, max_tokens=8, extra_body={"structured_outputs": {"choice": choices}}
    )
    assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    grammar = 'root ::= city ", " country\ncity ::= "Paris" | "Lyon"\ncountry ::= "France"'
    r = greedy_completion(
        client, max_tokens=8, extra_body={"structured_outputs": {"grammar": grammar}}
    )
    assert r.choices[0].text in ("Paris, France", "Lyon, France")


def test_structured_outputs_compact_json_schema(client):
    r = greedy_chat(
        client,
        messages=CAT_CHAT,
        max_tokens=100,
        extra_body={"structured_outputs": {"json": CAT_SCHEMA, "disable_any_whitespace": True}},
    )
    text = r.choices[0].message.content
    assert set(json.loads(text)) == {"name", "age"} and "\n" not in text


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}},
    },
}
WEATHER_CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def tool_chat(client, **kwargs):
    args = {"messages": WEATHER_CHAT, "tools": [WEATHER, CLOCK], "max_tokens": 100}
    return greedy_chat(client, **{**args, **kwargs})


def streamed_calls(chunks):
    """The tool calls of a stream, put together from their deltas, and the finish reason."""
    calls, finish = {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        finish = chunk.choices[0].finish_reason or finish
        for d in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": d.id, "name": "", "arguments": ""})
            call["name"] += d.function.name or ""
            call["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)], finish


def test_named_tool_choice_calls_that_function(client):
    r = tool_chat(client, tool_choice=NAMED_WEATHER)
    message = r.choices[0].message
    (call,) = message.tool_calls
    assert message.content is None and r.choices[0].finish_reason == "stop"
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    (streamed,), finish = streamed_calls(tool_chat(client, tool_choice=NAMED_WEATHER, stream=True))
    assert finish == "stop" and streamed["name"] == "get_weather"
    assert streamed["arguments"] == call.function.arguments


def test_required_tool_choice_returns_tool_calls(client):
    r = tool_chat(client, tool_choice="required", parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)
    chunks = list(tool_chat(client, tool_choice="required", parallel_tool_calls=False, stream=True))
    streamed, finish = streamed_calls(chunks)
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (call.function.name, call.function.arguments)
    ]
    # the call goes out once its name is whole, its arguments as they come
    carrying = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(carrying) > 3 and carrying[0].choices[0].delta.tool_calls[0].function.name


def test_a_required_call_cut_short_keeps_its_unfinished_arguments(client):
    whole = tool_chat(client, tool_choice="required", parallel_tool_calls=False)
    arguments = whole.choices[0].message.tool_calls[0].function.arguments
    r = tool_chat(client, tool_choice="required", parallel_tool_calls=False, max_tokens=12)
    (call,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "length"
    assert arguments.startswith(call.function.arguments) and call.function.arguments != arguments


def test_required_tool_choice_with_refs_in_the_parameters(client):
    """A tool whose parameters point into their own $defs (pydantic writes them so): the
    schema of a required call nests the parameters, and the references still resolve."""
    place = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
             "required": ["city"]}  # fmt: skip
    parameters = {"type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}},
                  "required": ["place"], "$defs": {"Place": place}}  # fmt: skip
    tool = {"type": "function", "function": {"name": "locate", "parameters": parameters}}
    r = tool_chat(client, tools=[tool], tool_choice="required", parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "locate"
    assert isinstance(json.loads(call.function.arguments)["place"]["city"], str)


def test_a_tool_result_continues_the_conversation(client):
    call = tool_chat(client, tool_choice=NAMED_WEATHER).choices[0].message.tool_calls[0]
    history = [
        *WEATHER_CHAT,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    r = greedy_chat(client, messages=history, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
