"""Incremental detokenization of one sequence, with stop strings.

Each new token is decoded together with a short window of the tokens before it (the prefix/read
offset technique of vLLM and TGI): the text the token adds is ``decode(window + token)`` minus
``decode(window)``, so a step costs O(new tokens) whatever the length of the sequence, and the
tokenizer's context-dependent spacing (sentencepiece's leading space, for instance) comes out as in
one decode of the whole sequence. Text ending in U+FFFD is held until the next tokens complete the
UTF-8 character.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Any

from pagedserve.sampling_params import SamplingParams

# Prompt tokens decoded ahead of the output so the first output tokens get their spacing right.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"

# Per tokenizer: token id -> text of that token alone (for logprobs), and added-token contents.
_token_texts: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()
_added_tokens: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()
# Per tokenizer: the special tokens a set of kept ones leaves to drop.
_dropped: weakref.WeakKeyDictionary[Any, dict[frozenset[str], frozenset[int]]] = (
    weakref.WeakKeyDictionary()
)


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text as they arrive, and finds stop strings.

    ``skip_special_tokens`` drops special tokens from the text, but for ``kept_special_tokens``
    (the markers the server's parsers read), which stay as though none were skipped. With
    special tokens kept and
    ``spaces_between_special_tokens=False``, an added token that directly follows another one is
    emitted as its bare content, without the separator the tokenizer's decoder may put before it
    (vLLM's rule for fast tokenizers); otherwise the text is the tokenizer's own decoding.

    Stop strings are searched only in the new text plus the ``len(stop) - 1`` characters before
    it. The first one completed in the text wins (ties: the longer one), so the result does not
    depend on how the tokens were grouped into steps. As in vLLM, stop strings are not looked for
    until ``min_tokens`` tokens were generated, and a stop token (eos, ``stop_token_ids``) that
    ends the sequence adds no text unless ``include_stop_str_in_output``.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._drop = frozenset[int]()  # ids left out before decoding, the rest decoded as kept
        if params.skip_special_tokens and params.kept_special_tokens:
            self._skip_special = False
            self._drop = dropped_special_ids(tokenizer, params.kept_special_tokens)
        self._detokenize = params.detokenize
        self._stops = params.stop_strings
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # The stop strings as a set, its lengths longest first, and sorted: a step looks up one
        # slice per new character and length, not every stop string (clients send thousands).
        self._stop_set = frozenset(self._stops)
        self._stop_lengths = sorted({len(s) for s in self._stops}, reverse=True)
        self._sorted_stops = sorted(self._stop_set)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._bare_added: dict[int, str] | None = None
        if not self._skip_special and not params.spaces_between_special_tokens:
            self._bare_added = _added_token_contents(tokenizer)
        self._last_was_added = False

        # _window[:_read] is decoded context whose text was already emitted (or is prompt);
        # _window[_read:] are tokens whose text is still pending.
        self._window = self._prompt_context(prompt_token_ids)
        self._read = len(self._window)
        self._window_text: str | None = None  # cached decode of _window[:_read]
        self._text = ""
        self._num_tokens = 0
        self._checked = 0  # stop strings were searched in _text[:_checked]
        self._stop_string: str | None = None

    def append(self, token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Add newly generated tokens; return the stop string matched (the text is then cut
        before it, or after it with ``include_stop_str_in_output``), else None.

        ``stop_terminated``: the last token is a stop token (eos or a stop_token_id) that ends
        the sequence; its text is left out unless ``include_stop_str_in_output``."""
        if self._stop_string is not None or not self._detokenize:
            return None
        decoded = token_ids
        if stop_terminated and not self._include_stop:
            decoded = token_ids[:-1]
        for token_id in decoded:
            self._num_tokens += 1
            self._text += self._next_text(token_id)
            if self._num_tokens <= self._min_tokens:
                self._checked = len(self._text)
        self._num_tokens += len(token_ids) - len(decoded)
        if not self._stops or len(self._text) == self._checked:
            return None
        return self._find_stop()

    def output_text(self, finished: bool) -> str:
        """Text that may be shown. While not finished, a tail that could still grow into a stop
        string is held back, so the result only ever grows from call to call; once finished, all
        of it (after stop truncation, and with any incomplete character flushed)."""
        if finished:
            if self._stop_string is None:
                self._flush()
            return self._text
        if not self._stops or self._stop_string is not None:
            return self._text
        return self._text[: len(self._text) - self._held_back()]

    def decode_token(self, token_id: int) -> str:
        """The text of one token alone (``Logprob.decoded_token``), as vLLM reports it."""
        cache = _token_texts.setdefault(self.tokenizer, {})
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = self.tokenizer.decode([token_id])
        return text

    def _decode(self, token_ids: list[int]) -> str:
        if self._drop:
            token_ids = [t for t in token_ids if t not in self._drop]
        return self.tokenizer.decode(
            token_ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _prompt_context(self, prompt_token_ids: list[int]) -> list[int]:
        """The last few prompt tokens, fewer if needed so they do not start inside a character."""
        for n in range(min(_PROMPT_CONTEXT_TOKENS, len(prompt_token_ids)), 0, -1):
            context = list(prompt_token_ids[-n:])
            if _REPLACEMENT_CHAR not in self._decode(context):
                return context
        return []

    def _next_text(self, token_id: int) -> str:
        """The text ``token_id`` completes (empty while a character is still incomplete)."""
        if token_id in self._drop:
            return ""
        self._window.append(token_id)
        if self._window_text is None:
            self._window_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(self._window_text) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        new = text[len(self._window_text) :]
        if self._bare_added is not None:
            content = self._bare_added.get(token_id)
            if content is not None and self._last_was_added:
                new = content
            self._last_was_added = content is not None
        del self._window[: self._read]
        self._read = len(self._window)
        self._window_text = None
        return new

    def _flush(self) -> None:
        """Emit the text of pending tokens as it is (an incomplete character becomes U+FFFD)."""
        if self._read == len(self._window):
            return
        if self._window_text is None:
            self._window_text = self._decode(self._window[: self._read])
        self._text += self._decode(self._window)[len(self._window_text) :]
        self._read = len(self._window)
        self._window_text = None

    def _find_stop(self) -> str | None:
        """Search the text not searched yet (plus the overlap a stop string may need): the stop
        string that ends first, the longer one where two end at the same character."""
        text = self._text
        for end in range(self._checked + 1, len(text) + 1):
            for length in self._stop_lengths:
                if length <= end and text[end - length : end] in self._stop_set:
                    stop = text[end - length : end]
                    self._text = text[: end if self._include_stop else end - length]
                    self._checked = len(self._text)
                    self._stop_string = stop
                    return stop
        self._checked = len(text)
        return None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text, stops = self._text, self._sorted_stops
        for k in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            # The stop strings that start with ``tail`` follow each other from its place in the
            # sorted list, ``tail`` itself first if it is one (then the next is longer).
            i = bisect.bisect_left(stops, tail)
            i += i < len(stops) and stops[i] == tail
            if i < len(stops) and stops[i].startswith(tail):
                return k
        return 0


def _added_token_contents(tokenizer: Any) -> dict[int, str]:
    contents = _added_tokens.get(tokenizer)
    if contents is None:
        contents = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        _added_tokens[tokenizer] = contents
    return contents


def dropped_special_ids(tokenizer: Any, kept: frozenset[str]) -> frozenset[int]:
    """The ids ``skip_special_tokens`` drops (the tokenizer's special tokens, and its added
    tokens marked special) but for those whose text is in ``kept``."""
    cache = _dropped.setdefault(tokenizer, {})
    dropped = cache.get(kept)
    if dropped is None:
        added = tokenizer.added_tokens_decoder
        ids = sorted({i for i, t in added.items() if t.special} | set(tokenizer.all_special_ids))
        texts = tokenizer.convert_ids_to_tokens(ids)
        dropped = frozenset(i for i, t in zip(ids, texts, strict=True) if t not in kept)
        cache[kept] = dropped
    return dropped


def decoded(tokenizer: Any, token_ids: list[int], skip_special: bool, kept: frozenset[str]) -> str:
    """``token_ids`` as text at once, special tokens left out with ``skip_special`` but for those
    in ``kept`` (as :class:`IncrementalDetokenizer` gives it)."""
    if skip_special and kept:
        drop = dropped_special_ids(tokenizer, kept)
        return tokenizer.decode([t for t in token_ids if t not in drop], skip_special_tokens=False)
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special)
