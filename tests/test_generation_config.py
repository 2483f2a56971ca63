"""A model directory's generation_config.json: its eos ids end generations, and its sampling
values are the defaults of requests that leave them out (offline and served), as vLLM's
``--generation-config auto``; ``vllm`` ignores the file."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from server_utils import MODEL_NAME, ServerProcess

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.cli import terminal_sampling_params
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.model.generation_config import GenerationConfig, load_generation_config

PROMPT = {"prompt_token_ids": [5, 900, 17, 4000, 33]}


def _with_generation_config(tiny_model_dir, tmp_path, **fields) -> str:
    """A copy of the tiny Llama directory whose generation_config.json holds ``fields``."""
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps(fields))
    return str(path)


def test_the_file_read(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "eos_token_id": [1, 106],
                "top_k": 64,
                "top_p": 0.95,
                "max_new_tokens": 7,
                "do_sample": True,
                "pad_token_id": 0,
            }
        )
    )
    config = load_generation_config(str(tmp_path))
    assert config.eos_token_ids == {1, 106}
    assert config.sampling_defaults == {"top_k": 64, "top_p": 0.95, "max_tokens": 7}
    assert load_generation_config(str(tmp_path), "vllm").sampling_defaults == {}
    assert load_generation_config("model.gguf").eos_token_ids == set()
    assert load_generation_config("elsewhere", str(tmp_path)).eos_token_ids == {1, 106}
    with pytest.raises(FileNotFoundError, match="has no generation_config.json"):
        load_generation_config(str(tmp_path), str(tmp_path / "missing"))


def test_offline_defaults_and_end_of_turn_token(tiny_model_dir, tmp_path):
    plain = LLM(tiny_model_dir("llama"), device="cpu", kv_cache_memory=0.02)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = plain.generate([PROMPT], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_at = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 2)

    path = _with_generation_config(
        tiny_model_dir,
        tmp_path,
        eos_token_id=[2, tokens[stop_at]],
        temperature=0.0,
        max_new_tokens=8,
    )
    llm = LLM(path, device="cpu", kv_cache_memory=0.02)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens) == (0.0, 8)
    out = llm.generate([PROMPT], use_tqdm=False)[0].outputs[0]  # greedy: the file's default
    assert out.token_ids == tokens[: stop_at + 1] and out.finish_reason == "stop"

    ignored = LLM(path, device="cpu", kv_cache_memory=0.02, generation_config="vllm")
    assert ignored.get_default_sampling_params().temperature == 1.0
    out = ignored.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert out[0].outputs[0].token_ids == tokens


def test_request_values_beat_the_defaults():
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.5}
    )
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    params = request.sampling_params(16, None, None, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.5, 20)
    plain = request.sampling_params(16, None, None)
    assert (plain.temperature, plain.top_p, plain.top_k) == (1.0, 0.5, 0)


def test_penalty_defaults(tmp_path):
    """vLLM takes presence_penalty and frequency_penalty from the generation config too (Qwen's
    recommend a presence penalty); a request's own value, 0 included, beats them."""
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.25}
    (tmp_path / "generation_config.json").write_text(json.dumps(penalties))
    assert load_generation_config(str(tmp_path)).sampling_defaults == penalties
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    left_out = ChatCompletionRequest.model_validate(chat).sampling_params(4, None, None, penalties)
    assert (left_out.presence_penalty, left_out.frequency_penalty) == (1.5, 0.25)
    given = ChatCompletionRequest.model_validate({**chat, "presence_penalty": 0})
    assert given.sampling_params(4, None, None, penalties).presence_penalty == 0
    plain = ChatCompletionRequest.model_validate(chat).sampling_params(4, None, None)
    assert (plain.presence_penalty, plain.frequency_penalty) == (0.0, 0.0)


def test_served_defaults(tiny_model_dir, tmp_path):
    """A chat that names neither temperature nor max_tokens is greedy and 3 tokens long."""
    path = _with_generation_config(tiny_model_dir, tmp_path, temperature=0.0, max_new_tokens=3)
    server = ServerProcess(
        [path, "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.02"]
    ).wait_ready()
    try:
        client = server.client()
        messages = [{"role": "user", "content": "Say something."}]
        answers = [
            client.chat.completions.create(model=MODEL_NAME, messages=messages) for _ in range(2)
        ]
        assert all(a.usage.completion_tokens == 3 for a in answers)
        assert all(a.choices[0].finish_reason == "length" for a in answers)
        assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
        longer = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert longer.usage.completion_tokens == 5
    finally:
        server.close()


def test_terminal_commands_fall_back_to_the_defaults():
    """``pagedserve chat`` / ``generate``: a flag given wins, then the model's default, then the
    terminal's own (temperature 0.7)."""
    model = SimpleNamespace(
        generation_config=GenerationConfig(sampling_defaults={"temperature": 0.6, "top_k": 20})
    )
    flags = SimpleNamespace(temperature=None, top_p=None, top_k=5, sampling_seed=3)
    params = terminal_sampling_params(model, flags, 32)
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.6, 1.0, 5, 3)
    bare = SimpleNamespace(generation_config=GenerationConfig())
    assert terminal_sampling_params(bare, flags, 32).temperature == 0.7
