"""vLLM's ``stream_interval``: a stream sends a chunk once every N new tokens of a choice, not
after every token (fewer, larger chunks for clients that do not need each token at once).

The engine's outputs are cumulative, so an output held back loses nothing: the next one sent
carries its text too. The first output and every output in which a choice finishes go out at
once. A request without ``stream_interval`` sends every output, as before.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from pagedserve.outputs import RequestOutput


class StreamIntervalField(BaseModel):
    """The request field, shared by chat and completions (ignored without ``stream``, as in
    vLLM)."""

    stream_interval: int | None = Field(default=None, ge=1)


class StreamGate:
    """Decides which of a stream's outputs become chunks; one gate per response, its outputs
    keyed by prompt (a completions request may have several prompts)."""

    def __init__(self, interval: int | None) -> None:
        self.interval = interval or 1
        self._sent: dict[tuple[int, int], int] = {}  # (prompt, choice) -> tokens when last sent
        self._finished: set[tuple[int, int]] = set()
        self._started: set[int] = set()  # prompts with an output sent

    def passes(self, out: RequestOutput, prompt: int = 0) -> bool:
        """Whether ``out`` (of prompt ``prompt``) is sent: the first of its prompt, one where a
        choice finished, or one where a choice has ``interval`` tokens more than last sent."""
        if self.interval == 1:
            return True
        due = prompt not in self._started
        for c in out.outputs:
            key = (prompt, c.index)
            if c.finish_reason is not None and key not in self._finished:
                due = True
            elif len(c.token_ids) - self._sent.get(key, 0) >= self.interval:
                due = True
        if due:
            self._started.add(prompt)
            for c in out.outputs:
                key = (prompt, c.index)
                self._sent[key] = len(c.token_ids)
                if c.finish_reason is not None:
                    self._finished.add(key)
        return due
