"""OpenAI's Responses API (``/v1/responses``), end to end: a real ``pagedserve serve`` process on
the packaged SmolLM2, driven by the official ``openai`` client."""

from __future__ import annotations

import json

import openai
import pydantic
import pytest
from server_utils import MODEL_NAME, packaged_server

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client():
    srv = packaged_server()
    yield srv.client()
    srv.close()


def greedy_response(client, **kwargs):
    args = {"model": MODEL_NAME, "input": QUESTION, "max_output_tokens": 24, "temperature": 0}
    return client.responses.create(**{**args, **kwargs})


def chat_answer(client, messages, max_tokens=24):
    return client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0
    )


def test_response_object_answers_as_chat_does(client):
    r = greedy_response(client)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    (part,) = item.content
    assert part.type == "output_text" and part.text == r.output_text
    chat = chat_answer(client, [{"role": "user", "content": QUESTION}])
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_and_message_items(client):
    """``instructions`` is a system message; input items may hold text parts."""
    items = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    r = greedy_response(client, instructions="Answer in one word.", input=items)
    chat = chat_answer(
        client,
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION},
        ],
    )
    assert r.output_text == chat.choices[0].message.content


def test_output_text_logprobs(client):
    """``include: ["message.output_text.logprobs"]`` with ``top_logprobs``: the same entries as
    chat's logprobs for the same messages; streamed, with each delta and whole at the end."""
    wanted = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = greedy_response(client, max_output_tokens=8, **wanted)
    logprobs = r.output[0].content[0].logprobs
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    expected = chat.choices[0].logprobs.content
    assert [e.token for e in logprobs] == [e.token for e in expected]
    assert [e.logprob for e in logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-4)
    assert all(len(e.top_logprobs) == 2 for e in logprobs)
    events = list(greedy_response(client, max_output_tokens=8, stream=True, **wanted))
    streamed = [
        e.token for ev in events if ev.type == "response.output_text.delta" for e in ev.logprobs
    ]
    done = next(ev for ev in events if ev.type == "response.output_text.done")
    assert [e.token for e in done.logprobs] == [e.token for e in expected]
    assert streamed == [e.token for e in expected][: len(streamed)] and streamed
    assert greedy_response(client, max_output_tokens=3).output[0].content[0].logprobs == []


def test_max_output_tokens_leaves_it_incomplete(client):
    r = greedy_response(client, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    assert r.output[-1].status == "incomplete"  # the item that was cut, as OpenAI marks it


def test_stream_events(client):
    full = greedy_response(client)
    events = list(greedy_response(client, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text == full.output_text
    assert events[-1].response.output_text == full.output_text
    assert events[-1].response.usage.output_tokens == full.usage.output_tokens
    with client.responses.stream(
        model=MODEL_NAME, input=QUESTION, max_output_tokens=24, temperature=0
    ) as stream:
        for _ in stream:
            pass
        assert stream.get_final_response().output_text == full.output_text
    cut = list(greedy_response(client, stream=True, max_output_tokens=3))
    assert cut[-1].type == "response.incomplete"
    assert cut[-2].type == "response.output_item.done" and cut[-2].item.status == "incomplete"


def test_json_schema_text_format(client):
    class City(pydantic.BaseModel):
        name: str
        country: str

    r = client.responses.parse(
        model=MODEL_NAME,
        input="Name a city in France, as JSON.",
        text_format=City,
        max_output_tokens=60,
        temperature=0,
    )
    assert isinstance(r.output_parsed, City)


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def test_function_calls_and_their_outputs(client):
    """Forced calls come back as function_call items; a call and its output, sent back as
    input items, continue the conversation."""
    question = "What is the weather in Paris?"
    r = greedy_response(
        client, input=question, tools=[WEATHER], tool_choice="required", max_output_tokens=60
    )
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call"
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    named = greedy_response(
        client,
        input=question,
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    assert [o.name for o in named.output] == ["get_weather"]
    follow_up = [
        {"role": "user", "content": question},
        {
            "type": "function_call",
            "call_id": call.call_id,
            "name": call.name,
            "arguments": call.arguments,
        },
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'},
    ]
    answer = greedy_response(client, input=follow_up, tools=[WEATHER], tool_choice="none")
    assert answer.status == "completed" and answer.output_text
    events = list(
        greedy_response(
            client,
            input=question,
            tools=[WEATHER],
            tool_choice="required",
            max_output_tokens=60,
            stream=True,
        )
    )
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-2].item.arguments == events[3].delta == call.arguments


def test_echoed_output_items_are_input(client):
    """What clients send back from earlier outputs: a reasoning item (left out, as a stored
    response's reasoning is) and a function call output given as text parts."""
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather"}
    call["arguments"] = '{"city": "Paris"}'
    result = {"type": "function_call_output", "call_id": "call_1", "output": '{"temp_c": 21}'}
    plain = [{"role": "user", "content": "What is the weather in Paris?"}, call, result]
    parts = [{"type": "input_text", "text": '{"temp_c": '}, {"type": "input_text", "text": "21}"}]
    echoed = [*plain[:1], {"type": "reasoning", "id": "rs_1", "summary": []}, call]
    echoed.append({**result, "output": parts})
    want = greedy_response(client, input=plain, tools=[WEATHER], tool_choice="none")
    got = greedy_response(client, input=echoed, tools=[WEATHER], tool_choice="none")
    assert got.status == "completed" and got.output_text == want.output_text


def test_previous_response_id_continues_a_stored_conversation(client):
    first = greedy_response(client, instructions="Answer in one word.")
    assert first.store is True
    follow_up = "And of Italy?"
    second = greedy_response(client, previous_response_id=first.id, input=follow_up)
    assert second.previous_response_id == first.id
    # The second turn saw the first (its input and answer, not its instructions), then its own.
    chat = chat_answer(
        client,
        [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": follow_up},
        ],
    )
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens

    # A third turn over the streamed second one: the store holds streamed responses too.
    events = list(
        client.responses.create(
            model=MODEL_NAME,
            input="Thanks.",
            previous_response_id=second.id,
            max_output_tokens=8,
            stream=True,
        )
    )
    third = events[-1].response  # completed, or incomplete at 8 tokens
    assert client.responses.retrieve(third.id).output_text == third.output_text

    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as caught:
        greedy_response(client, previous_response_id=first.id)
    assert caught.value.body["code"] == "previous_response_not_found"

    unstored = greedy_response(client, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": [WEATHER]}, "tools"),  # tool_choice auto needs --enable-auto-tool-choice
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True, "store": False}, "background"),  # background needs store
        ({"truncation": "auto"}, "truncation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": [1]}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
        ({"input": [{"role": None, "content": "hi"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": None}]}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input"),  # no output
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": {}}]}, "input"),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "xml"}}}, "text"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "word " * 3000}, "input"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),  # no name
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),  # no schema
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
    ],
)
def test_what_it_cannot_honour_is_a_400(client, change, param):
    with pytest.raises(openai.BadRequestError) as caught:
        greedy_response(client, **change)
    assert caught.value.body["param"] == param
