"""Shared fixtures. Expensive things (the packaged model's tokenizer, tiny model directories)
are built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from server_utils import packaged_server
from tiny_dense import write_dense_model
from tiny_models import write_tiny_model
from transformers import AutoModelForCausalLM

from pagedserve import SamplingParams
from pagedserve.engine.devices import resolve_device, resolve_dtype
from pagedserve.model_path import packaged_model_path
from pagedserve.outputs import RequestOutput
from pagedserve.tokenizer import load_tokenizer
from pagedserve.worker.kv_cache import kv_bytes_per_token


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The packaged SmolLM2-135M-Instruct GGUF file."""
    return str(packaged_model_path())


@pytest.fixture(scope="session")
def smollm2_cache_gib():
    """``smollm2_cache_gib(n)`` -> the ``kv_cache_memory`` (GiB) that gives the packaged model
    exactly ``n`` blocks of 16 tokens in the dtype its engine picks on this machine."""
    dtype = resolve_dtype("auto", resolve_device("auto"))
    per_token = kv_bytes_per_token(num_layers=30, num_kv_heads=3, head_dim=64, dtype=dtype)
    return lambda num_blocks: num_blocks * 16 * per_token / (1 << 30)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own float32 model of the packaged GGUF: the reference for our numbers."""
    path = Path(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def prompt_logprob_errors(hf_smollm2):
    """``prompt_logprob_errors(llm)`` -> (at each position of a 79-token prompt, how far the
    prompt logprob of ``llm``, an engine on the packaged model, is from transformers' float32
    model; the request's output, 4 tokens generated after it)."""
    text = "The quick brown fox jumps over the lazy dog near the river. " * 6

    def errors(llm) -> tuple[list[float], RequestOutput]:
        ids = llm.get_tokenizer().encode(text)
        params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        with torch.inference_mode():
            expected = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0], dim=-1)
        return [
            abs(out.prompt_logprobs[pos][ids[pos]].logprob - expected[pos - 1, ids[pos]].item())
            for pos in range(1, len(ids))
        ], out

    return errors


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """``tiny_model_dir(kind)`` -> path of a tiny random HF model directory with SmolLM2's
    tokenizer; kinds: llama, llama_tied, llama_sharded, qwen2, qwen3, mistral, phi3,
    qwen2_window, gemma2, gemma3 (see tests/tiny_models.py)."""
    made: dict[str, str] = {}

    def make(kind: str = "llama") -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            made[kind] = str(write_tiny_model(path, kind, smollm2_tokenizer))
        return made[kind]

    return make


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory, smollm2_tokenizer):
    """``dense_dir(kind)``: tests/tiny_dense.py's model of ``kind`` (gemma, granite, olmo2), with
    SmolLM2's tokenizer."""
    made: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"dense_{kind}")
            made[kind] = str(write_dense_model(path, kind, smollm2_tokenizer))
        return made[kind]

    return make


@pytest.fixture(scope="module")
def server():
    """The packaged SmolLM2 served for one test module (``server_utils.packaged_server``); a
    module that serves something else defines its own ``server``."""
    srv = packaged_server()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    """An ``openai`` client of the module's ``server``."""
    return server.client()
