"""POST /v1/embeddings: one embedding per input (or per conversation), OpenAI's response shape;
and vLLM's POST /pooling, the same inputs answered with the model's pooled output as it is.

Served by a pooling engine (``--runner pooling``, or a sentence-transformers model directory);
a generating one answers with a 400, as vLLM's does. ``encoding_format: "base64"`` (what the
``openai`` client asks for by default) sends each embedding's float32 bytes in this machine's
byte order, or those of vLLM's ``embed_dtype`` and ``endianness``.
"""

from __future__ import annotations

import base64
import sys
import time
from typing import Any

import torch
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.entrypoints.openai.embeddings_protocol import EmbeddingRequest, PoolingRequest
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import truncated
from pagedserve.entrypoints.openai.serving_base import OpenAIServing, new_id
from pagedserve.entrypoints.openai.streams import cancel_on_disconnect, last_output
from pagedserve.outputs import EmbeddingRequestOutput
from pagedserve.pooling_params import PoolingParams


class ServingEmbedding:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def create(self, req: EmbeddingRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        self._check_pooling(
            "this model is served for generation, not embeddings; start the server with "
            "--runner pooling to serve /v1/embeddings"
        )
        if s.engine.is_classifier:
            raise bad_request(
                "this model is a classifier: it scores text pairs (/score, /rerank) and "
                "classifies texts (/classify), it does not embed",
                param="model",
            )
        return await self._run(req, raw, self._embedding_params(req), "embd", "embedding")

    async def pool(self, req: PoolingRequest, raw: Request) -> Response:
        """vLLM's ``/pooling``: each input's pooled output as it comes from the model, an
        embedding model's embedding or a classifier's class probabilities."""
        s = self.s
        s.check_model(req.model)
        self._check_pooling(
            "this model is served for generation; /pooling needs a pooling model, started "
            "with --runner pooling"
        )
        own_task = "classify" if s.engine.is_classifier else "embed"
        if req.task not in (None, own_task):
            raise bad_request(
                f"task {req.task!r} is not served by this model; it serves {own_task!r}",
                param="task",
            )
        if own_task == "classify":
            if req.dimensions is not None or req.normalize is not None:
                raise bad_request(
                    "dimensions and normalize apply to embeddings, not to a classifier's "
                    "probabilities",
                    param="dimensions" if req.dimensions is not None else "normalize",
                )
            params = PoolingParams()
        else:
            params = self._embedding_params(req)
        return await self._run(req, raw, params, "pool", "pooling")

    def _check_pooling(self, message: str) -> None:
        if self.s.engine.pooler is None:
            raise bad_request(message, param="model")

    def _embedding_params(self, req: EmbeddingRequest) -> PoolingParams:
        try:
            params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize)
            self.s.engine.pooler.check(params)
        except ValueError as exc:
            raise bad_request(str(exc), param="dimensions") from exc
        return params

    async def _run(
        self, req: EmbeddingRequest, raw: Request, params: PoolingParams, prefix: str, kind: str
    ) -> Response:
        """Pool every input of ``req`` with ``params``; the answer lists them as ``kind``
        objects (``embedding``: OpenAI's embeddings; ``pooling``: vLLM's /pooling)."""
        s = self.s
        prompts = [self._checked(ids, req) for ids in await self._token_ids(req)]
        request_id = new_id(prefix)
        created = int(time.time())

        async def run() -> Response:
            streams = await s.submit_all(request_id, prompts, [params] * len(prompts), req)
            try:
                outputs = [await last_output(stream) for stream in streams]
            finally:
                for stream in streams:
                    stream.abort()
            return JSONResponse(self._response(req, request_id, created, outputs, kind))

        return await cancel_on_disconnect(raw, run)

    async def _token_ids(self, req: EmbeddingRequest) -> list[list[int]]:
        s = self.s
        if req.messages is not None:
            if req.input is not None:
                raise bad_request("give either input or messages, not both", param="messages")
            text = s.render_chat(req)
            return [await s.tokenize(text, bool(req.add_special_tokens))]
        add_special = req.add_special_tokens is not False
        token_ids = []
        for given in req.inputs():
            if isinstance(given, str):
                token_ids.append(await s.tokenize(given, add_special))
            else:
                s.check_token_ids(given, "input")
                token_ids.append(given)
        return token_ids

    def _checked(self, ids: list[int], req: EmbeddingRequest) -> list[int]:
        limit = self.s.max_model_len
        ids = truncated(ids, req.truncate_prompt_tokens, limit, req.truncation_side)
        if not ids:
            raise bad_request("input must not be empty", param="input")
        if len(ids) > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids)} tokens in the input for embedding generation. Please reduce the "
                "length of the input.",
                param="input",
                code="context_length_exceeded",
            )
        return ids

    def _response(
        self,
        req: EmbeddingRequest,
        request_id: str,
        created: int,
        outputs: list[EmbeddingRequestOutput],
        kind: str,
    ) -> dict[str, Any]:
        data = []
        key = "embedding" if kind == "embedding" else "data"
        for i, out in enumerate(outputs):
            values: list[float] | str = out.outputs.embedding
            if req.encoding_format == "base64":
                values = base64_embedding(values, req.embed_dtype, req.endianness)
            data.append({"object": kind, key: values, "index": i})
        num_tokens = sum(len(out.prompt_token_ids) for out in outputs)
        return {
            "id": request_id,
            "object": "list",
            "created": created,
            "model": self.s.model_name,
            "data": data,
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
        }


_EMBED_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


def base64_embedding(values: list[float], embed_dtype: str, endianness: str) -> str:
    """An embedding's bytes in vLLM's ``embed_dtype`` (``endianness``: the byte order of each
    value, ``native`` this machine's), base64-encoded."""
    dtype = _EMBED_DTYPES[embed_dtype]
    raw = torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.uint8).numpy()
    if endianness not in ("native", sys.byteorder) and dtype.itemsize > 1:
        raw = raw.reshape(-1, dtype.itemsize)[:, ::-1]
    return base64.b64encode(raw.tobytes()).decode("ascii")
