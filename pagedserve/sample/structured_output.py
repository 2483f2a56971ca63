"""Structured outputs: JSON schema, JSON object, regex, choice and grammar constraints on the text.

Each constrained sequence carries a grammar matcher from llguidance, the Rust library behind
vLLM's ``guidance`` backend (llama.cpp can be built with it too). Before a step's draw the matcher
says which tokens may come next (a bitmask over the vocabulary); the sampler sets the others to
-inf, so greedy and sampled rows alike only ever pick a token that keeps the text inside the
grammar. After the draw the matcher consumes the token. When the grammar is complete and nothing
may follow (a closed JSON object, one of the choices), the sequence finishes with reason ``stop``.

llguidance builds a grammar's token masks lazily, with no precompute over the vocabulary per
schema: a matcher for SmolLM2's 49k tokens took 0.5-0.9 ms for a two-field schema and
3.5-3.8 ms for one of 50 nested fields, so the engine makes it at admission, between steps.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer, StructTag
from llguidance.gbnf_to_lark import any_to_lark

from pagedserve.sampling_params import StructuredOutputsParams

__all__ = ["GrammarCompiler", "LLMatcher", "allowed_tokens", "check_grammar"]


class GrammarCompiler:
    """Turns a request's :class:`StructuredOutputsParams` into a fresh matcher for one model.

    The llguidance view of the tokenizer (about 0.3 s for a 50k vocabulary) is built on the
    first constrained request, not at start-up."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]) -> None:
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: LLTokenizer | None = None

    @property
    def tokenizer(self) -> LLTokenizer:
        if self._tokenizer is None:
            try:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self._vocab_size, eos_token=self._eos_token_ids
                )
            except Exception as exc:  # the library's own error types, for tokenizers it cannot take
                raise ValueError(
                    f"structured outputs do not support this tokenizer: {exc}"
                ) from exc
        return self._tokenizer

    def _special_tokens(self) -> frozenset[str]:
        """The tokenizer's special and added tokens (``<|im_start|>``, Qwen's ``<tool_call>``):
        a structural tag's trigger written as one of them is that token, else text."""
        tok = self._hf_tokenizer
        return frozenset(tok.all_special_tokens) | frozenset(tok.get_added_vocab())

    def matcher(self, params: StructuredOutputsParams) -> LLMatcher:
        """A matcher at the start of the grammar; ``ValueError`` naming what is wrong with it.
        (The constructor compiles the grammar and, on an error, keeps it instead of raising.)"""
        grammar = grammar_of(params, self._special_tokens())
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {params.kind} constraint: {matcher.get_error()}")
        return matcher


def check_grammar(params: StructuredOutputsParams) -> None:
    """``ValueError`` when the schema or regex itself is not valid (no tokenizer needed)."""
    error = LLMatcher.validate_grammar(grammar_of(params))
    if error:
        raise ValueError(f"invalid {params.kind} constraint: {error.strip()}")


def grammar_of(params: StructuredOutputsParams, special: frozenset[str] | None = None) -> str:
    """llguidance's grammar text for a constraint; ``special``: the tokenizer's special tokens
    (None: a structural tag's ``<...>`` triggers are taken to be special tokens)."""
    if params.regex is not None:
        return LLMatcher.grammar_from_regex(_whole_escapes(params.regex))
    if params.grammar is not None:
        try:
            return LLMatcher.grammar_from_lark(any_to_lark(params.grammar))
        except Exception as exc:  # the GBNF converter raises bare Exceptions too
            raise ValueError(f"invalid grammar constraint: {exc}") from exc
    if params.structural_tag is not None:
        return structural_tag_grammar(params.structural_tag, params.disable_any_whitespace, special)
    if params.choice is not None:
        # Lark string literals take JSON's escapes, so each choice is matched literally.
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    schema = params.json if params.json is not None else {"type": "object"}
    schema = _json_object(schema, "structured_outputs.json", "a JSON schema must be a JSON object")
    if params.json is not None:
        _schema_patterns(schema)
        schema = closed_objects(schema)
    overrides = {"whitespace_flexible": False} if params.disable_any_whitespace else None
    return LLMatcher.grammar_from_json_schema(schema, overrides=overrides)


def _whole_escapes(regex: str) -> str:
    """``regex``, refused (``ValueError``) when it ends inside an escape: llguidance's regex
    reader drops a trailing lone backslash, so ``a\\`` would silently constrain to ``a``."""
    if (len(regex) - len(regex.rstrip("\\"))) % 2:
        raise ValueError(
            f"invalid regex {regex!r}: it ends with a lone backslash (an escape cut short)"
        )
    return regex


_SCHEMA_DATA = frozenset(("const", "enum", "default", "examples"))  # values, not schemas


def _schema_patterns(schema: Any) -> None:
    """Every ``pattern`` and ``patternProperties`` regex in a JSON schema through
    :func:`_whole_escapes` (a walk without recursion: the schema's depth is checked later)."""
    todo = [schema]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                _whole_escapes(node["pattern"])
            if isinstance(node.get("patternProperties"), dict):
                for regex in node["patternProperties"]:
                    _whole_escapes(regex)
            todo.extend(v for k, v in node.items() if k not in _SCHEMA_DATA)
        elif isinstance(node, list):
            todo.extend(node)


# llguidance reads no schema nested past about 124 levels (its JSON reader stops at 128).
MAX_SCHEMA_NESTING = 128
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "contains", "anyOf", "oneOf", "allOf",
               "not", "if", "then", "else", "additionalProperties", "unevaluatedProperties")  # fmt: skip


def closed_objects(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` in which every object that lists its ``properties`` (or
    ``patternProperties``) and says nothing of ``additionalProperties`` takes no others.

    JSON Schema leaves such objects open, and a model held to one keeps adding keys of its own
    (``"gender"``, ``"location"`` ...) until the length cut leaves broken JSON. vLLM's default
    backend (xgrammar) closes them, and OpenAI's strict schemas must: so does this. A schema
    that wants other keys says ``"additionalProperties": true``.

    A schema that builds objects by composition (``allOf``, or ``$ref`` beside ``properties``)
    is left open: each part closed on its own would refuse the other parts' keys. So is an
    object whose ``required`` keys are not all among its ``properties``.

    ``ValueError`` for a schema nested deeper than the grammar engine reads (the walks here
    recurse, and would overflow Python's stack first)."""
    if _nesting(schema) > MAX_SCHEMA_NESTING:
        raise ValueError(
            f"a JSON schema nested more than {MAX_SCHEMA_NESTING} levels deep is not supported"
        )
    if _composes(schema):
        return schema

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in _SCHEMA_MAPS:
            if isinstance(out.get(key), dict):
                out[key] = {name: walk(sub) for name, sub in out[key].items()}
        for key in _SUBSCHEMAS:
            if isinstance(out.get(key), dict | list):
                out[key] = walk(out[key])
        listed = isinstance(out.get("properties"), dict) or isinstance(
            out.get("patternProperties"), dict
        )
        required = out.get("required")
        named = not isinstance(required, list) or all(
            isinstance(out.get("properties"), dict) and key in out["properties"] for key in required
        )
        if listed and named and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out

    return walk(schema)


def _nesting(node: Any) -> int:
    """How deep JSON objects and arrays nest in ``node`` (without recursion), counted up to
    one past :data:`MAX_SCHEMA_NESTING`."""
    deepest, todo = 0, [(node, 1)]
    while todo and deepest <= MAX_SCHEMA_NESTING:
        item, depth = todo.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in item)
    return deepest


def _composes(node: Any) -> bool:
    """Whether a schema anywhere builds an object from parts (``allOf``, or ``$ref`` beside
    ``properties``)."""
    if isinstance(node, list):
        return any(_composes(item) for item in node)
    if not isinstance(node, dict):
        return False
    if "allOf" in node or ("$ref" in node and "properties" in node):
        return True
    return any(_composes(value) for value in node.values())


def _json_object(value: Any, name: str, not_object: str) -> dict[str, Any]:
    """``value``, or the JSON text of it, as a dict; ValueError (``not_object``) otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(not_object)
    return value


def structural_tag_grammar(
    spec: str | dict[str, Any], compact: bool = False, special: frozenset[str] | None = None
) -> str:
    """llguidance's grammar for vLLM's structural tag ``{"structures": [{"begin", "schema",
    "end"}, ...], "triggers": [...]}``: each structure's ``begin`` starts with one of the
    triggers; free text until a trigger, then ``begin``, JSON of ``schema`` and ``end``
    (``compact``: with no whitespace between JSON tokens)."""
    spec = _json_object(
        spec, "structural_tag", "structural_tag must be a JSON object with structures and triggers"
    )
    structures, triggers = spec.get("structures"), spec.get("triggers")
    if "format" in spec:
        raise ValueError(
            "structural_tag's format form (xgrammar's) is not supported; give structures "
            "and triggers (without format)"
        )
    if not isinstance(triggers, list) or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag.triggers must be a list of non-empty strings")
    if not isinstance(structures, list) or not structures:
        raise ValueError("structural_tag.structures must be a non-empty list")
    tags = []
    for i, tag in enumerate(structures):
        begin, end = (tag.get(k) if isinstance(tag, dict) else None for k in ("begin", "end"))
        schema = tag.get("schema") if isinstance(tag, dict) else None
        if not isinstance(begin, str) or not isinstance(end, str):
            raise ValueError(f"structural_tag.structures[{i}] needs begin and end strings")
        if schema is not None and not isinstance(schema, dict):
            raise ValueError(f"structural_tag.structures[{i}].schema must be a JSON schema")
        trigger = next((t for t in triggers if begin.startswith(t)), None)
        if trigger is None:
            raise ValueError(
                f"structural_tag.structures[{i}].begin {begin!r} starts with none of the "
                f"triggers {triggers}"
            )
        if schema is not None:
            _schema_patterns(schema)
        grammar = closed_objects(schema) if schema is not None else {}
        if compact:
            grammar = {**grammar, "x-guidance": {"whitespace_flexible": False}}
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=grammar, end=end))
    # llguidance reads a trigger written <...> as one special token: right for <|python_tag|>,
    # wrong for a <tool_call> that this tokenizer writes as text.
    tagged = [t.trigger for t in tags if t.trigger.startswith("<") and t.trigger.endswith(">")]
    as_special = special is None or all(t in special for t in tagged)
    return StructTag.to_grammar(tags, assume_special=as_special)


def allowed_tokens(matchers: list[LLMatcher], vocab_size: int) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next.

    llguidance writes bit ``t % 32`` of 32-bit word ``t // 32`` for token ``t``; read as
    little-endian bytes (x86, Arm) that is bit ``t % 8`` of byte ``t // 8``, which numpy unpacks
    in one pass (about ten times faster than shifting the words in torch at 64 rows)."""
    words = (vocab_size + 31) // 32
    bitmask = np.empty((len(matchers), words), dtype=np.int32)
    for row, matcher in zip(bitmask, matchers, strict=True):
        matcher.unsafe_compute_mask_ptr(row.ctypes.data, words * 4)
    bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits).view(torch.bool)
