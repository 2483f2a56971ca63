"""Tool calls written as Python: ``pythonic`` and ``llama4_pythonic``, and the reader of one
call that ``olmo3`` shares.

A call is ``name(key=literal, ...)``: keyword arguments only, each a Python literal read with
``ast`` (nothing is evaluated), whose value must be JSON (no sets, bytes, complex numbers or
infinities). Anything else is no call, and an answer with one is text.

- ``pythonic`` (Llama 3.2, some Gemma 3 and other templates): an answer that is a Python list of
  calls, ``[get_weather(city="Paris"), get_time()]``.
- ``llama4_pythonic`` (Llama 4): the same list, optionally wrapped in ``<|python_start|>`` ...
  ``<|python_end|>``, special tokens of Llama 4's tokenizer, which requests that may call keep in
  their text. As in vLLM, the wrapper counts only at the start of the answer (text before it makes
  the answer text) and its end only at the end; unlike vLLM, which drops every
  ``<|python_end|>`` (one inside a string argument too) and reads the list even with Python
  statements after it, the list must be the whole answer.

Both read the list once the answer is whole (it is one value: a later element may spoil it),
and stream text that opens with anything else as content, as it comes.
"""

from __future__ import annotations

import ast

from pagedserve.entrypoints.openai.tool_parser_base import Call, ToolParser, dumps

# JSON's literals, which some models (OLMo 3, Llama 3.2) write for Python's; vLLM reads them too.
_JSON_NAMES = {"null": None, "true": True, "false": False}


class _JsonNames(ast.NodeTransformer):
    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def call_of_node(node: ast.AST) -> Call | None:
    """``(name, arguments JSON)`` of a parsed ``name(key=literal, ...)``; None for anything
    else. ``null``, ``true`` and ``false`` are read as JSON's literals."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    if any(kw.arg is None for kw in node.keywords):  # **kwargs
        return None
    try:
        arguments = {}
        for kw in node.keywords:
            arguments[kw.arg] = ast.literal_eval(_JsonNames().visit(kw.value))
        return node.func.id, dumps(arguments)
    except (ValueError, TypeError, RecursionError):
        return None  # not a literal, not JSON (a set, bytes, inf), or too deep to read


def parsed(source: str) -> ast.expr | None:
    """``source`` read as one Python expression; None where it is none."""
    try:
        return ast.parse(source, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # Not Python, or nested past what Python's parser takes (a few thousand unary signs or
        # operators: RecursionError, or its stack overflow, a MemoryError).
        return None


def list_calls(body: str) -> list[Call]:
    """The calls of ``body``, a Python list of calls; [] unless every element is one."""
    tree = parsed(body)
    if not isinstance(tree, ast.List) or not tree.elts:
        return []
    calls = []
    for node in tree.elts:
        call = call_of_node(node)
        if call is None:
            return []
        calls.append(call)
    return calls


class PythonicParser(ToolParser):
    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        if not text.lstrip().startswith("["):
            return text, []  # plain content, streamed as it comes
        if not final:
            return "", []  # a call list is read once it is whole
        calls = list_calls(text.strip())
        return ("", calls) if calls else (text, [])


class Llama4PythonicParser(ToolParser):
    START, END = "<|python_start|>", "<|python_end|>"
    special_tokens = frozenset((START, END))

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        body = text.lstrip()
        wrapped = body.startswith(self.START)
        if wrapped:
            body = body[len(self.START) :].strip()
            body = body[: -len(self.END)] if body.endswith(self.END) else body
        elif not body.startswith("["):
            if final or not self.START.startswith(body):
                return text, []  # plain content, streamed as it comes
            return "", []  # blank, or maybe the start of the wrapper: held back
        if not final:
            return "", []  # a call list is read once it is whole
        calls = list_calls(body.strip())
        return ("", calls) if calls else (text, [])
