"""vLLM's /tokenize and /detokenize on a server whose chat template lists the request's tools."""

from __future__ import annotations

import pytest
from server_utils import ROLE_TEMPLATE, request, templated_server

TOOLS_TEMPLATE = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}" + ROLE_TEMPLATE
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("template")
    srv = templated_server(directory, tiny_model_dir("llama"), TOOLS_TEMPLATE)
    yield srv
    srv.close()


def tokenize(server, body):
    return request(server.url + "/tokenize", "POST", body)


def test_chat_tools_reach_the_template(server):
    """As in vLLM, a chat's ``tools`` are tokenized as the template writes them."""
    messages = [{"role": "user", "content": "hi"}]
    status, with_tools = tokenize(server, {"messages": messages, "tools": [WEATHER]})
    assert status == 200, with_tools
    text = "[get_weather]<user>hi<assistant>"
    _, expected = tokenize(server, {"prompt": text, "add_special_tokens": False})
    assert with_tools["tokens"] == expected["tokens"]
    _, without = tokenize(server, {"messages": messages})
    assert without["count"] < with_tools["count"]
    status, error = tokenize(server, {"messages": messages, "tools": "get_weather"})
    assert status == 400 and error["error"]["param"] == "tools"
