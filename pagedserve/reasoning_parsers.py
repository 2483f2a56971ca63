"""A reasoning model's thinking, split from its answer (vLLM's ``--reasoning-parser``).

Models such as DeepSeek-R1 and its distills, QwQ and Qwen3 think between ``<think>`` and
``</think>`` before they answer. The server returns the thinking as ``reasoning_content`` (and
``reasoning``, vLLM's newer name for it) and the rest as ``content``:
- ``deepseek_r1``: the chat template opens ``<think>`` itself, so the answer starts inside it
  (a leading ``<think>`` is dropped) and everything up to ``</think>`` is reasoning; an answer
  cut before ``</think>`` is all reasoning;
- ``qwen3``: only an answer that opens with ``<think>`` thinks (Qwen3 with thinking turned off
  does not); without it the whole answer is content.

While an answer streams, text that may be the start of a tag is held back until it is decided.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    thinks_from_start: bool  # the template opened <think>: reasoning until </think>
    # An answer that did not open <think> may still close one its template opened unseen.
    ends_unopened: bool = True

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of an answer so far; ``final``: the answer is whole."""
        body = text.lstrip()
        if body.startswith(START):
            body, thinking = body[len(START) :], True
        elif not final and START.startswith(body):
            return "", ""  # may still open with <think>
        else:
            body, thinking = text, self.thinks_from_start
            if not thinking and not self.ends_unopened:
                return "", text
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END) :]
        if not thinking:
            return "", text
        if not final:
            body = body[: len(body) - _partial_tag(body, END)]
        return body, ""


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0 if none)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


# Thinks only where the answer opens <think> itself (what qwen3 expects of every answer).
OPENS_ITSELF = ReasoningParser(thinks_from_start=False)
# An answer a grammar holds from its first token: it thinks only if it opens with <think>;
# else it is all content, a "</think>" in one of its JSON strings included.
HELD_BY_GRAMMAR = ReasoningParser(thinks_from_start=False, ends_unopened=False)

REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser(thinks_from_start=True),
    "qwen3": OPENS_ITSELF,
}
