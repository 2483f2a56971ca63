"""A Mixture-of-Experts model behind the OpenAI-compatible server: a tiny random Qwen2-MoE
answers completions and chat through the ``openai`` client, its greedy tokens transformers'."""

from __future__ import annotations

import pytest
import torch
from server_utils import MODEL_NAME, role_template_server
from tiny_moe import tiny_moe_model, write_tiny_moe


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_tokenizer):
    path = write_tiny_moe(tmp_path_factory.mktemp("moe"), "qwen2_moe", smollm2_tokenizer)
    srv = role_template_server(
        tmp_path_factory, str(path), "--dtype", "float32", "--kv-cache-memory", "0.02"
    )
    yield srv
    srv.close()


def test_completion_is_transformers_greedy_continuation(server):
    prompt = [1045, 2200, 30010, 77, 9001, 12, 4000, 310]
    answer = server.client().completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    with torch.inference_mode():
        ids = tiny_moe_model("qwen2_moe").generate(
            torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    assert answer.choices[0].token_ids == ids[0, len(prompt) :].tolist()
    assert answer.usage.completion_tokens == 6


def test_chat_streams(server):
    chunks = server.client().chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=5,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    choices = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.delta.content or "" for c in choices)
    assert choices[-1].finish_reason == "length"
