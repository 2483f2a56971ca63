"""vLLM's server flags that launch scripts carry over (the engine's are in ``engine_options``):
CORS, logging and the proxy path, as vLLM takes them."""

from __future__ import annotations

import argparse
import json

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
        default=["*"],
        help='CORS: origins whose browsers may call the API, as JSON (default ["*"])',
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
