"""A reasoning model's thinking, split from its answer (vLLM's ``--reasoning-parser``).

Models such as DeepSeek-R1 and its distills, QwQ and Qwen3 think between ``<think>`` and
``</think>`` before they answer. The server returns the thinking as ``reasoning_content`` (and
``reasoning``, vLLM's newer name for it) and the rest as ``content``:
- ``deepseek_r1``: the chat template opens ``<think>`` itself, so the answer starts inside it
  (a leading ``<think>`` is dropped) and everything up to ``</think>`` is reasoning; an answer
  cut before ``</think>`` is all reasoning;
- ``olmo3`` (OLMo 3 Think): read as ``deepseek_r1`` (its ``<think>`` is plain text, and its
  template may open it for the answer);
- ``qwen3``: an answer thinks from its first token when its prompt ends inside an open
  ``<think>`` (Qwen3-2507's thinking template opens it unseen), or from a ``<think>`` it opens
  with itself; otherwise (thinking turned off, whose template closes ``<think>`` in the prompt,
  or a model that does not think) the whole answer is content, a stray ``</think>`` included;
- ``mistral`` (Magistral): as ``qwen3``, with the markers ``[THINK]`` and ``[/THINK]``, special
  tokens of Magistral's tokenizers, which the answer's text therefore keeps (other special
  tokens the model writes, a ``</s>`` or ``[INST]``, are dropped, as vLLM drops them, unless
  the request sets ``skip_special_tokens`` false); a ``[TOOL_CALLS]`` written while thinking
  ends it too (as in vLLM), and stays for the tool parser to read;
- ``granite`` (Granite 3.2 with ``thinking`` on): the answer thinks when it opens with ``Here is
  my thought process:`` (or ``Here's``) until ``Here is my response:`` (or ``Here's``), plain
  text that the template's system prompt asks for.

Only the first thinking section is reasoning: from its end marker on, the answer is content.
The split is decided before the answer's first token (by the prompt and the parser) or by its
first characters, so an answer streamed piece by piece splits as it does whole; while it
streams, text that may be the start of a marker (one split across pieces) is held back until it
is decided.

vLLM 0.32's qwen3 parser starts every answer in its thinking unless the request's
``chat_template_kwargs`` set ``enable_thinking: false``; its streaming parsers may seed that
state from the prompt's end (``adjust_initial_state_from_prompt``). Here the prompt's end
decides, which agrees with vLLM for Qwen3's templates (thinking on, off, and 2507's) and keeps
the answers of a model that never thinks as content rather than reasoning. vLLM's olmo3 and
granite parsers split a whole answer that never ends its thinking as all content, and stream
it as reasoning; here it is reasoning both ways. vLLM's granite parser also finds the markers
anywhere in a whole answer (dropping the text before them); here the answer opens with them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

START, END = "<think>", "</think>"


class Thinking(Enum):
    """Where an answer's thinking starts: nowhere, at its first token, or after the start
    marker it opens with."""

    NONE = "none"
    FROM_START = "from_start"
    OPENED = "opened"


@dataclass(frozen=True)
class ReasoningParser:
    thinks_from_start: bool  # the template always opens thinking: reasoning until its end
    # A prompt that ends inside an open thinking section starts the answer thinking.
    follows_prompt: bool = True
    # The markers that open and end thinking, each in the spellings the model writes; the
    # first is the one the engine matches in tokens and forces (a thinking budget).
    starts: tuple[str, ...] = (START,)
    ends: tuple[str, ...] = (END,)
    # Markers that end thinking and begin the content, which keeps them (a tool call written
    # while thinking, as Magistral may write its [TOOL_CALLS]).
    content_opens: tuple[str, ...] = ()
    # The markers are special tokens, which the answer's text must keep to be split.
    keeps_special_tokens: bool = False

    def thinking(self, text: str, final: bool, prompt_thinks: bool) -> Thinking | None:
        """How the answer so far thinks; None while its first characters may still open
        thinking. ``prompt_thinks``: its prompt ends inside an open thinking section."""
        body = text.lstrip()
        if self._opening(body):
            return Thinking.OPENED
        if not final and any(start.startswith(body) for start in self.starts):
            return None
        if self.thinks_from_start or (self.follows_prompt and prompt_thinks):
            return Thinking.FROM_START
        return Thinking.NONE

    def split(self, text: str, final: bool, prompt_thinks: bool = False) -> tuple[str, str]:
        """(reasoning, content) of an answer so far; ``final``: the answer is whole."""
        thinking = self.thinking(text, final, prompt_thinks)
        if thinking is None:
            return "", ""
        if thinking is Thinking.NONE:
            return "", text
        body = text
        if thinking is Thinking.OPENED:
            body = text.lstrip()
            body = body[len(self._opening(body)) :]
        found = [(body.find(end), len(end)) for end in self.ends]
        found += [(body.find(opens), 0) for opens in self.content_opens]
        found = [(at, size) for at, size in found if at >= 0]
        if found:
            at, size = min(found)
            return body[:at], body[at + size :]
        if not final:
            markers = self.ends + self.content_opens
            body = body[: len(body) - max(_partial_tag(body, m) for m in markers)]
        return body, ""

    @property
    def special_tokens(self) -> frozenset[str]:
        """The markers the answer's text must keep, where they are special tokens."""
        if not self.keeps_special_tokens:
            return frozenset()
        return frozenset(self.starts + self.ends + self.content_opens)

    def held_by_grammar(self) -> ReasoningParser:
        """This parser for an answer a grammar holds from its first token: it thinks only if it
        opens with a start marker; else it is all content, whatever the prompt opened, an end
        marker in one of its JSON strings included."""
        return replace(self, thinks_from_start=False, follows_prompt=False)

    def _opening(self, body: str) -> str:
        """The start marker ``body`` opens with ("" if none)."""
        return next((start for start in self.starts if body.startswith(start)), "")


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser(thinks_from_start=True),
    "granite": ReasoningParser(
        thinks_from_start=False,
        follows_prompt=False,  # its system prompt names both markers, as text
        starts=("Here is my thought process:", "Here's my thought process:"),
        ends=("Here is my response:", "Here's my response:"),
    ),
    "mistral": ReasoningParser(
        thinks_from_start=False,
        starts=("[THINK]",),
        ends=("[/THINK]",),
        content_opens=("[TOOL_CALLS]",),
        keeps_special_tokens=True,
    ),
    "olmo3": ReasoningParser(thinks_from_start=True),
    "qwen3": ReasoningParser(thinks_from_start=False),
}
