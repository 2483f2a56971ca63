"""Stored responses of the Responses API: what ``previous_response_id`` continues and what
``GET`` / ``DELETE /v1/responses/{id}`` read and remove.

Each stored response keeps its ``response`` object and the conversation up to and including it,
as chat messages (its instructions left out: OpenAI does not carry them over to the next turn).
The store lives in the server's memory and keeps the most recent ``capacity`` responses; a
restart forgets them all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

DEFAULT_CAPACITY = 1000


class ResponseStore:
    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def save(self, response: dict[str, Any], conversation: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the conversation that continues from it (the oldest stored
        response goes when the store is full)."""
        self._items[response["id"]] = (response, conversation + output_messages(response))
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any] | None:
        item = self._items.get(response_id)
        return None if item is None else item[0]

    def conversation(self, response_id: str) -> list[dict[str, Any]] | None:
        """The chat messages a turn after ``response_id`` starts from, or None if it is not
        stored."""
        item = self._items.get(response_id)
        return None if item is None else list(item[1])

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


def output_messages(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages a next turn reads: its text as an
    assistant message, its function calls as an assistant message's tool calls (a reasoning
    model's thinking is left out, as chat templates drop it from earlier turns)."""
    messages: list[dict[str, Any]] = []
    for item in response.get("output") or []:
        if item["type"] == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            messages.append({"role": "assistant", "content": text})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last.get("tool_calls") is not None:
                last["tool_calls"].append(call)
            elif last is not None and last["role"] == "assistant":
                last["tool_calls"] = [call]
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    return messages
