"""Background responses (``background: true``) of the Responses API, end to end: a real
``pagedserve serve`` process on the packaged SmolLM2, driven by the official ``openai`` client.
The POST answers at once; the answer is polled, streamed again, cancelled or deleted. The
server and client are conftest's."""

from __future__ import annotations

import time

import openai
import pytest
from server_utils import MODEL_NAME, metrics, packaged_server, request, wait_until_idle

QUESTION = "What is the capital of France?"
LONG = 1800  # output tokens (with ignore_eos): still running when the test cancels it
RUNNING = ("queued", "in_progress")


def greedy(client, **kwargs):
    args = {"model": MODEL_NAME, "input": QUESTION, "max_output_tokens": 24, "temperature": 0}
    return client.responses.create(**{**args, **kwargs})


def long_response(client):
    return client.responses.create(
        model=MODEL_NAME,
        input="Tell me a long story.",
        max_output_tokens=LONG,
        background=True,
        extra_body={"ignore_eos": True},
    )


def poll(client, response_id, until):
    """Retrieve the response until its status is not one of ``until``'s; returns it."""
    deadline = time.monotonic() + 120
    while True:
        r = client.responses.retrieve(response_id)
        if r.status not in until or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def aborts(url):
    return sum(v for k, v in metrics(url).items() if 'finished_reason="abort"' in k)


def test_background_response_completes_as_a_foreground_one(client):
    foreground = greedy(client)
    queued = greedy(client, background=True)
    assert queued.status in ("queued", "in_progress") and queued.background is True
    assert queued.output == [] and queued.usage is None
    done = poll(client, queued.id, RUNNING)
    assert done.id == queued.id and done.status == "completed" and done.background is True
    assert done.output_text == foreground.output_text
    assert done.usage.input_tokens == foreground.usage.input_tokens
    assert done.usage.output_tokens == foreground.usage.output_tokens
    cut = poll(client, greedy(client, background=True, max_output_tokens=3).id, RUNNING)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    # A stored background response is continued as a foreground one is.
    follow_up = greedy(client, previous_response_id=done.id, input="And of Italy?")
    assert follow_up.status in ("completed", "incomplete") and follow_up.output_text


def test_cancel_stops_the_engine_request_and_frees_its_blocks(server, client):
    aborted_before = aborts(server.url)
    running = poll(client, long_response(client).id, ("queued",))
    assert running.status == "in_progress"
    cancelled = client.responses.cancel(running.id)
    assert cancelled.id == running.id and cancelled.status == "cancelled"
    assert client.responses.retrieve(running.id).status == "cancelled"
    assert client.responses.cancel(running.id).status == "cancelled"  # idempotent, as OpenAI's
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    assert aborts(server.url) - aborted_before == 1
    assert greedy(client).status == "completed"  # the server serves on


def test_delete_stops_a_running_background_response(server, client):
    running = poll(client, long_response(client).id, ("queued",))
    assert running.status == "in_progress"
    client.responses.delete(running.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(running.id)
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0


def shape(events):
    """The events' types, each run of text deltas as one: how many deltas carry the text depends
    on how far the reader was behind the engine (outputs it has not read yet are merged)."""
    types = [e.type for e in events]
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1] or "delta" not in t]


def test_streamed_background_response_can_be_streamed_again(client):
    foreground = list(greedy(client, stream=True))
    events = list(greedy(client, background=True, stream=True))
    assert shape(events) == shape(foreground)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[0].response.status == "queued" and events[0].response.background is True
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.status == "completed" and final.output_text == foreground[-1].response.output_text
    assert deltas == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text
    again = list(client.responses.retrieve(final.id, stream=True, starting_after=2))
    assert [e.sequence_number for e in again] == list(range(3, len(events)))
    with client.responses.stream(response_id=final.id) as stream:
        assert stream.get_final_response().output_text == final.output_text
    with pytest.raises(openai.BadRequestError) as caught:  # a foreground response has no events
        client.responses.retrieve(greedy(client).id, stream=True)
    assert caught.value.body["param"] == "stream"


def test_background_needs_store(client):
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(client, background=True, store=False)
    assert caught.value.body["param"] == "background"


def test_cancel_of_what_cannot_be_cancelled(server, client):
    status, body = request(server.url + "/v1/responses/resp_unknown/cancel", "POST")
    assert status == 404
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "response_id" and "resp_unknown" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_unknown")
    # A finished response, foreground or background, is a 400 (as vLLM answers).
    finished = [greedy(client).id, poll(client, greedy(client, background=True).id, RUNNING).id]
    for response_id in finished:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.cancel(response_id)
        assert caught.value.body["param"] == "response_id"
        assert client.responses.retrieve(response_id).status == "completed"


def test_previous_response_id_of_a_running_response_is_a_400(server, client):
    running = long_response(client)
    with pytest.raises(openai.BadRequestError) as caught:
        greedy(client, previous_response_id=running.id)
    assert caught.value.body["param"] == "previous_response_id"
    assert client.responses.cancel(running.id).status == "cancelled"
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_shutdown_stops_running_background_responses():
    srv = packaged_server()
    try:
        client = srv.client()
        ids = [long_response(client).id for _ in range(2)]
        assert poll(client, ids[0], ("queued",)).status == "in_progress"
        assert srv.stop() == 0  # SIGTERM; stop() kills a server that does not exit
        output = srv.output()
        assert "Traceback" not in output and "still running at shutdown" not in output, output
    finally:
        srv.close()
