"""vLLM's request extras and answer fields on the OpenAI endpoints (``stop_reason``,
``prompt_logprobs``, ``return_token_ids``, ``bad_words``, ``cache_salt``, ...), end to end: a real
``pagedserve serve`` process on the packaged SmolLM2, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
from server_utils import PROMPT, greedy_chat, greedy_completion, request


def test_prompt_logprobs(server, client):
    """vLLM's prompt_logprobs extra: per prompt token its logprob (the same as echo's) and the N
    best alternatives, keyed by token id; on completions per choice, on chat at the top."""
    r = greedy_completion(client, max_tokens=2, extra_body={"prompt_logprobs": 2})
    (choice,) = r.choices
    entries = choice.model_extra["prompt_logprobs"]
    _, tokenized = request(server.url + "/tokenize", "POST", {"prompt": PROMPT})
    ids = tokenized["tokens"]
    assert len(entries) == len(ids) == r.usage.prompt_tokens and entries[0] is None
    echoed = greedy_completion(client, max_tokens=0, echo=True, logprobs=1).choices[0].logprobs
    for i, (token_id, entry) in enumerate(zip(ids[1:], entries[1:], strict=True), start=1):
        assert str(token_id) in entry and 1 <= len(entry) <= 3
        own = entry[str(token_id)]
        assert own["logprob"] == pytest.approx(echoed.token_logprobs[i], abs=1e-4)
        assert own["decoded_token"] == echoed.tokens[i] and own["rank"] >= 1
        assert all(v["rank"] <= 2 for k, v in entry.items() if k != str(token_id))
        ranked = sorted(entry.values(), key=lambda v: v["rank"])
        assert [v["logprob"] for v in ranked] == sorted(
            (v["logprob"] for v in ranked), reverse=True
        )
    chat = greedy_chat(client, max_tokens=4, extra_body={"prompt_logprobs": 0})
    entries = chat.model_extra["prompt_logprobs"]
    assert len(entries) == chat.usage.prompt_tokens and entries[0] is None
    assert all(len(entry) == 1 for entry in entries[1:])
    assert greedy_chat(client, max_tokens=4).model_extra["prompt_logprobs"] is None
    streamed = list(
        greedy_chat(client, max_tokens=4, stream=True, extra_body={"prompt_logprobs": 0})
    )
    assert streamed[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="stream"):
        greedy_completion(client, stream=True, extra_body={"prompt_logprobs": 1})


def test_return_token_ids(server, client):
    """vLLM's return_token_ids: the prompt's and each choice's token ids beside the text; a
    stream sends the prompt's in its first chunk and each chunk's new ids."""
    extra = {"extra_body": {"return_token_ids": True}}
    _, tokenized = request(server.url + "/tokenize", "POST", {"prompt": PROMPT})
    r = greedy_completion(client, max_tokens=8, **extra)
    (choice,) = r.choices
    assert choice.model_extra["prompt_token_ids"] == tokenized["tokens"]
    generated = choice.model_extra["token_ids"]
    assert len(generated) == r.usage.completion_tokens == 8
    _, detokenized = request(server.url + "/detokenize", "POST", {"tokens": generated})
    assert detokenized["prompt"] == choice.text
    chunks = list(greedy_completion(client, max_tokens=8, stream=True, **extra))
    assert chunks[0].choices[0].model_extra["prompt_token_ids"] == tokenized["tokens"]
    assert all("prompt_token_ids" not in c.choices[0].model_extra for c in chunks[1:])
    assert [t for c in chunks for t in c.choices[0].model_extra["token_ids"]] == generated
    chat = greedy_chat(client, max_tokens=8, **extra)
    assert len(chat.model_extra["prompt_token_ids"]) == chat.usage.prompt_tokens
    chat_ids = chat.choices[0].model_extra["token_ids"]
    assert len(chat_ids) == chat.usage.completion_tokens
    chunks = list(greedy_chat(client, max_tokens=8, stream=True, **extra))
    assert chunks[0].model_extra["prompt_token_ids"] == chat.model_extra["prompt_token_ids"]
    assert [t for c in chunks[1:] for t in c.choices[0].model_extra["token_ids"]] == chat_ids
    assert "token_ids" not in greedy_completion(client, max_tokens=2).choices[0].model_extra


def test_return_tokens_as_token_ids(client):
    """vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:N"."""
    extra = {"return_tokens_as_token_ids": True, "return_token_ids": True}
    r = greedy_completion(client, max_tokens=4, logprobs=1, extra_body=extra)
    (choice,) = r.choices
    names = [f"token_id:{t}" for t in choice.model_extra["token_ids"]]
    assert choice.logprobs.tokens == names
    assert all(name in top for name, top in zip(names, choice.logprobs.top_logprobs, strict=True))
    chat = greedy_chat(client, max_tokens=4, logprobs=True, top_logprobs=1, extra_body=extra)
    entries = chat.choices[0].logprobs.content
    names = [f"token_id:{t}" for t in chat.choices[0].model_extra["token_ids"]]
    assert [e.token for e in entries] == names
    assert all(e.top_logprobs[0].token.startswith("token_id:") for e in entries)


def test_truncate_prompt_tokens_and_bad_words(client):
    """vLLM's truncate_prompt_tokens keeps a prompt's last tokens; bad_words are never written."""
    long_prompt = "Once upon a time " * 40 + PROMPT
    full = greedy_completion(client, prompt=long_prompt, max_tokens=4)
    kept = greedy_completion(
        client,
        prompt=long_prompt,
        max_tokens=4,
        echo=True,
        extra_body={"truncate_prompt_tokens": 12, "return_token_ids": True},
    )
    (choice,) = kept.choices
    assert kept.usage.prompt_tokens == 12 < full.usage.prompt_tokens
    assert PROMPT in choice.text and len(choice.text) < len(long_prompt)  # echoes what it saw
    assert len(choice.model_extra["prompt_token_ids"]) == 12
    plain = greedy_completion(client, max_tokens=8).choices[0].text
    word = plain.split()[0]
    banned = greedy_completion(client, max_tokens=8, extra_body={"bad_words": [word]})
    assert word not in banned.choices[0].text.split()


def test_cache_salt(client):
    """Requests share a cached prefix only under the same cache_salt."""
    prompt = "Once upon a time, in a land far away, " * 6

    def cached(**extra) -> int:
        r = greedy_completion(client, prompt=prompt, max_tokens=2, extra_body=extra)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-a") > 0
    assert cached(cache_salt="tenant-b") == 0
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        cached(cache_salt="")


def test_stop_reason(server, client):
    """vLLM's stop_reason: the stop string or token id that ended a choice, else null."""
    full = greedy_completion(client, max_tokens=24).choices[0]
    assert full.finish_reason == "length" and full.model_extra["stop_reason"] is None
    stop = " " + full.text.split()[2]
    by_string = greedy_completion(client, max_tokens=24, stop=[stop]).choices[0]
    assert by_string.finish_reason == "stop" and by_string.model_extra["stop_reason"] == stop
    chunks = list(greedy_completion(client, max_tokens=24, stop=[stop], stream=True))
    assert chunks[-1].choices[0].model_extra["stop_reason"] == stop
    _, generated = request(server.url + "/tokenize", "POST", {"prompt": full.text})
    token_id = generated["tokens"][3]
    extra = {"stop_token_ids": [token_id]}
    by_token = greedy_completion(client, max_tokens=24, extra_body=extra).choices[0]
    assert by_token.finish_reason == "stop" and by_token.model_extra["stop_reason"] == token_id
    chat = greedy_chat(client, max_tokens=24, stop=[" "]).choices[0]
    assert chat.finish_reason == "stop" and chat.model_extra["stop_reason"] == " "


def test_repetition_detection_ends_a_loop(server, client):
    """vLLM's repetition_detection: finish_reason "repetition", stop_reason
    "repetition_detected", whole and streamed."""
    _, the = request(
        server.url + "/tokenize", "POST", {"prompt": " the", "add_special_tokens": False}
    )
    extra = {
        "logit_bias": {str(the["tokens"][0]): 100},
        "extra_body": {"repetition_detection": {"max_pattern_size": 2, "min_count": 5}},
    }
    choice = greedy_chat(client, max_tokens=30, **extra).choices[0]
    assert choice.message.content == " the" * 5
    assert choice.finish_reason == "repetition"
    assert choice.model_extra["stop_reason"] == "repetition_detected"
    chunks = list(greedy_completion(client, max_tokens=30, stream=True, **extra))
    assert "".join(c.choices[0].text for c in chunks) == " the" * 5
    assert chunks[-1].choices[0].finish_reason == "repetition"


def test_sagemaker_ping_and_invocations(server, client):
    """SageMaker's contract, as vLLM serves it: /ping is the health check (GET or POST), and
    /invocations answers a chat body as /v1/chat/completions and a completions body as
    /v1/completions; a body that is neither gets a 400 that names what it expected."""
    for method in ("GET", "POST"):
        assert request(server.url + "/ping", method)[0] == 200
    messages = [{"role": "user", "content": "Name a colour."}]
    chat_body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    status, body = request(server.url + "/invocations", "POST", chat_body)
    assert status == 200 and body["object"] == "chat.completion", body
    direct = greedy_chat(client, messages=messages, max_tokens=6)
    assert body["choices"][0]["message"]["content"] == direct.choices[0].message.content
    status, body = request(
        server.url + "/invocations", "POST", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    )
    assert status == 200 and body["object"] == "text_completion", body
    assert body["choices"][0]["text"] == greedy_completion(client, max_tokens=4).choices[0].text
    status, body = request(server.url + "/invocations", "POST", {**chat_body, "max_tokens": -1})
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    for bad in ({"input": "a cat"}, {"messages": "hello"}, [1, 2], b"{not json"):
        status, body = request(server.url + "/invocations", "POST", bad)
        assert status == 400, (bad, body)
        assert body["error"]["type"] == "invalid_request_error", body
    status, body = request(server.url + "/invocations", "POST", {"input": "a cat"})
    message = body["error"]["message"]
    assert "ChatCompletionRequest" in message and "CompletionRequest" in message


def test_structural_tag(server, client):
    """vLLM's structural tag, as response_format (its legacy form) and as structured_outputs'
    JSON text: a logit bias makes the model write the trigger, the tag holds what follows."""
    tag = {
        "structures": [
            {
                "begin": "@weather",
                "schema": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 12}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
                "end": "@end",
            }
        ],
        "triggers": ["@"],
    }
    at = {"48": 100}  # "@"
    texts = []
    for extra in (
        {"response_format": {"type": "structural_tag", **tag}},
        {"structured_outputs": {"structural_tag": json.dumps(tag)}},
    ):
        r = greedy_chat(client, max_tokens=30, logit_bias=at, extra_body=extra)
        text = r.choices[0].message.content
        assert text.startswith("@weather{"), text
        value, end = json.JSONDecoder().raw_decode(text, len("@weather"))
        assert set(value) == {"city"} and isinstance(value["city"], str), text
        assert text.startswith("@end", end) or len(text) < end + 4, text
        texts.append(text)
    assert texts[0] == texts[1]
    with pytest.raises(openai.BadRequestError) as err:
        greedy_chat(
            client,
            response_format={"type": "structural_tag", "structures": [], "triggers": ["@"]},
        )
    assert err.value.body["param"] == "response_format"


def test_chat_echo_repeats_the_message_it_continues(client):
    """vLLM's chat echo: an answer that continues the last (assistant) message starts with it,
    whole and as the first streamed content; a new answer after a user message does not."""
    partial = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "The answer is"}]  # fmt: skip
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    plain = greedy_chat(client, messages=partial, max_tokens=4, extra_body={**extra, "echo": False})
    echoed = greedy_chat(client, messages=partial, max_tokens=4, extra_body=extra)
    generated = plain.choices[0].message.content
    assert echoed.choices[0].message.content == "The answer is" + generated
    chunks = list(
        greedy_chat(client, messages=partial, max_tokens=4, stream=True, extra_body=extra)
    )
    contents = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert contents[0] == "The answer is" and "".join(contents[1:]) == generated
    fresh = greedy_chat(client, max_tokens=4, extra_body={"echo": True})
    assert (
        fresh.choices[0].message.content
        == greedy_chat(client, max_tokens=4).choices[0].message.content
    )


def test_chat_echo_returns_the_prompt_logprobs(client):
    """As vLLM 0.32: chat's echo returns the whole prompt's logprobs at the top (the first token
    null), with top_logprobs alternatives (the prompt token alone by default) unless
    prompt_logprobs says otherwise; the choice's logprobs stay the generated tokens'. A stream
    carries none."""
    partial = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "The answer is"}]  # fmt: skip
    extra = {"echo": True, "add_generation_prompt": False, "continue_final_message": True}
    asked = greedy_chat(client, messages=partial, max_tokens=3, logprobs=True, top_logprobs=2,
                        extra_body={**extra, "return_token_ids": True})  # fmt: skip
    ids, entries = asked.model_extra["prompt_token_ids"], asked.model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) == asked.usage.prompt_tokens and entries[0] is None
    assert all(str(t) in e and 1 <= len(e) <= 3 for t, e in zip(ids[1:], entries[1:], strict=True))
    assert len(asked.choices[0].logprobs.content) == asked.usage.completion_tokens
    explicit = greedy_chat(client, messages=partial, max_tokens=3,
                           extra_body={**extra, "echo": False, "prompt_logprobs": 2})  # fmt: skip
    assert explicit.model_extra["prompt_logprobs"] == entries
    plain = greedy_chat(client, messages=partial, max_tokens=3, extra_body=extra)
    own = [e and {str(t): e[str(t)]} for t, e in zip(ids, entries, strict=True)]
    assert plain.model_extra["prompt_logprobs"] == own and plain.choices[0].logprobs is None
    fresh = greedy_chat(client, max_tokens=3, extra_body={"echo": True})
    assert len(fresh.model_extra["prompt_logprobs"]) == fresh.usage.prompt_tokens
    overridden = greedy_chat(client, messages=partial, max_tokens=3, logprobs=True,
                             top_logprobs=2, extra_body={**extra, "prompt_logprobs": 0})  # fmt: skip
    assert overridden.model_extra["prompt_logprobs"] == own
    chunks = list(greedy_chat(client, messages=partial, max_tokens=3, stream=True,
                              logprobs=True, top_logprobs=2, extra_body=extra))  # fmt: skip
    assert all(c.model_extra.get("prompt_logprobs") is None for c in chunks)
    assert chunks[1].choices[0].delta.content == "The answer is"
    assert chunks[1].choices[0].logprobs is None
