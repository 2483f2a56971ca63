"""``pagedserve run-batch``: a file in OpenAI's Batch API format, run offline (vLLM's
``run-batch``).

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``. Each output line, in the
input's order, is ``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``. The server's own app answers every line in this process, so a line gets exactly what
the HTTP API would answer: the same checks, the same errors. A failed line carries the error body
in ``response.body`` (as OpenAI's batch output does) and its ``error`` object in ``error`` (where
vLLM's run-batch puts it); it never stops the others.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.types import ASGIApp, Message
from tqdm import tqdm

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.entrypoints.openai.api_server import MODEL_ROUTES, ServerSettings, build_app
from pagedserve.entrypoints.openai.errors import error_body

logger = logging.getLogger("pagedserve.run_batch")


class BatchLineError(ValueError):
    """A line that is not a request this runner can send (answered as a 400 of its own)."""

    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.custom_id = custom_id


def parse_line(line: bytes | str) -> tuple[str | None, str, bytes]:
    """(custom_id, url, JSON body) of one input line."""
    try:
        text = line.decode() if isinstance(line, bytes) else line
    except UnicodeDecodeError as exc:
        raise BatchLineError(f"the line is not UTF-8 text: {exc}") from exc
    try:
        item = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BatchLineError(f"the line is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BatchLineError("the line is nested too deeply to read as JSON") from exc
    if not isinstance(item, dict):
        raise BatchLineError("the line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        raise BatchLineError("custom_id: a string is required")
    method = item.get("method", "POST")
    if method != "POST":
        raise BatchLineError(f"method: only POST is supported, not {method!r}", custom_id)
    url = item.get("url")
    if url not in MODEL_ROUTES:
        raise BatchLineError(f"url: {url!r} is not one of {', '.join(MODEL_ROUTES)}", custom_id)
    body = item.get("body")
    if not isinstance(body, dict):
        raise BatchLineError("body: a JSON object is required", custom_id)
    if body.get("stream"):
        raise BatchLineError("body.stream: a batch request can not stream", custom_id)
    if body.get("background"):  # its answer would be lost when the run ends
        raise BatchLineError(
            "body.background: a batch request can not run in the background", custom_id
        )
    return custom_id, url, json.dumps(body).encode()


async def post(app: ASGIApp, path: str, body: bytes) -> tuple[int, bytes]:
    """POST ``body`` to ``app`` at ``path`` in process; (status, response body)."""
    finished = asyncio.Event()
    delivered = False
    status = 500
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client stays connected until the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("run-batch", 0),
        "server": ("run-batch", 0),
    }
    try:
        await app(scope, receive, send)
    except Exception:  # noqa: BLE001 - what the app's error middleware could not answer
        logger.exception("run-batch: a request failed")
        if not chunks:
            status = 500
            chunks = [json.dumps(error_body("internal server error", "server_error")).encode()]
    finally:
        finished.set()
    return status, b"".join(chunks)


def output_line(custom_id: str | None, status: int, body: Any) -> dict[str, Any]:
    error = body.get("error") if status != 200 and isinstance(body, dict) else None
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": f"batch-{uuid.uuid4().hex}",
            "body": body,
        },
        "error": error,
    }


async def answer(app: ASGIApp, line: bytes) -> dict[str, Any]:
    """The output line for one input line."""
    try:
        custom_id, url, body = parse_line(line)
    except BatchLineError as exc:
        return output_line(exc.custom_id, 400, error_body(exc.message, "invalid_request_error"))
    status, raw = await post(app, url, body)
    try:
        parsed = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        parsed = error_body(raw.decode(errors="replace"), "server_error")
    return output_line(custom_id, status, parsed)


async def input_lines(source: str) -> AsyncIterator[bytes]:
    """The non-blank lines of a local file or of an http(s) URL's body, undecoded (a line that is
    not UTF-8 fails alone), without the byte order mark an editor may have put first."""
    first = True
    async for raw in _raw_lines(source):
        line = raw.removeprefix(codecs.BOM_UTF8) if first else raw
        first = False
        if line.strip():
            yield line


async def _raw_lines(source: str) -> AsyncIterator[bytes]:
    if source.startswith(("http://", "https://")):
        async with aiohttp.ClientSession() as session, session.get(source) as resp:
            resp.raise_for_status()
            async for raw in resp.content:
                yield raw
        return
    with open(source, "rb") as f:
        for line in f:
            yield line


class OrderedWriter:
    """Writes results in the input's order as they complete, holding back only those that
    finish before an earlier one."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.next = 0
        self.waiting: dict[int, dict[str, Any]] = {}

    def add(self, index: int, result: dict[str, Any]) -> None:
        self.waiting[index] = result
        while self.next in self.waiting:
            self.file.write(json.dumps(self.waiting.pop(self.next)) + "\n")
            self.next += 1


async def run_batch(
    app: ASGIApp, source: str, out: Any, max_in_flight: int, total: int | None = None
) -> tuple[int, int]:
    """Answer every line of ``source`` (``total`` of them, if known: the progress bar's end) into
    ``out`` with at most ``max_in_flight`` at once; (lines answered, lines that failed)."""
    writer = OrderedWriter(out)
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()
    failed = 0
    bar = tqdm(total=total, desc="run-batch", unit="req", mininterval=2)

    async def one(index: int, line: bytes) -> None:
        nonlocal failed
        try:
            result = await answer(app, line)
        finally:
            slots.release()
        failed += result["response"]["status_code"] != 200
        writer.add(index, result)
        bar.update()

    count = 0
    with bar:
        async for line in input_lines(source):
            await slots.acquire()
            task = asyncio.create_task(one(count, line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            count += 1
        await asyncio.gather(*tasks)
    return count, failed


async def _run(engine: AsyncEngine, settings: ServerSettings, source: str, target: str) -> int:
    app = build_app(engine, settings)
    upload = target.startswith(("http://", "https://"))
    path = tempfile.mkstemp(suffix=".jsonl")[1] if upload else target
    max_in_flight = 2 * engine.engine.config.max_num_seqs
    total = None
    if not source.startswith(("http://", "https://")):
        with open(source, "rb") as f:
            total = sum(1 for line in f if line.strip())
    try:
        async with app.router.lifespan_context(app):
            with open(path, "w", encoding="utf-8") as out:
                count, failed = await run_batch(app, source, out, max_in_flight, total)
        if upload:
            async with aiohttp.ClientSession() as session:
                with open(path, "rb") as f:
                    async with session.put(target, data=f) as resp:
                        resp.raise_for_status()
    finally:
        if upload:
            os.unlink(path)
    logger.info("%d requests, %d failed; the results are in %s", count, failed, target)
    return 0


def run_batch_file(engine: AsyncEngine, settings: ServerSettings, source: str, target: str) -> int:
    """Run the batch in ``source`` into ``target`` (files or URLs); the exit status."""
    try:
        return asyncio.run(_run(engine, settings, source, target))
    except (OSError, aiohttp.ClientError) as exc:
        logger.error("run-batch: %s", exc)
        return 1
