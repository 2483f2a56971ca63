"""End to end on the packaged SmolLM2: greedy generation equals transformers', token for token."""

import pytest
import torch

from pagedserve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Here is a recipe for pancakes:",
    "In 1969, the first humans",
    "def is_prime(n):",
]
CHATS = [
    [{"role": "user", "content": "What is the largest planet in the solar system?"}],
    [{"role": "user", "content": "Give me two tips for sleeping better."}],
]
MAX_TOKENS = 32


def _hf_greedy(model, prompt_ids: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=2,
        )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_matches_transformers(smollm2_path, hf_smollm2):
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory=0.25)
    tokenizer = llm.get_tokenizer()
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    prompt_ids += [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
        for c in CHATS
    ]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    ours = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    for ids, out in zip(prompt_ids, ours, strict=True):
        assert out.outputs[0].token_ids == _hf_greedy(hf_smollm2, ids), tokenizer.decode(ids)


def test_chat_is_coherent_english(smollm2_path):
    llm = LLM(smollm2_path, kv_cache_memory=0.25)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=30),
        use_tqdm=False,
    )[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_prompt_logprobs_match_transformers(smollm2_path, hf_smollm2):
    # A small token budget splits the prompt over several steps.
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory=0.25, max_num_batched_tokens=8)
    ids = llm.get_tokenizer().encode("The quick brown fox jumps over the lazy dog near the river.")
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    with torch.inference_mode():
        expected = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0], dim=-1)
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    for pos in range(1, len(ids)):
        entry = out.prompt_logprobs[pos]
        token = ids[pos]
        assert entry[token].logprob == pytest.approx(expected[pos - 1, token].item(), abs=1e-3)
        assert entry[token].rank == int((expected[pos - 1] > expected[pos - 1, token]).sum()) + 1
        assert len([t for t in entry if t != token]) >= 2
    assert llm.llm_engine.get_stats().num_free_blocks == llm.llm_engine.num_blocks
