"""Anthropic's Messages API: the content blocks agents send, as the prompt the model reads. A
tiny random model behind the official ``anthropic`` client; ``/v1/messages/render`` (vLLM's,
with ``--enable-scale-out``) shows the prompt a request makes."""

from __future__ import annotations

import anthropic
import pytest
from server_utils import MODEL_NAME, request, templated_server

# Each message as <role>text, tool calls as <call>name; a system message only first, as many
# templates (Qwen's among them) insist.
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' and not loop.first %}"
    "{{ raise_exception('System message must be at the beginning.') }}{% endif %}"
    "<{{ m.role }}>{% if m.content is string %}{{ m.content }}"
    "{% elif m.content %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}
CALL = {"role": "assistant", "content": [
    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}  # fmt: skip
IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = templated_server(
        tmp_path_factory.mktemp("template"),
        tiny_model_dir("llama"),
        TEMPLATE,
        "--kv-cache-memory", "0.05",
        "--enable-scale-out",
    )  # fmt: skip
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def prompt(server, smollm2_tokenizer):
    """``prompt(messages, **fields)`` -> the prompt text of that Messages API request."""

    def render(messages: list[dict], **fields) -> str:
        body = {"model": MODEL_NAME, "max_tokens": 4, "messages": messages, **fields}
        status, rendered = request(server.url + "/v1/messages/render", "POST", body)
        assert status == 200, rendered
        return smollm2_tokenizer.decode(rendered["token_ids"])

    return render


def answer(client, messages: list[dict], **fields) -> str:
    m = client.messages.create(
        model=MODEL_NAME, max_tokens=4, messages=messages, extra_body={"temperature": 0}, **fields
    )
    return m.content[0].text


def result(content, **fields) -> dict:
    """A user turn with the result of CALL."""
    block = {"type": "tool_result", "tool_use_id": "toolu_1", "content": content, **fields}
    return {"role": "user", "content": [block]}


def bad_request(client, messages: list[dict], **fields) -> dict:
    """The error body of a request refused with a 400."""
    with pytest.raises(anthropic.BadRequestError) as caught:
        answer(client, messages, **fields)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    return body["error"]


def test_a_tool_result_marked_as_an_error_tells_the_model_so(client, prompt):
    """is_error: the result the model reads begins "Error:" (the flag was dropped, so a failed
    call read as a successful one)."""
    failed = [QUESTION, CALL, result("city not found", is_error=True)]
    assert prompt(failed).endswith("<tool>Error: city not found<assistant>")
    assert prompt([QUESTION, CALL, result("18 C")]).endswith("<tool>18 C<assistant>")
    assert prompt([QUESTION, CALL, result(None, is_error=True)]).endswith("<tool>Error:<assistant>")
    texts = [{"type": "text", "text": "no such city"}]
    blocks = [QUESTION, CALL, result(texts, is_error=True)]
    assert prompt(blocks).endswith("<tool>Error: no such city<assistant>")
    assert answer(client, failed)


def test_a_tool_result_as_text_blocks_and_an_image_refused(client, prompt):
    texts = [{"type": "text", "text": "18 C"}, {"type": "text", "text": "sunny"}]
    assert prompt([QUESTION, CALL, result(texts)]).endswith("<tool>18 C\nsunny<assistant>")
    assert answer(client, [QUESTION, CALL, result(texts)])
    error = bad_request(client, [QUESTION, CALL, result([texts[0], IMAGE])])
    assert "'image'" in error["message"] and "messages[2]" in error["message"]


def test_system_as_text_blocks_with_cache_control(client, prompt):
    """cache_control marks are accepted and left aside (the prefix cache needs none)."""
    system = [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Use English.", "cache_control": {"type": "ephemeral",
                                                                   "ttl": "1h"}},
    ]  # fmt: skip
    as_text = "Be brief.\nUse English."
    assert prompt([QUESTION], system=system) == prompt([QUESTION], system=as_text)
    assert prompt([QUESTION], system=system).startswith("<system>Be brief.\nUse English.<user>")
    assert answer(client, [QUESTION], system=system) == answer(client, [QUESTION], system=as_text)


def test_a_system_turn_in_the_messages(client, prompt):
    """Anthropic's roles are user and assistant, but vLLM takes a system turn too (agents send
    inline reminders): it is a system message, which joins the leading one where the template
    (this one) allows a system message only first. One that holds other than text is a 400 in
    Anthropic's schema, not a 500."""
    leading = [{"role": "system", "content": "Be brief."}, QUESTION]
    assert prompt(leading) == prompt([QUESTION], system="Be brief.")
    assert answer(client, leading) == answer(client, [QUESTION], system="Be brief.")
    inline = [QUESTION, {"role": "assistant", "content": "Which unit?"},
              {"role": "system", "content": "Use Celsius."}, QUESTION]  # fmt: skip
    assert prompt(inline, system="Be brief.").startswith(
        "<system>Be brief.\nUse Celsius.<user>What is the weather in Paris?<assistant>Which unit?"
        "<user>What"
    )
    assert answer(client, inline)
    image = [{"role": "system", "content": [IMAGE]}, QUESTION]
    error = bad_request(client, image)
    assert "'image'" in error["message"] and "messages[0]" in error["message"]


def test_claude_codes_billing_header_is_left_out(prompt):
    """Its per-request hash, first in the prompt, would leave nothing for the prefix cache."""
    header = {"type": "text", "text": "x-anthropic-billing-header: cc_version=1.0; cch=a1b2c;"}
    system = [header, {"type": "text", "text": "Be brief."}]
    assert prompt([QUESTION], system=system) == prompt([QUESTION], system="Be brief.")
    reminder = {"role": "system", "content": [header]}
    assert prompt([QUESTION, reminder, QUESTION]) == prompt([QUESTION, QUESTION])


def test_a_text_block_without_text_is_refused(client):
    """Anthropic's API refuses it; it was read as empty text."""
    for text in ({}, {"text": None}):
        block = {"type": "text", **text}
        error = bad_request(client, [{"role": "user", "content": [block]}])
        assert error["message"].startswith("messages.0.content")
    error = bad_request(client, [QUESTION], system=[{"type": "text", "text": None}])
    assert error["message"].startswith("system")
