"""vLLM's ``bad_words``: words the output must not contain, banned one token at a time.

A word is banned as the token sequences that spell it at the start of a text and after a space
(the two ways a tokenizer usually writes it). Each step, a sequence's last token is banned
wherever the tokens generated so far end with the rest of it, so the word can never be
completed; a one-token word is banned outright. Only generated tokens count, as in vLLM: the
word may appear in the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def bad_word_sequences(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """The distinct token sequences of ``words``, each word written bare and after a space."""
    sequences: dict[tuple[int, ...], None] = {}  # ordered, and a lookup in O(1)
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids:
                sequences[tuple(ids)] = None
    return [list(ids) for ids in sequences]


BadWordsIndex = dict[int, dict[tuple[int, ...], set[int]]]


def bad_words_index(sequences: list[list[int]]) -> BadWordsIndex:
    """``sequences`` by the length of all but their last token, then by those tokens: the last
    tokens that such a prefix bans. A step then looks up one tail of the output per distinct
    length, not every sequence (10,000 bad words are 20,000 sequences)."""
    index: BadWordsIndex = {}
    for seq in sequences:
        index.setdefault(len(seq) - 1, {}).setdefault(tuple(seq[:-1]), set()).add(seq[-1])
    return index


def banned_next_tokens(index: BadWordsIndex, generated: Sequence[int]) -> set[int]:
    """The tokens that would complete one of the indexed sequences right after ``generated``."""
    banned: set[int] = set()
    for length, by_prefix in index.items():
        if length <= len(generated):
            banned |= by_prefix.get(tuple(generated[len(generated) - length :]), set())
    return banned
