"""The ``pagedserve`` command: ``serve``, ``run-batch``, ``chat``, ``generate`` and ``bench``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from pagedserve.entrypoints.engine_options import (
    add_engine_args,
    chat_template_arg,
    generating_engine,
    json_object,
    load_engine,
    lora_module,
    take_model_option,
)
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedserve.entrypoints.vllm_flags import add_vllm_flags, ssl_settings
from pagedserve.entrypoints.vllm_launch_flags import add_launch_flags, with_config_file
from pagedserve.reasoning_parsers import REASONING_PARSERS

logger = logging.getLogger("pagedserve")

BENCHMARKS = ("throughput", "serve", "latency")
DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
        datefmt="%m-%d %H:%M:%S",
    )


# ---- serve and run-batch ----
def add_api_args(parser: argparse.ArgumentParser) -> None:
    """What the OpenAI API answers with: the model's names, adapters, tool and reasoning parsers
    (``serve`` and ``run-batch`` both take these)."""
    add_engine_args(parser)
    g = parser.add_argument_group("API")
    g.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model name(s) the API accepts; the first is the one reported "
        "(default: the model argument, or SmolLM2-135M-Instruct for the packaged model)",
    )
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="answer tool_choice 'auto' (the default with tools): the model may call tools, "
        "read back with --tool-call-parser",
    )
    g.add_argument(
        "--tool-call-parser",
        choices=sorted(TOOL_PARSERS),
        default=None,
        help="the model's tool-call format: hermes (Hermes, Qwen2.5, Qwen3), llama3_json "
        "(Llama 3.1/3.2 JSON), mistral (Mistral's [TOOL_CALLS]), pythonic (Llama 3.2/4 "
        "Python-style call lists), granite (Granite 3.0/3.1), granite4 (Granite 4), and the "
        "others listed",
    )
    g.add_argument(
        "--reasoning-parser",
        choices=sorted(REASONING_PARSERS),
        default=None,
        help="split a reasoning model's <think> text into reasoning_content, count its "
        "reasoning_tokens and hold it to a request's thinking_token_budget: deepseek_r1 "
        "(DeepSeek-R1 and its distills, QwQ), qwen3, olmo3 (OLMo 3 Think), mistral "
        "(Magistral's [THINK]) or granite (Granite 3.2's 'Here is my thought process:')",
    )
    g.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module,
        default=None,
        help='LoRA adapters to serve, each name=path (or JSON {"name": ..., "path": ...}): '
        "a request whose model is the name runs with the adapter (implies --enable-lora)",
    )
    g.add_argument(
        "--response-role",
        default="assistant",
        help="the role of a chat answer after a generation prompt (default assistant)",
    )
    g.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='logprobs name every token "token_id:N", as a request\'s own flag of that name does',
    )
    g.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="every stream ends with a usage chunk, asked for (stream_options) or not",
    )
    g.add_argument(
        "--default-chat-template-kwargs",
        type=json_object,
        default=None,
        help="JSON the chat template gets under a request's own chat_template_kwargs, e.g. "
        "'{\"enable_thinking\": false}'",
    )
    g.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="run the chat_template a request brings (refused by default: a Jinja template "
        "can exhaust the server's memory)",
    )
    g.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    add_api_args(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    g.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') with one of these keys "
        "(default: $PAGEDSERVE_API_KEY, else $VLLM_API_KEY, else open)",
    )
    g.add_argument(
        "--max-request-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="larger request bodies get HTTP 413 (default 4 MiB)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM (default 20)",
    )
    g.add_argument(
        "--stats-interval", type=float, default=5.0, help="seconds between stats log lines"
    )
    g.add_argument("--disable-access-log", action="store_true", help="no per-request log line")
    g.add_argument(
        "--metrics-prefix",
        type=metrics_prefix,
        default="pagedserve:",
        help="the prefix of the /metrics names (default pagedserve:; 'vllm:' gives vLLM's own "
        "names, for its dashboards as they are)",
    )
    add_vllm_flags(parser)
    add_launch_flags(parser)


def metrics_prefix(text: str) -> str:
    """A prefix that keeps the metric names valid Prometheus names (``vllm:``)."""
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        raise argparse.ArgumentTypeError("letters, digits, _ and :, not starting with a digit")
    return text


def api_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the engine, built from the flags, and the ``ServerSettings`` of its API): what ``serve``
    and ``run-batch`` share."""
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.entrypoints.openai.api_server import ServerSettings
    from pagedserve.entrypoints.openai.lora_endpoints import runtime_lora_updating
    from pagedserve.entrypoints.openai.serving_base import ApiDefaults
    from pagedserve.lora.request import LoRARequest

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise SystemExit("error: --enable-auto-tool-choice needs --tool-call-parser")
    chat_template = chat_template_arg(args)
    loras = [LoRARequest(m["name"], i, m["path"]) for i, m in enumerate(args.lora_modules or [], 1)]
    if loras:
        args.enable_lora = True
    engine = AsyncEngine.built(lambda: _serving_engine(args, chat_template, loras))
    names = args.served_model_name or [args.model or DEFAULT_SERVED_NAME]
    settings = ServerSettings(
        served_model_names=names,
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        reasoning_parser=args.reasoning_parser,
        lora_modules=loras,
        allow_runtime_lora_updating=bool(args.enable_lora) and runtime_lora_updating(),
        defaults=ApiDefaults(
            args.response_role,
            args.return_tokens_as_token_ids,
            args.enable_force_include_usage,
            args.default_chat_template_kwargs or {},
            args.trust_request_chat_template,
        ),
    )
    logger.info(
        "serving the model as %s", ", ".join(repr(n) for n in names + [m.lora_name for m in loras])
    )
    return engine, settings


def run_serve(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.openai.api_server import CorsSettings, bind_socket, serve

    configure_logging(args.log_level)
    tls = ssl_settings(args)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        raise SystemExit(f"error: can not listen on {args.host}:{args.port}: {exc}") from exc
    engine, settings = api_settings(args)
    settings.host = args.host
    settings.port = args.port
    key = os.environ.get("PAGEDSERVE_API_KEY") or os.environ.get("VLLM_API_KEY")
    settings.api_keys = args.api_key or ([key] if key else [])
    settings.max_request_body_bytes = args.max_request_body_bytes
    settings.stats_interval_s = 0.0 if args.disable_log_stats else args.stats_interval
    settings.shutdown_timeout_s = args.shutdown_timeout
    settings.access_log = not (args.disable_access_log or args.disable_uvicorn_access_log)
    excluded = args.disable_access_log_for_endpoints or ""
    settings.access_log_excluded = {p.strip() for p in excluded.split(",") if p.strip()}
    settings.request_id_headers = args.enable_request_id_headers
    settings.docs = not args.disable_fastapi_docs
    settings.server_load_tracking = args.enable_server_load_tracking
    settings.tokenizer_info = args.enable_tokenizer_info_endpoint
    settings.scale_out = args.enable_scale_out
    settings.metrics_prefix = args.metrics_prefix
    settings.middleware = args.middleware
    settings.dev_endpoints = any(
        os.environ.get(name, "0") not in ("", "0")
        for name in ("PAGEDSERVE_SERVER_DEV_MODE", "VLLM_SERVER_DEV_MODE")
    )
    settings.ssl = tls
    settings.cors = CorsSettings(
        args.allowed_origins, args.allowed_methods, args.allowed_headers, args.allow_credentials
    )
    settings.uvicorn_log_level = args.uvicorn_log_level
    settings.root_path = args.root_path or ""
    serve(engine, settings, sock)
    return 0


def add_run_batch_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-i", "--input-file", required=True, help="the batch: a JSONL file, or an http(s) URL"
    )
    parser.add_argument(
        "-o",
        "--output-file",
        required=True,
        help="where the results go: a file, or an http(s) URL they are PUT to",
    )
    add_api_args(parser)


def run_run_batch(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.openai.run_batch import run_batch_file

    configure_logging(args.log_level)
    source = args.input_file
    if not source.startswith(("http://", "https://")) and not os.path.isfile(source):
        raise SystemExit(f"error: --input-file {source}: no such file")
    engine, settings = api_settings(args)
    settings.stats_interval_s = 0.0
    settings.access_log = False
    return run_batch_file(engine, settings, args.input_file, args.output_file)


def _serving_engine(args: argparse.Namespace, chat_template: str | None, loras: list) -> Any:
    """The engine, with the ``--lora-modules`` adapters loaded (a bad one stops the start); its
    requests run only with the adapters the server loads (see ``lora.manager``)."""
    engine = load_engine(args, chat_template)
    if engine.loras is None:
        return engine
    for lora in loras:
        try:
            engine.loras.load(lora)
        except ValueError as exc:
            raise SystemExit(f"error: --lora-modules {lora.lora_name}: {exc}") from exc
    engine.loras.loads_on_use = False
    return engine


# ---- chat and generate (in-process, streaming to the terminal) ----
def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer")
    g.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 is greedy (default: the model's generation config, else 0.7)",
    )
    g.add_argument("--top-p", type=float, default=None, help="default: as --temperature, else 1")
    g.add_argument("--top-k", type=int, default=None, help="default: as --temperature, else 0")
    g.add_argument("--sampling-seed", type=int, default=None, help="seed of the sampler")


def terminal_sampling_params(engine: Any, args: argparse.Namespace, max_tokens: int) -> Any:
    """The flags given, else the model's generation-config defaults, else the terminal's own."""
    from pagedserve.sampling_params import SamplingParams

    defaults = {"temperature": 0.7, **engine.generation_config.sampling_defaults}
    given = {k: getattr(args, k) for k in ("temperature", "top_p", "top_k")}
    chosen = {k: v if v is not None else defaults.get(k) for k, v in given.items()}
    return SamplingParams(
        max_tokens=max_tokens,
        seed=args.sampling_seed,
        **{k: v for k, v in chosen.items() if v is not None},
    )


def _stream_to_terminal(engine: Any, request_id: str, prompt_ids: list[int], params: Any) -> str:
    """Run one request on the engine, printing its text as it grows; returns the text."""
    engine.add_request(request_id, prompt_ids, params)
    printed = 0
    text = ""
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                text = out.outputs[0].text
                sys.stdout.write(text[printed:])
                sys.stdout.flush()
                printed = len(text)
    except KeyboardInterrupt:
        engine.abort_request(request_id)
    sys.stdout.write("\n")
    return text


def _budget(engine: Any, prompt_len: int, wanted: int) -> int:
    room = engine.max_model_len - prompt_len
    if room < 1:
        raise ValueError(
            f"the conversation has {prompt_len} tokens, the whole context "
            f"({engine.max_model_len}); start a new one"
        )
    return min(wanted, room)


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--log-level", default="WARNING")


def run_chat(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    chat_template = chat_template_arg(args)
    engine = generating_engine(args, chat_template)
    tok = engine.tokenizer
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict[str, str]] = list(system)
    print("Chat with the model. /reset starts over, /exit (or Ctrl-D) quits.")
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        try:
            params = terminal_sampling_params(
                engine, args, _budget(engine, len(ids), args.max_tokens)
            )
        except ValueError as exc:
            print(f"[{exc}]")
            messages.pop()
            continue
        turn += 1
        answer = _stream_to_terminal(engine, f"chat-{turn}", ids, params)
        messages.append({"role": "assistant", "content": answer})


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    add_sampling_args(parser)
    parser.add_argument(
        "--prompt", default=None, help="the prompt (default: read it from standard input)"
    )
    parser.add_argument(
        "--chat", action="store_true", help="send the prompt as a user message (chat template)"
    )
    parser.add_argument("--log-level", default="WARNING")


def run_generate(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    chat_template = chat_template_arg(args)
    engine = generating_engine(args, chat_template)
    tok = engine.tokenizer
    if args.chat:
        text = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
        )
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt, add_special_tokens=True)
    try:
        params = terminal_sampling_params(engine, args, _budget(engine, len(ids), args.max_tokens))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.chat:
        sys.stdout.write(prompt)
    _stream_to_terminal(engine, "generate", ids, params)
    return 0


# ---- bench ----
def add_bench_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="benchmark", metavar="{" + ",".join(BENCHMARKS) + "}")
    sub.required = True
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"pagedserve.bench.{name}")
        except ImportError as exc:
            p = sub.add_parser(name, help=f"(unavailable: {exc})")
            p.set_defaults(bench_main=None, bench_error=str(exc))
            continue
        summary = (module.__doc__ or "").strip().split(".")[0].split(": ", 1)[-1]
        p = sub.add_parser(
            name,
            help=summary or None,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_cli_args(p)
        p.set_defaults(bench_main=module.main)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench_main is None:
        print(f"error: this benchmark is not available: {args.bench_error}", file=sys.stderr)
        return 2
    configure_logging("WARNING")
    result = args.bench_main(args)
    return result if isinstance(result, int) else 0


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="A high-throughput LLM inference engine and OpenAI-compatible server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    commands = (
        ("serve", "run the OpenAI-compatible HTTP server", add_serve_args, run_serve),
        ("chat", "chat with a model in the terminal", add_chat_args, run_chat),
        ("generate", "complete one prompt and print it", add_generate_args, run_generate),
        (
            "run-batch",
            "run a file of OpenAI batch requests (chat, completions, embeddings, scores) offline",
            add_run_batch_args,
            run_run_batch,
        ),
    )
    for name, help_text, add_args, run in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    bench = sub.add_parser("bench", help="benchmarks: throughput, serve (a client), latency")
    if argv[:1] == ["bench"]:  # importing the benchmarks costs time: only when asked for
        add_bench_args(bench)
    bench.set_defaults(run=run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = with_config_file(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    take_model_option(args, parser)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
