"""``--reasoning-parser`` granite, mistral and olmo3 on a running server, alone and beside their
family's ``--tool-call-parser``: the thinking reaches the openai client as ``reasoning_content``
(and the Responses API's reasoning item), the answer as ``content`` or ``tool_calls``, whole and
streamed alike.

A tiny random model thinks nothing of its own accord, so a constraint holds each answer to the
text its model family writes: a regex, or (for Magistral, whose ``[THINK]``, ``[/THINK]`` and
``[TOOL_CALLS]`` are special tokens, which no regex writes) a grammar naming those tokens."""

from __future__ import annotations

import json
import re

import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, wait_until_idle
from tiny_models import tiny_config
from transformers import AutoTokenizer, LlamaForCausalLM

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"


def serve(model: str, *flags: str) -> ServerProcess:
    args = [model, "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.05", *flags]
    return ServerProcess(args).wait_ready()


def ask(server: ServerProcess, constraint: dict, extra: dict | None = None, **kwargs):
    """The whole answer, and the streamed one's (reasoning, content, calls); ``extra``: more
    of vLLM's fields."""
    args = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 80, "temperature": 0}
    args.update(kwargs, extra_body={"structured_outputs": constraint, **(extra or {})})
    client = server.client()
    whole = client.chat.completions.create(**args)
    reasoning, content, calls = "", "", []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            reasoning += choice.delta.model_extra.get("reasoning_content") or ""
            content += choice.delta.content or ""
            calls += [
                (c.function.name, c.function.arguments) for c in choice.delta.tool_calls or []
            ]
    return whole, (reasoning, content or None, calls)


def calls_of(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


@pytest.mark.parametrize(
    ("parser", "regex"),
    [
        ("granite", f"{THOUGHT}[a-z ]{{3,30}}{RESPONSE}[A-Za-z ]{{3,30}}"),
        ("granite", f"Here's my thought process:[a-z ]{{3,30}}{RESPONSE}[A-Za-z ]{{3,30}}"),
        ("olmo3", "<think>[a-z ]{3,30}</think>[A-Za-z ]{3,30}"),
    ],
)
def test_text_markers_split_thinking_from_the_answer(parser, regex, tiny_model_dir):
    server = serve(tiny_model_dir("llama"), "--reasoning-parser", parser)
    try:
        whole, streamed = ask(server, {"regex": regex})
        choice = whole.choices[0]
        message = choice.message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and message.content and choice.finish_reason == "stop"
        assert message.model_extra["reasoning"] == reasoning
        assert not any(marker in reasoning + message.content for marker in ("Here", "think>"))
        assert streamed == (reasoning, message.content, [])
        r = server.client().responses.create(
            model=MODEL_NAME,
            input=CHAT[0]["content"],
            max_output_tokens=80,
            temperature=0,
            extra_body={"structured_outputs": {"regex": regex}},
        )
        assert [item.type for item in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == reasoning and r.output_text == message.content
        wait_until_idle(server.url)
    finally:
        server.close()


def test_granite_thinks_then_calls_a_tool(tiny_model_dir):
    """Granite 3.2 thinks, then its response is a call: reasoning and tool_calls together, in
    chat (whole and streamed) and in the Responses API."""
    flags = ["--reasoning-parser", "granite", "--enable-auto-tool-choice"]
    server = serve(tiny_model_dir("llama"), *flags, "--tool-call-parser", "granite")
    try:
        text = f"{THOUGHT} ask for it {RESPONSE}<|tool_call|>{CALL}"
        whole, streamed = ask(server, {"regex": re.escape(text)}, tools=[WEATHER])
        choice = whole.choices[0]
        message = choice.message
        assert choice.finish_reason == "tool_calls"
        assert message.model_extra["reasoning_content"] == " ask for it "
        assert message.content is None
        (call,) = calls_of(message)
        assert call[0] == "get_weather" and json.loads(call[1]) == {"city": "Paris"}
        assert streamed == (" ask for it ", None, [call])
        r = server.client().responses.create(
            model=MODEL_NAME,
            input=CHAT[0]["content"],
            tools=[{"type": "function", **WEATHER["function"]}],
            max_output_tokens=80,
            extra_body={"structured_outputs": {"regex": re.escape(text)}},
        )
        reasoning, item = r.output
        assert (reasoning.type, reasoning.content[0].text) == ("reasoning", " ask for it ")
        assert (item.type, item.name, item.arguments) == ("function_call", *call)
    finally:
        server.close()


MAGISTRAL_TOKENS = ["[THINK]", "[/THINK]", "[TOOL_CALLS]", "[INST]"]


@pytest.fixture(scope="module")
def magistral_like(tmp_path_factory, tiny_model_dir):
    """A tiny model whose tokenizer has Magistral's special tokens, and their ids."""
    path = tmp_path_factory.mktemp("magistral")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.add_tokens(MAGISTRAL_TOKENS, special_tokens=True)
    config = tiny_config("llama")
    config.vocab_size = len(tokenizer) + 62  # room for the new tokens
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in MAGISTRAL_TOKENS]
    flags = ["--reasoning-parser", "mistral", "--enable-auto-tool-choice"]
    server = serve(str(path), *flags, "--tool-call-parser", "mistral")
    yield server, dict(zip(("think", "end", "calls", "inst"), ids, strict=True))
    server.close()


def test_magistral_s_special_thinking_tokens_are_read(magistral_like):
    """[THINK] and [/THINK] are special tokens, which the answer's text keeps to be split."""
    server, ids = magistral_like
    grammar = f"start: <[{ids['think']}]> /[a-z ]{{3,30}}/ <[{ids['end']}]> /[A-Za-z ]{{3,30}}/"
    whole, streamed = ask(server, {"grammar": grammar}, logprobs=True)
    message = whole.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and message.content and "THINK" not in reasoning + message.content
    assert streamed == (reasoning, message.content, [])
    tokens = [t.token for t in whole.choices[0].logprobs.content]
    thought = tokens.index("[/THINK]") - tokens.index("[THINK]") - 1  # single special tokens
    assert whole.usage.completion_tokens_details.reasoning_tokens == thought > 0
    plain = ask(server, {"regex": "[A-Za-z ]{3,30}"})[0].choices[0].message
    assert plain.content and not plain.model_extra.get("reasoning_content")


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "called_while_thinking"])
def test_magistral_thinks_then_calls_a_tool(magistral_like, closed):
    """Its call follows [/THINK], or (as vLLM reads it) ends the thinking itself."""
    server, ids = magistral_like
    end = f"<[{ids['end']}]>" if closed else ""
    grammar = f'start: <[{ids["think"]}]> "ask for it" {end} <[{ids["calls"]}]> {json.dumps(CALL)}'
    whole, streamed = ask(server, {"grammar": grammar}, tools=[WEATHER])
    choice = whole.choices[0]
    message = choice.message
    assert choice.finish_reason == "tool_calls"
    assert message.model_extra["reasoning_content"] == "ask for it"
    (call,) = calls_of(message)
    assert call[0] == "get_weather" and json.loads(call[1]) == {"city": "Paris"}
    assert streamed == ("ask for it", None, [call])


def test_magistral_s_other_special_tokens_are_dropped(magistral_like):
    """The text keeps the special tokens the parsers read, and drops the others the model
    writes (an [INST] here), as vLLM does; unless the request keeps every special token."""
    server, ids = magistral_like
    inst = f"<[{ids['inst']}]>"
    grammar = f'start: <[{ids["think"]}]> "a" {inst} "b" <[{ids["end"]}]> "c" {inst} "d"'
    whole, streamed = ask(server, {"grammar": grammar})
    message = whole.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("ab", "cd")
    assert streamed == ("ab", "cd", [])
    whole, streamed = ask(server, {"grammar": grammar}, extra={"skip_special_tokens": False})
    message = whole.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == ("a[INST]b", "c[INST]d")
    assert streamed == ("a[INST]b", "c[INST]d", [])
