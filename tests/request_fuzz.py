"""Seeded bad requests for the HTTP API: valid bodies of each endpoint mutated 1-3 times (wrong
types, numbers at edges, huge or deep values, lone surrogates, junk constraints and tools, broken
JSON), and the checks every answer must pass (a status the API promises, its error schema, a
stream that ends properly, no 200 for a NaN or infinite sampling value)."""

from __future__ import annotations

import copy
import http.client
import json
import random
from dataclasses import dataclass
from typing import Any

from pagedserve.entrypoints.anthropic.protocol import MessagesRequest
from pagedserve.entrypoints.openai.embeddings_protocol import EmbeddingRequest
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagedserve.entrypoints.openai.responses_protocol import ResponsesRequest
from pagedserve.entrypoints.openai.tokenize_protocol import DetokenizeRequest, TokenizeRequest

ALLOWED = {200, 400, 404, 413, 422}
TIMEOUT = 30.0
MODEL = "test-model"
USER = [{"role": "user", "content": "hi"}]

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
CHAT_TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "3"},
]
ANTHROPIC_TURNS = [
    {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "3"}]},
]
RESPONSES_ITEMS = [
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c1", "output": "3"},
]

# Each endpoint: its path, valid bodies to mutate, and the request model that names its fields.
ENDPOINTS: dict[str, tuple[str, list[dict[str, Any]], type]] = {
    "chat": (
        "/v1/chat/completions",
        [
            {"model": MODEL, "messages": USER, "max_tokens": 4},
            {"model": MODEL, "messages": CHAT_TURNS, "max_tokens": 4, "tools": [TOOL]},
            {
                "model": MODEL,
                "messages": USER,
                "max_tokens": 4,
                "logprobs": True,
                "top_logprobs": 2,
            },
        ],
        ChatCompletionRequest,
    ),
    "completion": (
        "/v1/completions",
        [
            {"model": MODEL, "prompt": "hi", "max_tokens": 4},
            {"model": MODEL, "prompt": [[1, 2], [3]], "max_tokens": 4, "logprobs": 2, "echo": True},
        ],
        CompletionRequest,
    ),
    "embedding": ("/v1/embeddings", [{"model": MODEL, "input": "hi"}], EmbeddingRequest),
    "responses": (
        "/v1/responses",
        [
            {"model": MODEL, "input": "hi", "max_output_tokens": 4},
            {
                "model": MODEL,
                "input": RESPONSES_ITEMS,
                "max_output_tokens": 4,
                "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            },
        ],
        ResponsesRequest,
    ),
    "messages": (
        "/v1/messages",
        [
            {"model": MODEL, "messages": USER, "max_tokens": 4},
            {
                "model": MODEL,
                "messages": ANTHROPIC_TURNS,
                "max_tokens": 4,
                "system": "be brief",
                "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            },
        ],
        MessagesRequest,
    ),
    "tokenize": (
        "/tokenize",
        [{"model": MODEL, "prompt": "hi"}, {"model": MODEL, "messages": CHAT_TURNS}],
        TokenizeRequest,
    ),
    "detokenize": ("/detokenize", [{"model": MODEL, "tokens": [1, 2, 3]}], DetokenizeRequest),
}
STREAMING = ("chat", "completion", "responses", "messages")

# Values JSON cannot hold are written into the body text in place of these markers.
_RAW = {
    "@NaN@": "NaN",
    "@Inf@": "Infinity",
    "@-Inf@": "-Infinity",
    "@deep@": "[" * 5000 + "]" * 5000,
    "@deepobj@": '{"a":' * 3000 + "1" + "}" * 3000,
}
NAN, INF, NEG_INF, DEEP, DEEP_OBJECT = _RAW

WRONG_TYPES: list[Any] = ["x", "", [], [1], ["a", "b"], {}, {"a": 1}, True, False, None]
NUMBERS: list[Any] = [0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 1e308, -0.0, 1e-320, 0.5]
NUMBERS += [NAN, INF, NEG_INF]
STRINGS: list[Any] = ["\ud800", "a\udc00b", "a\x00b", "\x00", "x" * 5000, " ", DEEP, DEEP_OBJECT]
TOKEN_LISTS: list[Any] = [[-1], [10**9], [2**63], [1, -5, 2], [0] * 3000, [1.5], [True]]
HUGE: list[Any] = [
    ["x"] * 10_000,
    [str(i) for i in range(10_000)],
    {str(i): 1.0 for i in range(10_000)},
    list(range(10_000)),
    10**6,
]
ALL_VALUES = WRONG_TYPES + NUMBERS + STRINGS + TOKEN_LISTS + HUGE

PATHO_SCHEMAS: list[Any] = [
    {"type": "nonsense"},
    {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
    {"$ref": "#"},
    {"type": "string", "pattern": "(("},
    {"type": "string", "pattern": "a{1000000}"},
    {"type": "array", "minItems": 10**9},
    {"type": "integer", "minimum": 10, "maximum": 1},
    {"enum": []},
    {"anyOf": []},
    {"type": "string", "minLength": 2**63},
    "not a schema",
    [1, 2],
    {"properties": "x"},
    {"type": "object", "required": ["a"], "additionalProperties": False},
]
PATHO_REGEXES: list[Any] = ["((", "a{1000000}", "(a*)*b", "[z-a]", "\\", "", "(?<=a)b", "\ud800"]
FIELD_VALUES: dict[str, list[Any]] = {
    "messages": [
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        [{"role": "user", "content": [{"text": "a"}]}],
        [{"role": "user", "content": DEEP}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]}],
        [{"role": "assistant", "content": "a", "tool_calls": "x"}],
        [{"role": "tool", "content": "a"}],
        [{"role": "user", "content": {"a": 1}}],
        [1, 2],
        [[]],
        [],
    ],
    "input": [
        [{"type": "function_call"}],
        [{"type": "function_call_output"}],
        [{"role": 5, "content": "x"}],
        [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}],
        [{"type": "reasoning"}],
        [1],
        [[1]],
        [-1, 10**9],
    ],
    "prompt": [[-1], [10**9], [2**63], [[1, 2], [-3]], [[]], ["a", 1], [1, "a"], [["a"]]],
    "tokens": TOKEN_LISTS + [[2**31], [-(2**63)], ["a"]],
    "logit_bias": [
        {"x": 1},
        {"1.5": 1},
        {"-1": 1},
        {"1": NAN},
        {"1": INF},
        {"1": "x"},
        {"1e3": 1},
        {" 1": 1},
        {"99999999999999999999": 1},
        {str(i): 1 for i in range(10_000)},
    ],
    "stop": [["x"] * 10_000, [""], "", [None], ["\x00"]],
    "seed": [2**63, -(2**63) - 1, 10**30, 1.5, NAN, "1"],
    "n": [10**6, 2**63, 0, -1, 129, 1.5, NAN],
    "best_of": [10**6, 2**63, -1],
    "max_tokens": [10**30, 2**31, 2**63, 0, -1, 1.5, NAN],
    "top_logprobs": [10**6, -1, 2**63],
    "logprobs": [10**6, -1, True, 2**63],
    "stream_options": [{"include_usage": "x"}, {"continuous_usage_stats": 5}, "x", [1], {"a": 1}],
    "tools": [
        [{"type": "function", "function": {"name": "f", "parameters": s}}] for s in PATHO_SCHEMAS
    ]
    + [[{"type": "code_interpreter"}], [{"name": "f", "input_schema": {"type": "x"}}], [1]],
    "tool_choice": [
        "required",
        "auto",
        "sometimes",
        {"type": "function", "function": {"name": "nope"}},
        {"type": "tool", "name": "x"},
        {"type": "any"},
        {"type": "function"},
        5,
    ],
    "response_format": [
        {"type": "json_schema", "json_schema": {"schema": s}} for s in PATHO_SCHEMAS
    ]
    + [{"type": "xml"}, {"type": "json_object"}, {"type": "structural_tag"}, {}],
    "structured_outputs": [{"json": s} for s in PATHO_SCHEMAS]
    + [{"regex": r} for r in PATHO_REGEXES]
    + [{"choice": []}, {"choice": [""]}, {"choice": ["a"] * 10_000}, {"grammar": "root ::= (("}]
    + [{"structural_tag": "x"}, {"json": "{"}, {"regex": "a", "choice": ["a"]}, {}],
    "guided_json": PATHO_SCHEMAS,
    "guided_regex": PATHO_REGEXES,
    "guided_choice": [[], [""], ["a"] * 10_000, "x", [1]],
    "guided_grammar": ["root ::= ((", "", "\x00"],
    "text": [{"format": {"type": "json_schema", "schema": s}} for s in PATHO_SCHEMAS]
    + [{"format": "x"}, {"format": {"type": "x"}}],
    "system": [[{"type": "image"}], [{"type": "text"}], 5],
    "thinking": [{"type": "enabled", "budget_tokens": -1}, {"type": "x"}],
    "output_config": [{"format": {"type": "json_schema", "schema": s}} for s in PATHO_SCHEMAS],
    "chat_template_kwargs": [{"deep": DEEP}, {"\ud800": 1}, {"chat_template": "{{ 1 }}"}],
    "temperature": [NAN, INF, -1, 1e308, 10**30, "hot"],
    "top_p": [NAN, INF, 0, -1, 2],
    "top_k": [NAN, 2**63, -2, 10**30],
    "min_p": [NAN, INF, -1],
    "presence_penalty": [NAN, INF, NEG_INF],
    "frequency_penalty": [NAN, INF],
    "repetition_penalty": [NAN, INF, 0, -1],
    "length_penalty": [NAN, INF],
    "min_tokens": [10**30, -1, 2**63],
    "truncate_prompt_tokens": [2**63, -2, 0, 10**30],
    "prompt_logprobs": [10**6, -1, 2**63],
    "allowed_token_ids": [[], [-1], [10**9], list(range(10_000))],
    "stop_token_ids": [[-1], [10**9], [2**63]],
    "bad_words": [[""], ["\x00"], ["x"] * 1000],
    "priority": [2**63, NAN, -(2**63) - 1],
    "dimensions": [0, -1, 2**63],
    "max_output_tokens": [0, -1, 2**63, 10**30],
    "include": [["message.output_text.logprobs"], ["x"], "x"],
    "stop_sequences": [[""], ["x"] * 10_000],
    "budget_tokens": [-1],
    "thinking_token_budget": [2**63, -2],
    "use_beam_search": [True],
    "echo": [True],
    "ignore_eos": [True],
}


_KEPT = {"chat": {"max_tokens"}, "completion": {"max_tokens"}, "responses": {"max_output_tokens"}}


@dataclass
class Case:
    """One request: where it goes, its body bytes, and what was done to it (for reports)."""

    endpoint: str
    path: str
    body: bytes
    mutations: list[str]
    must_refuse: str | None = None  # why a 200 would be wrong (a sampling value that is NaN)

    def __str__(self) -> str:
        return f"{self.endpoint} {self.mutations} {self.body[:300]!r}"


def _encode(body: Any) -> bytes:
    text = json.dumps(body)
    for marker, raw in _RAW.items():
        text = text.replace(json.dumps(marker), raw)
    return text.encode()


def _nested_targets(value: Any, top: bool = True) -> list[tuple[Any, Any]]:
    """(container, key) pairs below the body's top level that a mutation may replace."""
    if isinstance(value, dict):
        items: list[tuple[Any, Any]] = list(value.items())
    elif isinstance(value, list) and len(value) < 50:
        items = list(enumerate(value))
    else:
        return []
    targets = [] if top else [(value, key) for key, _ in items]
    for _, item in items:
        targets.extend(_nested_targets(item, top=False))
    return targets


def make_case(endpoint: str, seed: int) -> Case:
    """The seeded request ``seed`` for ``endpoint``: its valid body mutated 1-3 times."""
    rng = random.Random(f"{endpoint}-{seed}")
    path, valid, model = ENDPOINTS[endpoint]
    body = json.loads(json.dumps(rng.choice(valid)))
    if endpoint in STREAMING and rng.random() < 0.35:
        body["stream"] = True
    fields = sorted(model.model_fields) + sorted(k for k in FIELD_VALUES if rng.random() < 0.1)
    mutations: list[str] = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.4:
            name = rng.choice(fields)
            value = rng.choice(FIELD_VALUES.get(name) or ALL_VALUES)
        elif kind < 0.8:
            name = rng.choice(sorted(FIELD_VALUES))
            value = rng.choice(FIELD_VALUES[name])
        elif kind < 0.9 and _nested_targets(body):
            container, key = rng.choice(_nested_targets(body))
            value = rng.choice(
                FIELD_VALUES.get(key)
                if isinstance(key, str) and key in FIELD_VALUES and rng.random() < 0.5
                else ALL_VALUES
            )
            if isinstance(container, dict) and rng.random() < 0.2:
                container.pop(key)
                mutations.append(f"nested drop {key}")
                continue
            container[key] = copy.deepcopy(value)
            mutations.append(f"nested {key}={value!r:.40}")
            continue
        elif kind < 0.95 and set(body) - _KEPT.get(endpoint, set()):
            # a missing max_tokens would generate up to the context's end: slow, not bad
            name = rng.choice(sorted(set(body) - _KEPT.get(endpoint, set())))
            body.pop(name)
            mutations.append(f"drop {name}")
            continue
        else:
            name, value = f"unknown_{rng.randint(0, 9)}", rng.choice(ALL_VALUES)
        body[name] = copy.deepcopy(value)  # a later mutation may change it in place
        mutations.append(f"{name}={value!r:.40}")
    must_refuse = _not_a_number(body, model)
    raw = _encode(body)
    wreck = rng.random()
    if wreck < 0.04:
        raw, mutations = raw[: rng.randint(0, len(raw) - 1)], [*mutations, "truncated"]
    elif wreck < 0.06:
        raw, mutations = _encode(rng.choice([[body], "x", 1, None])), [*mutations, "not object"]
    elif wreck < 0.08:
        raw, mutations = b"\xff\xfe not json", [*mutations, "not json"]
    return Case(endpoint, path, raw, mutations, must_refuse)


# Sampling fields that take no NaN or infinity (and logit_bias no NaN, as an infinite bias is
# clamped to 100, as vLLM does).
_FINITE = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


def _not_a_number(body: dict[str, Any], model: type) -> str | None:
    """The field of ``body`` (one that ``model`` reads) whose value is NaN or infinite where a
    finite number is needed, if any."""
    for name in _FINITE:
        if name in model.model_fields and body.get(name) in (NAN, INF, NEG_INF):
            return f"{name} {body[name]} accepted"
    bias = body.get("logit_bias")
    if "logit_bias" in model.model_fields and isinstance(bias, dict) and NAN in bias.values():
        return "a NaN logit_bias accepted"
    return None


def send(url: str, case: Case) -> tuple[int, bytes]:
    """POST the case's body; (status, whole answer). A hang fails by the client timeout."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        conn.request("POST", case.path, case.body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def problem(case: Case, status: int, raw: bytes) -> str | None:
    """What is wrong with an answer to ``case``, or None."""
    if status not in ALLOWED:
        return f"status {status}: {raw[:300]!r}"
    if status != 200:
        return _error_schema_problem(case, raw)
    if case.must_refuse:
        return case.must_refuse
    text = raw.decode()
    if not text.startswith(("data:", "event:")):
        try:
            json.loads(text)
        except ValueError:
            return f"200 with a body that is not JSON: {text[:200]!r}"
        return None
    return _stream_problem(case, text)


def _error_schema_problem(case: Case, raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return f"error body not JSON: {raw[:200]!r}"
    if case.endpoint == "messages":
        ok = (
            isinstance(body, dict)
            and set(body) == {"type", "error"}
            and body["type"] == "error"
            and isinstance(body["error"], dict)
            and set(body["error"]) == {"type", "message"}
            and isinstance(body["error"]["message"], str)
        )
    else:
        error = body.get("error") if isinstance(body, dict) else None
        ok = (
            set(body) == {"error"}
            and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str)
            and bool(error["message"])
            and isinstance(error["type"], str)
        )
    return None if ok else f"error body not in the schema: {raw[:300]!r}"


def _stream_problem(case: Case, text: str) -> str | None:
    """A stream must end properly and carry no server error."""
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not data:
        return f"empty stream: {text[:200]!r}"
    for item in data:
        if '"server_error"' in item or '"api_error"' in item:
            return f"server error mid-stream: {item[:300]}"
    if case.endpoint in ("chat", "completion"):
        return None if data[-1] == "[DONE]" else f"stream ends without [DONE]: {data[-1][:200]}"
    last = json.loads(data[-1])
    ends = {
        "responses": ("response.completed", "response.incomplete"),
        "messages": ("message_stop",),
    }
    if last.get("type") not in ends[case.endpoint] and last.get("type") != "error":
        return f"stream ends with {last.get('type')!r}"
    return None
