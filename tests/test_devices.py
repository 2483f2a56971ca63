"""Which device the engine runs on, and the engine end to end on every device this machine has
(the CPU, and the GPU where there is one) against transformers on the same weights."""

from __future__ import annotations

import contextlib

import pytest
import torch
from tiny_models import DEVICES, tiny_hf_model

from pagedserve import LLM, SamplingParams
from pagedserve.engine.devices import resolve_device, resolve_dtype


def test_auto_takes_the_gpu_when_pytorch_sees_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "mps", "", "cuda:x"])
def test_unknown_devices_are_refused(name):
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        resolve_device(name)


def test_cuda_without_a_gpu_is_refused_clearly(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a GPU and a CUDA build of PyTorch"):
        LLM(tiny_model_dir("llama"), device="cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="this machine has 1 GPU"):
        resolve_device("cuda:1")


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_dtype_is_float32_on_cpu_and_16_bit_on_a_gpu(monkeypatch, bf16):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: bf16)
    expected = torch.bfloat16 if bf16 else torch.float16
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("float32", torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_tokens_and_logprobs_match_transformers(device, tiny_model_dir):
    """Three prompts in one batch, in float32: every greedy token is transformers' argmax, and
    its logprob is transformers' within float tolerance."""
    llm = LLM(tiny_model_dir("llama"), device=device, dtype="float32", kv_cache_memory=0.01)
    assert llm.llm_engine.device.type == device
    prompts = [[5, 17, 900, 3], [1200, 7, 7, 7, 7, 8, 9, 40000, 11, 12, 13, 14, 15, 16, 17], [2]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    hf = tiny_hf_model("llama").to(device)
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        ids = torch.tensor([prompt + completion.token_ids], device=device)
        with torch.inference_mode():
            logprobs = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        assert completion.token_ids == logprobs.argmax(-1).tolist()
        ours = torch.tensor(
            [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)]
        )
        expected = logprobs.gather(1, torch.tensor(completion.token_ids, device=device)[:, None])
        torch.testing.assert_close(ours, expected[:, 0].cpu(), atol=1e-4, rtol=0)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
