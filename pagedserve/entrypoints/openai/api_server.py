"""The OpenAI-compatible HTTP server: routes, API-key and body-size guard, start-up and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.entrypoints.anthropic.router import add_anthropic_routes
from pagedserve.entrypoints.openai.chat_batch import add_chat_batch_route
from pagedserve.entrypoints.openai.embeddings_protocol import (
    ClassifyRequest,
    EmbeddingRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
)
from pagedserve.entrypoints.openai.errors import APIError, install_error_handlers
from pagedserve.entrypoints.openai.lora_endpoints import add_lora_routes
from pagedserve.entrypoints.openai.middleware import (
    AccessLogFilter,
    GuardMiddleware,
    InternalErrorMiddleware,
    LoadMiddleware,
    RequestIdMiddleware,
)
from pagedserve.entrypoints.openai.pause_endpoints import add_pause_routes
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.entrypoints.openai.readiness import add_readiness_routes
from pagedserve.entrypoints.openai.render import add_render_routes
from pagedserve.entrypoints.openai.responses_protocol import ResponsesRequest
from pagedserve.entrypoints.openai.sagemaker import add_sagemaker_routes
from pagedserve.entrypoints.openai.serving_base import ApiDefaults, OpenAIServing
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.serving_completion import ServingCompletion
from pagedserve.entrypoints.openai.serving_embedding import ServingEmbedding
from pagedserve.entrypoints.openai.serving_responses import ServingResponses
from pagedserve.entrypoints.openai.serving_score import ServingScore
from pagedserve.entrypoints.openai.serving_tokenize import ServingTokenize
from pagedserve.entrypoints.openai.tokenize_protocol import DetokenizeRequest, TokenizeRequest
from pagedserve.entrypoints.openai.tokenizer_info import add_tokenizer_info_route
from pagedserve.entrypoints.vllm_launch_flags import add_middlewares
from pagedserve.lora.request import LoRARequest
from pagedserve.metrics import PREFIX as METRICS_PREFIX
from pagedserve.metrics import ServerMetrics, StatsLogger

logger = logging.getLogger("pagedserve.server")

# The endpoints that run the model (what --enable-server-load-tracking counts, and run-batch takes).
MODEL_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/embeddings",
    "/pooling",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/classify",
    "/v1/classify",
)


def package_version() -> str:
    try:
        return version("pagedserve")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class CorsSettings:
    """Which browser origins may call the API (vLLM's ``--allowed-origins`` and kin; none by
    default, as in vLLM 0.32)."""

    allow_origins: list[str] = field(default_factory=list)
    allow_methods: list[str] = field(default_factory=lambda: ["*"])
    allow_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False


@dataclass
class ServerSettings:
    served_model_names: list[str]
    host: str = "0.0.0.0"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # any one of them opens the API
    max_request_body_bytes: int = 4 * 1024 * 1024
    stats_interval_s: float = 5.0  # 0: no periodic stats line
    shutdown_timeout_s: float = 20.0
    access_log: bool = True
    tool_call_parser: str | None = None  # set: tool_choice "auto" is answered (vLLM's flags)
    reasoning_parser: str | None = None  # set: <think> text comes back as reasoning_content
    lora_modules: list[LoRARequest] = field(default_factory=list)  # served by their names
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter, /v1/unload_lora_adapter
    cors: CorsSettings = field(default_factory=CorsSettings)
    uvicorn_log_level: str | None = None  # None: as the root logger
    root_path: str = ""  # the prefix a proxy serves the API under
    request_id_headers: bool = False  # an X-Request-Id header on every response
    docs: bool = True  # /docs, /redoc and /openapi.json
    access_log_excluded: set[str] = field(default_factory=set)  # paths the access log skips
    # uvicorn's HTTPS settings: ssl_keyfile, ssl_certfile, ssl_ca_certs, ssl_cert_reqs, ssl_ciphers
    ssl: dict[str, Any] = field(default_factory=dict)
    defaults: ApiDefaults = field(default_factory=ApiDefaults)  # what the API flags set
    server_load_tracking: bool = False  # GET /load: requests in flight on MODEL_ROUTES
    # POST /reset_prefix_cache, /pause, /resume, ... (vLLM's VLLM_SERVER_DEV_MODE)
    dev_endpoints: bool = False
    tokenizer_info: bool = False  # GET /tokenizer_info
    scale_out: bool = False  # the render endpoints (vLLM's --enable-scale-out)
    metrics_prefix: str = METRICS_PREFIX  # "vllm:": vLLM's own metric names
    middleware: list[str] = field(default_factory=list)  # import paths (vLLM's --middleware)


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app serving ``engine``; starting the app starts the engine thread."""
    serving = OpenAIServing(
        engine,
        settings.served_model_names,
        settings.tool_call_parser,
        settings.reasoning_parser,
        settings.lora_modules,
        settings.defaults,
    )
    chat = ServingChat(serving)
    completion = ServingCompletion(serving)
    responses = ServingResponses(chat)
    embedding = ServingEmbedding(serving)
    scoring = ServingScore(serving)
    tokenize = ServingTokenize(serving)
    metrics = ServerMetrics(
        serving.model_name, engine.get_stats, engine.max_model_len, settings.metrics_prefix
    )
    engine.observer = metrics
    stats_logger = StatsLogger(engine.get_stats)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()

        async def log_stats() -> None:
            while True:
                await asyncio.sleep(settings.stats_interval_s)
                stats_logger.log()

        stats_task = asyncio.create_task(log_stats()) if settings.stats_interval_s > 0 else None
        try:
            yield
        finally:
            if stats_task is not None:
                stats_task.cancel()
            await responses.background.shutdown()  # nobody waits on them: stop them now
            if not await engine.wait_idle(timeout=5.0):
                logger.warning("%d request(s) still running at shutdown", engine.num_in_flight())
            engine.shutdown()

    docs = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="pagedserve",
        version=package_version(),
        lifespan=lifespan,
        root_path=settings.root_path,
        **docs,
    )
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)  # type: ignore[arg-type]
    app.add_middleware(
        GuardMiddleware,  # type: ignore[arg-type]
        api_keys=settings.api_keys,
        max_body_bytes=settings.max_request_body_bytes,
    )
    if settings.request_id_headers:  # outside the guard: its 401s and 413s carry one too
        app.add_middleware(RequestIdMiddleware)  # type: ignore[arg-type]
    load = [0]
    if settings.server_load_tracking:
        routes = frozenset((*MODEL_ROUTES, "/invocations", "/v1/chat/completions/batch"))
        app.add_middleware(LoadMiddleware, paths=routes, counter=load)  # type: ignore[arg-type]

        @app.get("/load")
        async def server_load() -> dict[str, int]:
            return {"server_load": load[0]}

    if settings.dev_endpoints:

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> dict[str, bool]:
            return {"success": await engine.call(lambda e: e.reset_prefix_cache())}

        add_pause_routes(app, engine)

    add_middlewares(app, settings.middleware)
    # Outside the guard: a browser's preflight (OPTIONS) carries no API key.
    app.add_middleware(
        CORSMiddleware,  # type: ignore[arg-type]
        allow_origins=settings.cors.allow_origins,
        allow_methods=settings.cors.allow_methods,
        allow_headers=settings.cors.allow_headers,
        allow_credentials=settings.cors.allow_credentials,
    )

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(req, raw)

    add_chat_batch_route(app, chat)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completion.create(req, raw)

    @app.post("/v1/responses")
    async def create_response(req: ResponsesRequest, raw: Request) -> Response:
        return await responses.create(req, raw)

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(
        response_id: str, stream: bool = False, starting_after: int | None = None
    ) -> Response:
        return responses.retrieve(response_id, stream, starting_after)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> dict[str, Any]:
        return await responses.cancel(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        return await responses.delete(response_id)

    @app.post("/v1/embeddings")
    async def create_embedding(req: EmbeddingRequest, raw: Request) -> Response:
        return await embedding.create(req, raw)

    @app.post("/pooling")
    async def create_pooling(req: PoolingRequest, raw: Request) -> Response:
        return await embedding.pool(req, raw)

    @app.post("/score")
    @app.post("/v1/score")
    async def create_score(req: ScoreRequest, raw: Request) -> Response:
        return await scoring.score(req, raw)

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def do_rerank(req: RerankRequest, raw: Request) -> Response:
        return await scoring.rerank(req, raw)

    @app.post("/classify")
    @app.post("/v1/classify")
    async def do_classify(req: ClassifyRequest, raw: Request) -> Response:
        return await scoring.classify(req, raw)

    def model_card(name: str) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "pagedserve",
            "root": engine.model_name,
            "parent": None,
            "max_model_len": engine.max_model_len,
        }

    def adapter_card(lora: LoRARequest) -> dict[str, Any]:
        base = settings.served_model_names[0]
        card = {**model_card(lora.lora_name), "root": lora.lora_path, "parent": base}
        return card

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        cards = [model_card(n) for n in settings.served_model_names]
        cards += [adapter_card(lora) for lora in serving.lora_modules.values()]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        serving.check_model(name)
        lora = serving.lora_modules.get(name)
        return adapter_card(lora) if lora is not None else model_card(name)

    if settings.allow_runtime_lora_updating:
        add_lora_routes(app, serving)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    # /invocations serves the first of these whose body the request fits (vLLM's order).
    rank_and_score = [(RerankRequest, scoring.rerank), (ScoreRequest, scoring.score)]
    if engine.pooler is None:
        invocable = [(ChatCompletionRequest, chat.create), (CompletionRequest, completion.create)]
    elif engine.is_classifier:
        invocable = [(ClassifyRequest, scoring.classify), *rank_and_score]
    else:  # EmbeddingRequest's fields are all optional: it takes what the others leave
        invocable = [*rank_and_score, (EmbeddingRequest, embedding.create)]
    add_sagemaker_routes(app, health, invocable)
    add_readiness_routes(app, engine)
    if settings.tokenizer_info:
        add_tokenizer_info_route(app, engine)
    add_render_routes(app, chat, completion, settings.scale_out)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": package_version()}

    @app.post("/tokenize")
    async def post_tokenize(req: TokenizeRequest) -> JSONResponse:
        return JSONResponse(await tokenize.tokenize(req))

    @app.post("/detokenize")
    async def post_detokenize(req: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(tokenize.detokenize(req))

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    add_anthropic_routes(app, chat)  # last: its error middleware wraps all the others
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, but SIGINT/SIGTERM end it with exit status 0.

    uvicorn re-raises a caught signal after its graceful shutdown, which turns a clean stop into
    death by signal (or a KeyboardInterrupt traceback). Here the signal only starts the graceful
    shutdown: stop accepting, let in-flight requests finish (bounded), stop the engine, return.
    """

    def __init__(self, config: uvicorn.Config, url: str) -> None:
        super().__init__(config)
        self._url = url

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            logger.info("pagedserve is ready: %s (OpenAI API at %s/v1)", self._url, self._url)


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port now, so a taken port fails before minutes of model loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, so that asyncio sets TCP_NODELAY on each accepted connection (it checks
    # the protocol): with Nagle on, a response written in two pieces waited for the client's
    # delayed ACK, 40 ms a request on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(engine: AsyncEngine, settings: ServerSettings, sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM; returns after a graceful shutdown."""
    app = build_app(engine, settings)
    if settings.uvicorn_log_level is not None:
        level = settings.uvicorn_log_level.upper()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(5 if level == "TRACE" else level)
    if settings.access_log_excluded:
        logging.getLogger("uvicorn.access").addFilter(AccessLogFilter(settings.access_log_excluded))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=settings.access_log,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        timeout_keep_alive=5,
        **settings.ssl,
    )
    shown_host = "localhost" if settings.host in ("0.0.0.0", "::", "") else settings.host
    scheme = "https" if settings.ssl.get("ssl_certfile") else "http"
    server = _Server(config, f"{scheme}://{shown_host}:{settings.port}")
    server.run(sockets=[sock] if sock is not None else None)
