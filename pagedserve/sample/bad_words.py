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
    sequences: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def banned_next_tokens(sequences: list[list[int]], generated: Sequence[int]) -> set[int]:
    """The tokens that would complete one of ``sequences`` right after ``generated``."""
    banned = set()
    for seq in sequences:
        prefix = len(seq) - 1
        if prefix <= len(generated) and list(generated[len(generated) - prefix :]) == seq[:-1]:
            banned.add(seq[-1])
    return banned
