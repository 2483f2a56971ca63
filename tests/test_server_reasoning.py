"""``--reasoning-parser``: a reasoning model's thinking comes back as ``reasoning_content`` (and
``reasoning``), apart from its answer, in chat (whole and streamed) and in the Responses API. The
packaged SmolLM2 does not think, so a regex holds its answer to ``<think>...</think>...``."""

from __future__ import annotations

import json

import pytest
from server_utils import MODEL_NAME, packaged_server, templated_server

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
THINKING = {"structured_outputs": {"regex": "<think>[a-z ]{3,30}</think>[A-Za-z ]{3,30}"}}


@pytest.fixture(scope="module")
def client():
    srv = packaged_server("--reasoning-parser", "deepseek_r1")
    yield srv.client()
    srv.close()


# Qwen3-2507's way: the template opens <think> for the answer, which only closes it (a line of
# its own, so that SmolLM2's tokenizer writes <think> as it writes it alone).
OPENS_THINK = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def qwen3_client(tmp_path_factory, tiny_model_dir):
    srv = templated_server(
        tmp_path_factory.mktemp("template"),
        tiny_model_dir("qwen3"),
        OPENS_THINK,
        "--reasoning-parser", "qwen3",
        "--max-model-len", "256",
        "--kv-cache-memory", "0.25",
    )  # fmt: skip
    yield srv.client()
    srv.close()


def thinking_chat(client, **kwargs):
    args = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 60, "temperature": 0}
    return client.chat.completions.create(**{**args, "extra_body": THINKING, **kwargs})


def test_chat_splits_thinking_from_the_answer(client):
    r = thinking_chat(client)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.model_extra["reasoning"] == reasoning
    assert "<think>" not in reasoning and "</think>" not in (message.content or "")
    assert message.content and r.choices[0].finish_reason == "stop"
    chunks = list(thinking_chat(client, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)


def test_an_answer_cut_while_thinking_is_all_reasoning(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0, extra_body=THINKING
    )
    message = r.choices[0].message
    assert message.content is None and message.model_extra["reasoning_content"]
    assert r.choices[0].finish_reason == "length"


def test_responses_put_thinking_in_a_reasoning_item(client):
    whole = thinking_chat(client)
    chat = whole.choices[0].message
    args = {"model": MODEL_NAME, "input": CHAT[0]["content"], "temperature": 0}
    r = client.responses.create(**args, max_output_tokens=60, extra_body=THINKING)
    reasoning, message = r.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content[0].text == chat.model_extra["reasoning_content"]
    assert r.output_text == chat.content
    reasoning_tokens = whole.usage.completion_tokens_details.reasoning_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == reasoning_tokens > 0
    events = list(
        client.responses.create(**args, max_output_tokens=60, extra_body=THINKING, stream=True)
    )
    kinds = [e.type for e in events]
    assert "response.reasoning_text.done" in kinds and kinds[-1] == "response.completed"
    assert events[-1].response.output_text == chat.content


def test_include_reasoning_false_leaves_the_reasoning_out(client):
    """vLLM's include_reasoning: false: the answer only, whole and streamed, and no logprobs
    (they would show the reasoning's tokens)."""
    full = thinking_chat(client).choices[0].message
    r = thinking_chat(client, logprobs=True, extra_body={**THINKING, "include_reasoning": False})
    message = r.choices[0].message
    assert message.content == full.content and r.choices[0].logprobs is None
    assert message.model_extra["reasoning_content"] is None
    chunks = list(
        thinking_chat(client, stream=True, extra_body={**THINKING, "include_reasoning": False})
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.model_extra.get("reasoning_content") for d in deltas)
    assert "".join(d.content or "" for d in deltas) == full.content


def test_a_grammar_that_does_not_open_think_leaves_the_answer_as_content(client):
    """deepseek_r1's template opens <think> itself, so its answers count as reasoning until
    </think>; an answer that a JSON schema wrote from its first token never thinks, and stays
    the content (it was all filed as reasoning, or lost with include_reasoning: false)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
              "required": ["city"]}  # fmt: skip
    extra = {"structured_outputs": {"json": schema}}
    for hidden in ({}, {"include_reasoning": False}):
        message = thinking_chat(client, extra_body={**extra, **hidden}).choices[0].message
        assert json.loads(message.content)["city"], message
        assert not message.model_extra.get("reasoning_content")


@pytest.mark.parametrize(
    "regex",
    [
        THINKING["structured_outputs"]["regex"],
        "\n<think>[a-z ]{3,30}</think>[A-Za-z ]{3,30}",
        "<think>[a-z ]{3,20}</think>[A-Za-z ]{3,20}<think>[a-z ]{3,20}</think>[A-Za-z ]{3,20}",
    ],
    ids=["opened", "after_a_newline", "two_sections"],
)
def test_usage_counts_the_reasoning_tokens(client, regex):
    """vLLM's completion_tokens_details.reasoning_tokens: the answer's tokens that went to
    reasoning_content, markers excluded (an answer opening with "\n<think>" counted none)."""
    r = thinking_chat(client, logprobs=True, extra_body={"structured_outputs": {"regex": regex}})
    tokens = [t.token for t in r.choices[0].logprobs.content]
    reasoning = r.choices[0].message.model_extra["reasoning_content"]
    text = "".join(tokens)
    opening = text[: text.index("<think>") + len("<think>")]
    opened = next(i for i in range(len(tokens)) if "".join(tokens[:i]) == opening)
    thought = next(j for j in range(opened, len(tokens)) if "".join(tokens[opened:j]) == reasoning)
    assert r.usage.completion_tokens_details.reasoning_tokens == thought - opened > 0
    plain = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5)
    assert plain.usage.completion_tokens_details.reasoning_tokens == 5  # still in its thinking


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_token_budget_ends_the_thinking(client, stream):
    """After the budget's tokens of thinking, </think> is forced and the model answers."""
    args = {"extra_body": {**THINKING, "thinking_token_budget": 2}, "stream": stream}
    if not stream:
        r = thinking_chat(client, **args)
        message = r.choices[0].message
        reasoning, content = message.model_extra["reasoning_content"], message.content
        assert r.usage.completion_tokens_details.reasoning_tokens == 2
    else:
        chunks = list(thinking_chat(client, **args, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.content or "" for d in deltas)
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 2
    full = thinking_chat(client).choices[0].message.model_extra["reasoning_content"]
    assert full.startswith(reasoning) and len(reasoning) < len(full)
    assert content


def test_a_budget_leaves_forced_tool_calls_whole(client):
    """deepseek_r1 thinks from the first token, but a grammar's answer does not think: a budget
    forced </think> into the calls' JSON, and their tokens were counted as reasoning."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]  # fmt: skip
    answers = [
        thinking_chat(client, tools=tools, tool_choice="required", extra_body=extra)
        for extra in ({}, {"thinking_token_budget": 1})
    ]
    free, held = (r.choices[0].message for r in answers)
    assert held.tool_calls[0].function == free.tool_calls[0].function
    assert json.loads(held.tool_calls[0].function.arguments)["city"]
    assert not held.model_extra.get("reasoning_content")
    assert [r.usage.completion_tokens_details.reasoning_tokens for r in answers] == [0, 0]


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "tag"}}]
)
def test_a_think_tag_in_a_forced_calls_json_is_no_end_of_thinking(client, tool_choice):
    """A grammar's answer that does not open with <think> is all content: a "</think>" in one of
    its JSON strings split it (the calls' text before it went out as reasoning, whole and
    streamed differently)."""
    parameters = {"type": "object", "properties": {"tag": {"enum": ["<b>x</think>y</b>"]}},
                  "required": ["tag"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "tag", "parameters": parameters}}]
    args = {"tools": tools, "tool_choice": tool_choice, "max_tokens": 60, "extra_body": {}}
    message = thinking_chat(client, **args).choices[0].message
    assert not message.model_extra.get("reasoning_content")
    call = message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"tag": "<b>x</think>y</b>"}
    deltas = [c.choices[0].delta for c in thinking_chat(client, **args, stream=True) if c.choices]
    assert not any(d.model_extra.get("reasoning_content") for d in deltas)
    streamed = "".join(d.tool_calls[0].function.arguments or "" for d in deltas if d.tool_calls
                       and d.tool_calls[0].index == 0)  # fmt: skip
    assert streamed == call.function.arguments


def test_qwen3_after_a_prompt_that_opened_think_streams_as_whole(qwen3_client):
    """A template that opened <think> (Qwen3-2507's): the answer thinks from its first token
    until the </think> it writes (here forced by a budget), whole and streamed alike; the
    stream sent the thinking as content, since the answer had not opened <think> itself."""
    args = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 12, "temperature": 0,
            "extra_body": {"thinking_token_budget": 3}}  # fmt: skip
    r = qwen3_client.chat.completions.create(**args)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content and "</think>" not in message.content
    chunks = list(qwen3_client.chat.completions.create(**args, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert (streamed_reasoning, streamed_content) == (reasoning, message.content)
    # cut while thinking: all reasoning, in chat and in the Responses API
    cut = qwen3_client.chat.completions.create(**{**args, "extra_body": {}}).choices[0].message
    assert cut.content is None and cut.model_extra["reasoning_content"]
    responses = qwen3_client.responses.create(
        model=MODEL_NAME, input=CHAT[0]["content"], max_output_tokens=12, temperature=0
    )
    assert [item.type for item in responses.output] == ["reasoning", "message"]
    assert responses.output[0].content[0].text == cut.model_extra["reasoning_content"]
