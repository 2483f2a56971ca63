"""Reading a ``tool_choice: "required"`` answer's calls while it is written: every prefix of
the answer gives calls whose arguments only grow, and the whole answer gives each call's
``parameters`` text as written."""

from __future__ import annotations

import json

import pytest

from pagedserve.entrypoints.openai.required_calls import RequiredCallsReader

ANSWERS = [
    '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris", "unit": "celsius"}}, '
    '{"name":"get_time","parameters":{"tz":"UTC"}}]',
    '[ { "parameters" : { "a" : [1, {"b": "}]"}] } , "name" : "f" } ]',
    '[{"name": "n", "parameters": 12 }]',
    '[\n  {\n    "name": "x\\u00e9",\n    "parameters": {}\n  }\n]',
]


@pytest.mark.parametrize("answer", ANSWERS)
def test_every_prefix_extends_the_calls_read_before(answer):
    reader, sent = RequiredCallsReader(), {}
    for end in range(1, len(answer) + 1):
        text = answer[:end]
        for k, call in enumerate(reader.read(text)):
            if call.name is None:
                continue
            arguments = call.arguments(text)
            assert arguments.startswith(sent.get(k, ""))
            sent[k] = arguments
    calls = json.loads(answer)
    assert [json.loads(sent[k]) for k in range(len(calls))] == [c["parameters"] for c in calls]
    whole = RequiredCallsReader().read(answer)
    assert [c.name for c in whole] == [c["name"] for c in calls]
    assert [c.arguments(answer) for c in whole] == [sent[k] for k in range(len(calls))]


def test_a_name_counts_once_its_string_is_whole():
    reader = RequiredCallsReader()
    assert reader.read('[{"name": "get_w')[0].name is None
    assert reader.read('[{"name": "get_weather"')[0].name == "get_weather"
