"""vLLM's routes beside the API proper: the readiness probes ``/ready`` and ``/readyz``. The
server runs a tiny random model with its own chat template and requires an API key, which the
probes do not."""

from __future__ import annotations

import pytest
from server_utils import request, templated_server

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
        env={"PAGEDSERVE_API_KEY": KEY},
    )  # fmt: skip
    yield srv
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
