"""The rest of vLLM's launch flags, so that a vLLM command line or ``--config`` file starts this
server as it is. Each is either accepted with no effect, where it concerns what a one-process,
one-device engine that reads local files has no use for (graph capture lengths, all-reduce,
downloads, revisions, swap space), or refused with a message, where accepting it would change
what the server answers (another quantization, a Mistral tokenizer, plugins, more processes).
``--middleware`` is honoured, and ``--config FILE.yaml`` is read as vLLM reads it."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from collections.abc import Sequence
from typing import Any

# flag: why it changes nothing here (flags that take a value)
NO_EFFECT = {
    "--swap-space": "preempted requests are recomputed, never swapped out",
    "--revision": "models are read from local paths, whatever revision they hold",
    "--code-revision": "no code from a model's directory runs",
    "--tokenizer-revision": "tokenizers are read from local paths",
    "--download-dir": "nothing is downloaded",
    "--load-format": "the format is read from the files (safetensors, GGUF)",
    "--config-format": "config.json (or the GGUF's metadata) is read",
    "--max-seq-len-to-capture": "CUDA graphs capture decode steps of any context length",
    "--distributed-executor-backend": "one process runs the model",
    "--max-loras": "adapters are loaded as requests name them",
    "--max-cpu-loras": "adapters are loaded as requests name them",
    "--limit-mm-per-prompt": "the models served take text only",
    "--mm-processor-cache-gb": "the models served take text only",
    "--cpu-offload-gb": "the weights stay where the model runs",
    "--compilation-config": "the CPU path runs C kernels; CUDA graphs follow --enforce-eager",
    "-O": "the CPU path runs C kernels; CUDA graphs follow --enforce-eager",
    "--structured-outputs-config": "structured outputs always run on llguidance",
    "--guided-decoding-backend": "structured outputs always run on llguidance",
    "--max-parallel-loading-workers": "one process loads the model",
    "--model-impl": "pagedserve's own model code runs",
    "--h11-max-incomplete-event-size": "uvicorn's default limits apply",
    "--h11-max-header-count": "uvicorn's default limits apply",
}
# switches: why they change nothing here
NO_EFFECT_SWITCHES = {
    "--disable-custom-all-reduce": "one device: nothing to all-reduce",
    "--enable-log-requests": "prompts and parameters are never logged",
    "--async-scheduling": "the engine overlaps its own work",
    "--enable-sleep-mode": "there are no sleep endpoints",
    "--enable-expert-parallel": "one device",
}
# flag: why it is refused
REFUSED = {
    "--tool-parser-plugin": "tool parsers are pagedserve's own (--tool-call-parser)",
    "--kv-transfer-config": "there is no disaggregated prefill",
    "--log-config-file": "logging follows --log-level and --uvicorn-log-level",
}
REFUSED_SWITCHES = {
    "--skip-tokenizer-init": "the server tokenizes prompts and detokenizes outputs itself",
}


class _Refused(argparse.Action):
    """A flag that parses, then stops the command with why it is not supported."""

    def __init__(self, option_strings: list[str], dest: str, why: str, **kwargs: Any) -> None:
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.error(f"{'/'.join(self.option_strings)} is not supported: {self.why}")


def _one_of(name: str, accepted: Sequence[str | None], why: str) -> Any:
    def check(text: str) -> str:
        if text not in accepted:
            raise argparse.ArgumentTypeError(f"{text!r} is not supported for {name}: {why}")
        return text

    return check


def _exactly_one(text: str) -> int:
    if text != "1":
        raise argparse.ArgumentTypeError(f"{text} is not supported: one process serves the model")
    return 1


def add_launch_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM's launch flags (see vllm_launch_flags.py)")
    for flag, why in NO_EFFECT.items():
        g.add_argument(flag, default=None, metavar="VALUE", help=f"accepted, no effect: {why}")
    for flag, why in NO_EFFECT_SWITCHES.items():
        g.add_argument(flag, action="store_true", help=f"accepted, no effect: {why}")
    for flag, why in REFUSED.items():
        g.add_argument(flag, action=_Refused, why=why, metavar="VALUE", help="not supported")
    for flag, why in REFUSED_SWITCHES.items():
        g.add_argument(flag, action=_Refused, why=why, nargs=0, help="not supported")
    g.add_argument(
        "--quantization",
        "-q",
        type=_one_of("--quantization", ("gguf",), "weights are float or a GGUF file's"),
        default=None,
        help="gguf only (a GGUF file's own quantization is read from it)",
    )
    g.add_argument(
        "--tokenizer-mode",
        type=_one_of("--tokenizer-mode", ("auto", "hf", "slow"), "transformers' tokenizer runs"),
        default=None,
        help="auto, hf or slow: transformers' tokenizer (accepted, no effect)",
    )
    g.add_argument(
        "--chat-template-content-format",
        type=_one_of(
            "--chat-template-content-format", ("auto", "string"), "templates get text content"
        ),
        default=None,
        help="auto or string: chat templates see each message's content as text",
    )
    for flags in (("--data-parallel-size", "-dp"), ("--api-server-count",)):
        g.add_argument(*flags, type=_exactly_one, default=None, help="1 only")
    g.add_argument(
        "--middleware",
        action="append",
        default=[],
        help="an ASGI middleware to add, by import path (module.name): a class is added with "
        "app.add_middleware, a function as @app.middleware('http'); repeatable",
    )


def add_middlewares(app: Any, paths: Sequence[str]) -> None:
    """vLLM's ``--middleware``: each import path's class or function on the app."""
    for path in paths:
        module_name, _, name = path.rpartition(".")
        if not module_name:
            raise SystemExit(f"error: --middleware {path!r}: give module.name")
        try:
            target = getattr(importlib.import_module(module_name), name)
        except Exception as exc:  # noqa: BLE001 - whatever importing the user's module raises
            raise SystemExit(f"error: --middleware {path!r}: {type(exc).__name__}: {exc}") from exc
        if inspect.isclass(target):
            try:  # built lazily, at the first request: check now that it takes the app
                inspect.signature(target).bind(app)
            except (TypeError, ValueError) as exc:
                raise SystemExit(
                    f"error: --middleware {path!r}: the class must take the app as its one "
                    f"argument ({exc})"
                ) from exc
            app.add_middleware(target)
        elif inspect.iscoroutinefunction(target):
            app.middleware("http")(target)
        else:
            raise SystemExit(
                f"error: --middleware {path!r} is neither a class nor an async function"
            )


# The switches that take a --no- form: false in a config file turns them off.
NEGATABLE = frozenset({"--enable-prefix-caching", "--enable-chunked-prefill"})


def with_config_file(argv: list[str]) -> list[str]:
    """``argv`` with vLLM's ``--config FILE.yaml`` (or ``--config=FILE.yaml``) replaced by the
    flags the file holds (its keys are flag names; ``model`` is the positional model, unless the
    command line names one), placed after the command and its model and before the command
    line's own flags, so that those win."""
    at = next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)
    if at is None:
        return argv
    if argv[at] == "--config":
        if at + 1 >= len(argv):
            raise SystemExit("error: --config needs a YAML file")
        path, rest = argv[at + 1], argv[:at] + argv[at + 2 :]
    else:
        path, rest = argv[at].removeprefix("--config="), argv[:at] + argv[at + 1 :]
    import yaml

    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"error: --config {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SystemExit(f"error: --config {path}: the file must hold a mapping of flags")
    given_model = len(rest) > 1 and not rest[1].startswith("-")
    head = rest[: 2 if given_model else 1]  # the command, and its model if the line names one
    flags: list[str] = []
    for key, value in config.items():
        if key == "model":
            if not given_model:
                head.append(str(value))
            continue
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False and flag in NEGATABLE:
            flags.append("--no-" + flag.removeprefix("--"))
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            flags += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return head + flags + rest[2 if given_model else 1 :]
