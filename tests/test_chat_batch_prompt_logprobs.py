"""The batch chat route asks the engine for no prompt logprobs: its answer carries none (as
vLLM 0.32's batch answer), whether ``echo`` or ``prompt_logprobs`` would ask for them. Run
in process, through the app, so the engine requests the route builds can be seen."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from server_utils import MODEL_NAME, ROLE_TEMPLATE

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.entrypoints.openai.api_server import ServerSettings, build_app
from pagedserve.entrypoints.openai.run_batch import post as post_in_process

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "one two three"}],
]


async def post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """One request through the ASGI app, as ``run-batch`` sends its lines; its JSON answer."""
    status, answer = await post_in_process(app, path, json.dumps(body).encode())
    return status, json.loads(answer)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: the engine hands its outputs to the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir, loop):
    config = EngineConfig(
        model=tiny_model_dir("llama"),
        device="cpu",
        kv_cache_memory=0.01,
        chat_template=ROLE_TEMPLATE,
    )
    engine = AsyncEngine.built(lambda: LLMEngine(config))
    asked: list[Any] = []
    add_request = engine.engine.add_request

    def recording(request_id, prompt, params, *args, **kwargs):
        asked.append(params)
        return add_request(request_id, prompt, params, *args, **kwargs)

    engine.engine.add_request = recording
    engine.asked = asked
    yield engine
    engine.shutdown()


def run_both(engine, loop, body: dict[str, Any]) -> tuple[tuple[int, Any], list[tuple[int, Any]]]:
    """The batch answer, and each conversation's answer from chat, with what each asked."""
    app = build_app(engine, ServerSettings([MODEL_NAME], stats_interval_s=0))

    async def go():
        engine.start()
        batch = await post(app, "/v1/chat/completions/batch", {**body, "messages": CONVERSATIONS})
        singles = [
            await post(app, "/v1/chat/completions", {**body, "messages": c}) for c in CONVERSATIONS
        ]
        return batch, singles

    return loop.run_until_complete(go())


@pytest.mark.parametrize(
    "asks",
    [{"echo": True}, {"echo": True, "top_logprobs": 2, "logprobs": True}, {"prompt_logprobs": 1}],
)
def test_a_batch_asks_the_engine_for_no_prompt_logprobs(engine, loop, asks):
    body = {"model": MODEL_NAME, "max_tokens": 3, "temperature": 0, "ignore_eos": True, **asks}
    engine.asked.clear()
    (status, batch), singles = run_both(engine, loop, body)
    assert status == 200, batch
    batch_asked, single_asked = engine.asked[:2], engine.asked[2:]
    assert [p.prompt_logprobs for p in batch_asked] == [None, None]
    assert all(p.prompt_logprobs is not None for p in single_asked)  # chat's own answer has them
    assert batch["prompt_logprobs"] is None
    for i, (single_status, single) in enumerate(singles):
        assert single_status == 200, single
        assert single["prompt_logprobs"] is not None
        ours, theirs = batch["choices"][i], {**single["choices"][0], "index": i}
        assert {**ours, "logprobs": None} == {**theirs, "logprobs": None}
        (our_tokens, our_values), (tokens, values) = flat_logprobs(ours), flat_logprobs(theirs)
        assert our_tokens == tokens and our_values == pytest.approx(values, abs=1e-5)


def flat_logprobs(choice: dict[str, Any]) -> tuple[list[str], list[float]]:
    """A choice's logprobs' tokens and values, the alternatives' too: one batch and two single
    runs may differ in the last bits."""
    entries = []
    for t in (choice["logprobs"] or {}).get("content") or []:
        entries += [t, *t.get("top_logprobs", [])]
    return [e["token"] for e in entries], [e["logprob"] for e in entries]


def test_a_bad_prompt_logprobs_is_still_a_400(engine, loop):
    body = {"model": MODEL_NAME, "max_tokens": 3, "prompt_logprobs": 10_000}
    (status, batch), _ = run_both(engine, loop, body)
    assert status == 400 and batch["error"]["param"] == "prompt_logprobs", batch
