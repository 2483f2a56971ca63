"""A beam search whose beams can end: the eos that ends a beam, in the token ids only with
``include_stop_str_in_output`` and never in the text, as vLLM 0.32's served beam search answers;
offline (``LLM.beam_search``) and served alike."""

from __future__ import annotations

import json

import pytest
from server_utils import MODEL_NAME, ServerProcess, request

from pagedserve import LLM, BeamSearchParams, SamplingParams

PROMPT = [5, 900, 17, 4000, 33]


@pytest.fixture(scope="module")
def eos(tiny_model_dir) -> int:
    """The prompt's greedy next token, which the generation config below makes an eos: with no
    length penalty the one-token beam that it ends ranks first."""
    llm = LLM(tiny_model_dir("llama"), device="cpu", kv_cache_memory=0.01)
    (out,) = llm.generate(
        [{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False
    )
    return out.outputs[0].token_ids[0]


@pytest.fixture(scope="module")
def generation_config(tmp_path_factory, eos) -> str:
    directory = tmp_path_factory.mktemp("eos_generation_config")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    return str(directory)


@pytest.fixture(scope="module")
def llm(tiny_model_dir, generation_config):
    return LLM(
        tiny_model_dir("llama"),
        device="cpu",
        kv_cache_memory=0.01,
        generation_config=generation_config,
    )


@pytest.mark.parametrize("include", [False, True])
def test_offline_a_finished_beam_keeps_its_eos_only_when_asked(llm, eos, include):
    params = BeamSearchParams(2, 3, length_penalty=0.0, include_stop_str_in_output=include)
    (out,) = llm.beam_search([{"prompt_token_ids": PROMPT}], params)
    first, second = out.outputs
    assert first.finish_reason == "stop" and first.stop_reason == eos
    assert first.token_ids == ([eos] if include else [])
    assert first.text == ""
    assert second.finish_reason == "length" and second.stop_reason is None
    assert len(second.token_ids) == 3


@pytest.fixture(scope="module")
def server(tiny_model_dir, generation_config):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME]
    args += ["--kv-cache-memory", "0.01", "--generation-config", generation_config]
    srv = ServerProcess(args).wait_ready()
    yield srv
    srv.close()


@pytest.mark.parametrize("include", [False, True])
def test_served_a_finished_beam_keeps_its_eos_only_when_asked(server, eos, include):
    body = {
        "model": MODEL_NAME,
        "prompt": PROMPT,
        "max_tokens": 3,
        "n": 2,
        "use_beam_search": True,
        "length_penalty": 0.0,
        "return_token_ids": True,
        "include_stop_str_in_output": include,
    }
    status, response = request(server.url + "/v1/completions", "POST", body)
    assert status == 200, response
    first, second = response["choices"]
    assert first["finish_reason"] == "stop" and first["stop_reason"] == eos
    assert first["token_ids"] == ([eos] if include else [])
    assert first["text"] == ""
    assert second["finish_reason"] == "length" and len(second["token_ids"]) == 3
    assert response["usage"]["completion_tokens"] == 3 + int(include)


def test_stop_strings_are_still_refused_beside_beam_search(server):
    """vLLM's beam search ignores ``stop``; here it stays a 400 rather than silently unmet."""
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "use_beam_search": True}
    body |= {"stop": ["x"], "include_stop_str_in_output": True}
    status, response = request(server.url + "/v1/completions", "POST", body)
    assert status == 400 and response["error"]["param"] == "stop", response
