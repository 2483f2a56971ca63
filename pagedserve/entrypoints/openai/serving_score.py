"""vLLM's ``POST /score`` (and ``/v1/score``) and ``/rerank`` (``/v1/rerank``, ``/v2/rerank``):
scores of text pairs from a cross-encoder (each pair one input) or an embedding model (the
cosine similarity of the two texts' embeddings; see :mod:`pagedserve.entrypoints.scoring`);
and ``/classify``: a sequence classifier's class probabilities for each input."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.entrypoints.openai.embeddings_protocol import (
    ClassifyRequest,
    RerankRequest,
    ScoreRequest,
)
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import truncated, truncation_length
from pagedserve.entrypoints.openai.serving_base import OpenAIServing, new_id
from pagedserve.entrypoints.openai.streams import cancel_on_disconnect, last_output
from pagedserve.entrypoints.scoring import cosine, pair_token_ids, score_pairs
from pagedserve.pooling_params import PoolingParams


class ServingScore:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def score(self, req: ScoreRequest, raw: Request) -> Response:
        try:
            pairs = score_pairs(req.text_1, req.text_2)
        except ValueError as exc:
            raise bad_request(str(exc), param="text_2") from exc

        async def run() -> Response:
            scores, num_tokens = await self._scores(pairs, req)
            data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
            body = {
                "id": new_id("score"),
                "object": "list",
                "created": int(time.time()),
                "model": self.s.model_name,
                "data": data,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
            }
            return JSONResponse(body)

        return await cancel_on_disconnect(raw, run)

    async def rerank(self, req: RerankRequest, raw: Request) -> Response:
        if not req.documents:
            raise bad_request("documents must not be empty", param="documents")
        if req.top_n is not None and req.top_n < 0:
            raise bad_request(f"top_n must be >= 0, got {req.top_n}", param="top_n")
        pairs = [(req.query, doc) for doc in req.documents]

        async def run() -> Response:
            scores, num_tokens = await self._scores(pairs, req)
            ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
            results = [
                {"index": i, "document": {"text": req.documents[i]}, "relevance_score": scores[i]}
                for i in ranked[: req.top_n or None]
            ]
            body = {
                "id": new_id("rerank"),
                "model": self.s.model_name,
                "usage": {"total_tokens": num_tokens},
                "results": results,
            }
            return JSONResponse(body)

        return await cancel_on_disconnect(raw, run)

    async def classify(self, req: ClassifyRequest, raw: Request) -> Response:
        s = self.s
        s.check_model(req.model)
        if not s.engine.is_classifier:
            raise bad_request(
                "this model has no classification head (*ForSequenceClassification)",
                param="model",
            )
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or not all(texts):
            raise bad_request("input must hold non-empty texts", param="input")
        inputs = [
            truncated(await s.tokenize(text, True), req.truncate_prompt_tokens, s.max_model_len)
            for text in texts
        ]
        labels = s.engine.class_labels

        async def run() -> Response:
            data = [
                {
                    "index": i,
                    "label": labels.get(max(range(len(probs)), key=probs.__getitem__)),
                    "probs": probs,
                    "num_classes": len(probs),
                }
                for i, probs in enumerate(await self._pooled(inputs, req))
            ]
            num_tokens = sum(map(len, inputs))
            body = {
                "id": new_id("classify"),
                "object": "list",
                "created": int(time.time()),
                "model": s.model_name,
                "data": data,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
            }
            return JSONResponse(body)

        return await cancel_on_disconnect(raw, run)

    async def _pooled(
        self, inputs: list[list[int]], req: ScoreRequest | RerankRequest | ClassifyRequest
    ) -> list[list[float]]:
        """Each input's pooled output: its embedding, or a classifier's label scores."""
        s = self.s
        limit = s.max_model_len
        for ids in inputs:
            if len(ids) > limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, an input "
                    f"has {len(ids)} tokens. Please reduce the length of the input, or set "
                    "truncate_prompt_tokens.",
                    param="truncate_prompt_tokens",
                    code="context_length_exceeded",
                )
        streams = await s.submit_all(new_id("pool"), inputs, [PoolingParams()] * len(inputs), req)
        try:
            return [(await last_output(stream)).outputs.embedding for stream in streams]
        finally:
            for stream in streams:
                stream.abort()

    async def _scores(
        self, pairs: list[tuple[str, str]], req: ScoreRequest | RerankRequest
    ) -> tuple[list[float], int]:
        """Each pair's score, and the tokens the model read."""
        s = self.s
        s.check_model(req.model)
        if s.engine.pooler is None:
            raise bad_request(
                "this model is served for generation; scores need a cross-encoder or an "
                "embedding model, started with --runner pooling",
                param="model",
            )
        cross = s.engine.is_classifier
        if cross:
            keep = truncation_length(req.truncate_prompt_tokens, s.max_model_len)
            inputs = [pair_token_ids(s.tokenizer, a, b, keep) for a, b in pairs]
        else:
            texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each embedded once
            inputs = [
                truncated(await s.tokenize(text, True), req.truncate_prompt_tokens, s.max_model_len)
                for text in texts
            ]
        vectors = await self._pooled(inputs, req)
        num_tokens = sum(map(len, inputs))
        if cross:
            return [v[0] for v in vectors], num_tokens
        embedded = dict(zip(texts, vectors, strict=True))
        return [cosine(embedded[a], embedded[b]) for a, b in pairs], num_tokens
