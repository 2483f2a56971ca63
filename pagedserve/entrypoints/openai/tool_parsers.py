"""Tool calls a model chose to make (``tool_choice: "auto"``), read from its own text format.

Each model family writes calls its own way, so the server is told which format to read, with
vLLM's flags: ``--enable-auto-tool-choice --tool-call-parser NAME``. A parser splits the text
generated so far into the content the client may see and the calls that are complete:
:meth:`ToolParser.split` is called on every streamed step (with ``final`` false, it holds back
text that may still turn into a call) and once on the whole answer.

Content that is only whitespace beside calls (the newline before, between or after
``<tool_call>`` blocks) is no content: the whole answer gives ``content: null`` for it, as vLLM's
does, and the stream sends none of it, so the content deltas of a stream joined are the whole
answer's content (null read as ""). vLLM's streams send such whitespace as it comes (hermes the
text before the first call, granite4 the text between calls) while its whole answers null it; we
follow the whole answer. So a stream holds back content while it is only whitespace: it goes out
with the first other character after it, or at the end of an answer with no calls (whose content
is all its text, blank or not). Parsers give their content as written; the rule is applied in
one place, :mod:`.tool_calls`.

- ``hermes``, also ``qwen3_json`` (Hermes 2/3, Qwen2.5, Qwen3): ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` blocks after optional content. A first block that is no call leaves the
  answer as text, as in vLLM; a later one is left out (a stream has sent the calls before it).
- ``granite4`` (IBM Granite 4): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks, one call each; the text around and between them is content. The tags are special
  tokens in some Granite 4 tokenizers, so requests that may call keep them. As in vLLM,
  an answer whose first block is not a call, or that ends inside it, is all content; after a
  call (which a stream has sent by then) such a block is content, where vLLM would take the
  whole answer back as content (its stream keeps the call).
- ``llama3_json``, also ``llama4_json`` (Llama 3.1/3.2/4 JSON tool calling): an answer that is one or more
  ``{"name": ..., "parameters": {...}}`` objects (separated by ``;``), optionally after
  ``<|python_tag|>``.
- ``mistral`` (Mistral 7B v0.3, Nemo, Small, Magistral...): content, then ``[TOOL_CALLS]`` and a
  JSON list of ``{"name": ..., "arguments": {...}}``, or (newer tokenizers) one
  ``[TOOL_CALLS]name[ARGS]{...}`` per call. ``[TOOL_CALLS]`` is a special token, so requests
  that may call keep it (and ``[ARGS]``) in their text, and call ids are the nine letters and digits
  Mistral's chat templates demand when the calls come back.
- ``pythonic`` (Llama 3.2 and 4, some Gemma 3 and other templates): an answer that is a Python
  list of calls with keyword arguments, ``[get_weather(city="Paris"), get_time()]``, read with
  ``ast`` (literals only, nothing is evaluated); ``llama4_pythonic`` (Llama 4): the same list,
  optionally in ``<|python_start|>`` ... ``<|python_end|>`` (special tokens, kept); see
  :mod:`.tool_parsers_pythonic`.
- ``olmo3`` (OLMo 3): ``<function_calls>`` then one Python call per line (``null``, ``true``
  and ``false`` read as JSON's), then ``</function_calls>``; see :mod:`.tool_parsers_olmo3`.
- ``phi4_mini_json`` (Phi-4-mini): ``functools[{"name": ..., "arguments": {...}}, ...]``,
  ``granite`` (Granite 3.0/3.1): ``<|tool_call|>[{"name": ..., "arguments": {...}}, ...]``, and
  ``xlam`` (Salesforce's xLAM): a JSON list of calls, bare, after ``</think>``, in a
  ```` ```json ```` fence, after ``[TOOL_CALLS]`` or in ``<tool_call>``; see
  :mod:`.tool_parsers_json_lists`.
- ``granite-20b-fc`` (granite-20b-functioncalling): ``<function_call> {"name": ...,
  "arguments": {...}}``, repeated; see :mod:`.tool_parsers_granite_fc`.
- ``functiongemma`` (FunctionGemma): ``<start_function_call>call:NAME{key:<escape>value<escape>}
  <end_function_call>``; see :mod:`.tool_parsers_functiongemma`.
- ``deepseek_v3`` (DeepSeek-V3, DeepSeek-R1 and R1's distills): ``<｜tool▁calls▁begin｜>``, then
  per call ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` and its arguments in a
  ```` ```json ```` fence, ``<｜tool▁call▁end｜>``; the markers are kept; see
  :mod:`.tool_parsers_deepseek`.
- ``qwen3_coder`` and ``qwen3_xml`` (Qwen3-Coder): ``<tool_call><function=NAME><parameter=KEY>
  VALUE</parameter></function></tool_call>``, values typed by the request's tool schemas; see
  :mod:`.tool_parsers_qwen3_xml`.

Where a format's markers are special tokens, the answer's text keeps those, and drops every
other special token the model writes (unless the request sets ``skip_special_tokens`` false), as
vLLM's Mistral and Granite parsers drop them; vLLM's granite4 and functiongemma keep them all.

The contract every parser keeps is :class:`~.tool_parser_base.ToolParser`.
"""

from __future__ import annotations

import random
import string

from pagedserve.entrypoints.openai.tool_parser_base import (
    Call,
    NotJson,
    ToolParser,
    arguments_text,
    call_of,
    dumps,
    held_back,
    loads,
    raw_decode,
)
from pagedserve.entrypoints.openai.tool_parsers_deepseek import DeepSeekV3Parser
from pagedserve.entrypoints.openai.tool_parsers_functiongemma import FunctionGemmaParser
from pagedserve.entrypoints.openai.tool_parsers_granite_fc import Granite20bFcParser
from pagedserve.entrypoints.openai.tool_parsers_json_lists import (
    GraniteParser,
    Phi4MiniJsonParser,
    XlamParser,
)
from pagedserve.entrypoints.openai.tool_parsers_olmo3 import Olmo3Parser
from pagedserve.entrypoints.openai.tool_parsers_pythonic import (
    Llama4PythonicParser,
    PythonicParser,
)
from pagedserve.entrypoints.openai.tool_parsers_qwen3_xml import Qwen3XmlParser


class HermesParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = text.find(self.START)
        if start < 0:
            return (text if final else text[: len(text) - held_back(text, self.START)]), []
        bodies = self._closed_bodies(text, start)
        if final:
            unclosed = text.rfind(self.START)
            if text.find(self.END, unclosed) < 0:  # cut short, or the model ended without it
                bodies.append(text[unclosed + len(self.START) :])
        calls = []
        for body in bodies:
            try:
                call = call_of(loads(body), "arguments")
            except NotJson:
                call = None
            if call is not None:
                calls.append(call)
            elif not calls:  # a malformed first call: the answer stays text, as vLLM keeps it
                return (text, []) if final else (text[:start], [])
            # A malformed call after calls (which a stream has sent) is left out, as the text
            # between calls is; vLLM would take the whole answer back as text.
        return text[:start], calls

    def _closed_bodies(self, text: str, start: int) -> list[str]:
        """The text of each closed block from the one at ``start`` on, found with ``find``: a
        lazy regex tried from each of many unclosed tags (a model repeating one) takes time
        quadratic in the answer, on every streamed step."""
        bodies = []
        while start >= 0:
            end = text.find(self.END, start + len(self.START))
            if end < 0:
                break
            bodies.append(text[start + len(self.START) : end])
            start = text.find(self.START, end + len(self.END))
        return bodies


class Granite4Parser(ToolParser):
    START, END = HermesParser.START, HermesParser.END
    special_tokens = frozenset((START, END))

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        content, calls, pos = "", [], 0
        while True:
            start = text.find(self.START, pos)
            if start < 0:
                rest = text[pos:]
                if not final:
                    rest = rest[: len(rest) - held_back(rest, self.START)]
                return content + rest, calls
            content += text[pos:start]
            end = text.find(self.END, start)
            call = None if end < 0 else self._call(text[start + len(self.START) : end])
            if call is not None:
                calls.append(call)
            elif not calls and final:
                return text, []  # a block that is no call, or is cut short: all text
            elif end < 0 and final:
                return content + text[start:], calls  # cut short after calls
            elif end < 0 or not calls:
                return content, calls  # read once it is whole
            else:  # no call after calls (which a stream has sent): its text is content
                content += text[start : end + len(self.END)]
            pos = end + len(self.END)

    @staticmethod
    def _call(body: str) -> Call | None:
        try:
            obj = loads(body)
        except NotJson:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        arguments = arguments_text(obj.get("arguments"))
        return None if arguments is None else (obj["name"], arguments)


class Llama3JsonParser(ToolParser):
    TAG = "<|python_tag|>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        body = text.lstrip()
        if body.startswith(self.TAG):
            body = body[len(self.TAG) :].lstrip()
        elif not body.startswith("{") and not self.TAG.startswith(body):
            return text, []  # plain content, streamed as it comes
        if not final:
            return "", []  # a call is read once it is whole
        calls = self._calls(body)
        return ("", calls) if calls else (text, [])

    @staticmethod
    def _calls(body: str) -> list[Call]:
        calls, pos = [], 0
        while pos < len(body):
            try:
                obj, pos = raw_decode(body, pos)
            except NotJson:
                return []
            key = "parameters" if isinstance(obj, dict) and "parameters" in obj else "arguments"
            call = call_of(obj, key)
            if call is None:
                return []
            calls.append(call)
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return calls


def _mistral_call_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=9))


class MistralParser(ToolParser):
    TAG, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
    special_tokens = frozenset((TAG, ARGS, CALL_ID))
    new_call_id = staticmethod(_mistral_call_id)

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = text.find(self.TAG)
        if start < 0:
            return (text if final else text[: len(text) - held_back(text, self.TAG)]), []
        if not final:
            return text[:start], []  # calls are read once the answer is whole
        body = text[start:]
        calls = self._name_args_calls(body) if self.ARGS in body else self._json_calls(body)
        return (text[:start], calls) if calls else (text, [])

    def _json_calls(self, body: str) -> list[Call]:
        try:
            decoded, _ = raw_decode(body[len(self.TAG) :].lstrip())
        except NotJson:
            return []
        calls = []
        for obj in decoded if isinstance(decoded, list) else [decoded]:
            call = call_of(obj, "arguments")
            if call is None:
                return []
            calls.append(call)
        return calls

    def _name_args_calls(self, body: str) -> list[Call]:
        calls = []
        for piece in body.split(self.TAG)[1:]:
            name, sep, arguments = piece.partition(self.ARGS)
            name = name.partition(self.CALL_ID)[0].strip()
            try:
                decoded, _ = raw_decode(arguments.strip())
            except NotJson:
                return []
            if not sep or not name or not isinstance(decoded, dict):
                return []
            calls.append((name, dumps(decoded)))
        return calls


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "deepseek_v3": DeepSeekV3Parser,
    "functiongemma": FunctionGemmaParser,
    "granite": GraniteParser,
    "granite-20b-fc": Granite20bFcParser,
    "granite4": Granite4Parser,
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "llama4_json": Llama3JsonParser,
    "llama4_pythonic": Llama4PythonicParser,
    "mistral": MistralParser,
    "olmo3": Olmo3Parser,
    "phi4_mini_json": Phi4MiniJsonParser,
    "pythonic": PythonicParser,
    "qwen3_coder": Qwen3XmlParser,
    "qwen3_json": HermesParser,
    "qwen3_xml": Qwen3XmlParser,
    "xlam": XlamParser,
}
