"""vLLM's server flags that launch scripts carry over (the engine's are in ``engine_options``):
CORS, HTTPS, logging, request ids, the docs pages and the proxy path, as vLLM takes them."""

from __future__ import annotations

import argparse
import json
import ssl
from typing import Any

UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def json_list(text: str) -> list[str]:
    """A JSON list of strings (``'["*"]'``), as vLLM's CORS flags take."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError("must be a JSON list of strings, e.g. '[\"*\"]'")
    return value


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server (vLLM's flags)")
    g.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="accepted, no effect: prompts and parameters are never logged (the access log's "
        "line per request is --disable-access-log)",
    )
    g.add_argument("--disable-log-stats", action="store_true", help="no periodic stats log line")
    g.add_argument(
        "--uvicorn-log-level",
        choices=UVICORN_LOG_LEVELS,
        default=None,
        help="the HTTP server's own log level (default: --log-level)",
    )
    g.add_argument(
        "--allowed-origins",
        type=json_list,
        default=[],
        help="CORS: origins whose browsers may call the API, as JSON, e.g. '[\"*\"]' for any "
        "(default none: browsers on other origins may not, as in vLLM)",
    )
    g.add_argument(
        "--allowed-methods", type=json_list, default=["*"], help='CORS methods (default ["*"])'
    )
    g.add_argument(
        "--allowed-headers", type=json_list, default=["*"], help='CORS headers (default ["*"])'
    )
    g.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    g.add_argument(
        "--root-path",
        default=None,
        help="the path prefix a proxy serves the API under (FastAPI's root_path)",
    )
    g.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="an X-Request-Id header on every response (the request's own, else a new one)",
    )
    g.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="no /docs, /redoc or /openapi.json",
    )
    g.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="no per-request log line (the same as --disable-access-log)",
    )
    g.add_argument(
        "--disable-access-log-for-endpoints",
        default=None,
        help="comma-separated paths whose requests the access log skips, e.g. /health,/metrics",
    )
    g.add_argument(
        "--enable-server-load-tracking",
        action="store_true",
        help='GET /load answers {"server_load": N}: the requests running the model now',
    )
    g.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="GET /tokenizer_info answers the tokenizer's configuration (its chat template too)",
    )
    g.add_argument(
        "--enable-scale-out",
        action="store_true",
        help="the render endpoints (POST /v1/chat/completions/render, /v1/completions/render, "
        "/v1/messages/render: a request's prompt tokens and sampling parameters, not run)",
    )
    g.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="accepted, no effect: prompts are never logged",
    )
    g.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="accepted, no effect: usage always has prompt_tokens_details.cached_tokens",
    )
    tls = parser.add_argument_group("HTTPS (vLLM's flags)")
    tls.add_argument("--ssl-keyfile", default=None, help="the server's private key (PEM)")
    tls.add_argument("--ssl-certfile", default=None, help="the server's certificate (PEM)")
    tls.add_argument(
        "--ssl-ca-certs", default=None, help="CA certificates that client certificates chain to"
    )
    tls.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=int(ssl.CERT_NONE),
        help="client certificates: 0 not asked for (default), 1 optional, 2 required "
        "(Python's ssl.CERT_*)",
    )
    tls.add_argument("--ssl-ciphers", default=None, help="the TLS 1.2 cipher suites to offer")


def ssl_settings(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's keyword arguments for the HTTPS flags given (none: plain HTTP)."""
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        raise SystemExit("error: HTTPS needs both --ssl-keyfile and --ssl-certfile")
    if args.ssl_certfile is None:
        return {}
    settings: dict[str, Any] = {
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_certfile": args.ssl_certfile,
        "ssl_cert_reqs": args.ssl_cert_reqs,
    }
    if args.ssl_ca_certs is not None:
        settings["ssl_ca_certs"] = args.ssl_ca_certs
    if args.ssl_ciphers is not None:
        settings["ssl_ciphers"] = args.ssl_ciphers
    return settings
