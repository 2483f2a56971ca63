"""vLLM's routes beside the API proper: the readiness probes ``/ready`` and ``/readyz`` and
``/tokenizer_info`` (behind ``--enable-tokenizer-info-endpoint``). The server runs a tiny random
model with its own chat template and requires an API key, which the probes do not."""

from __future__ import annotations

import pytest
from server_utils import MODEL_NAME, ServerProcess, request, templated_server

KEY = "sk-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = templated_server(
        tmp_path_factory.mktemp("template"),
        tiny_model_dir("llama"),
        TEMPLATE,
        "--max-model-len", "256",
        "--kv-cache-memory", "0.05",
        "--enable-tokenizer-info-endpoint",
        env={"PAGEDSERVE_API_KEY": KEY},
    )  # fmt: skip
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def plain_server(tiny_model_dir):
    """The same model with none of the flags."""
    srv = ServerProcess([tiny_model_dir("llama"), "--served-model-name", MODEL_NAME])
    yield srv.wait_ready()
    srv.close()


def get(server, path, headers=AUTH):
    return request(server.url + path, "GET", None, headers)


def post(server, path, body, headers=AUTH):
    return request(server.url + path, "POST", body, headers)


def assert_error(body, status_type=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status_type is not None:
        assert body["error"]["type"] == status_type


def test_readiness_probes_need_no_key(server):
    for path in ("/ready", "/readyz", "/health"):
        assert get(server, path, headers={}) == (200, "")
    status, body = post(server, "/ready", {}, headers={})
    assert status == 405
    assert_error(body)


def test_tokenizer_info(server):
    status, info = get(server, "/tokenizer_info")
    assert status == 200
    assert info["tokenizer_class"]
    assert info["chat_template"] == TEMPLATE  # the one the server renders with
    assert info["eos_token"] == "<|im_end|>"
    assert "vocab_file" not in info
    status, body = get(server, "/tokenizer_info", headers={})
    assert status == 401
    assert_error(body)


def test_routes_off_without_their_flags(plain_server):
    status, body = get(plain_server, "/tokenizer_info")
    assert status == 404
    assert_error(body)
