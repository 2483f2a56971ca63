"""Encoders (BertModel, XLMRobertaModel, ModernBertModel) as embedding models, against
transformers' own encoders with the same random weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_encoders import tiny_encoder
from tiny_models import sentence_transformers_dir

from pagedserve import LLM
from pagedserve.model.registry import MODEL_REGISTRY

TEXTS = ["a long input, longer than one step's budget of 32 tokens " * 4, "short", "x y z"]


@pytest.fixture(scope="module", params=["bert", "xlm_roberta", "modernbert"])
def encoder(request, tmp_path_factory, smollm2_tokenizer):
    model = tiny_encoder(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return model, str(path)


@torch.no_grad()
def expected(model, ids: list[int], mode: str, normalize: bool = True) -> torch.Tensor:
    hidden = model(torch.tensor([ids])).last_hidden_state[0]
    pooled = hidden.mean(0) if mode == "MEAN" else hidden[0]
    return torch.nn.functional.normalize(pooled, dim=0) if normalize else pooled


def check(llm: LLM, model, texts, outputs, mode: str, normalize: bool = True) -> None:
    tokenizer = llm.get_tokenizer()
    for text, out in zip(texts, outputs, strict=True):
        ids = text if isinstance(text, list) else tokenizer.encode(text, add_special_tokens=True)
        want = expected(model, ids, mode, normalize)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)


def test_encoders_match_transformers(encoder):
    model, path = encoder
    # Inputs longer than the step budget still run whole: every token attends to all of them.
    llm = LLM(path, dtype="float32", max_num_batched_tokens=32, max_num_seqs=2)
    engine = llm.llm_engine
    assert engine.runner_type == "pooling"
    assert engine.pooler.pooling_type == "CLS"  # BERT's default without sentence-transformers
    assert engine.max_model_len == 128
    many = TEXTS * 4  # more inputs than max_num_seqs: they queue
    check(llm, model, many, llm.embed(many, use_tqdm=False), "CLS")
    again = llm.embed(TEXTS, use_tqdm=False)
    assert all(out.num_cached_tokens == 0 for out in again)  # no prefix caching
    stats = engine.get_stats()
    assert stats.prefix_cache_hits == 0
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0

    mean = LLM(path, dtype="float32", pooler_config={"pooling_type": "MEAN", "normalize": False})
    check(mean, model, TEXTS, mean.embed(TEXTS, use_tqdm=False), "MEAN", normalize=False)


def test_sentence_transformers_encoder(encoder, tmp_path):
    model, path = encoder
    st = sentence_transformers_dir(path, tmp_path / "st", "mean_tokens")
    (tmp_path / "st" / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 16, "do_lower_case": False})
    )
    llm = LLM(st, dtype="float32")
    assert llm.llm_engine.pooler.pooling_type == "MEAN"
    assert llm.llm_engine.max_model_len == 16  # sentence-transformers' max_seq_length
    with pytest.raises(ValueError, match="maximum context length is 16"):
        llm.embed(TEXTS[0], use_tqdm=False)
    out = llm.embed(TEXTS[0], truncate_prompt_tokens=16, use_tqdm=False)
    ids = llm.get_tokenizer().encode(TEXTS[0], add_special_tokens=True)[-16:]
    check(llm, model, [ids], out, "MEAN")


def test_an_encoder_does_not_generate(encoder, tmp_path):
    _, path = encoder
    with pytest.raises(ValueError, match="is an encoder"):
        LLM(path, runner="generate")


def test_missing_or_unknown_weights_are_errors(tmp_path, smollm2_tokenizer):
    model = tiny_encoder("bert")
    state = {k: v for k, v in model.state_dict().items() if ".self.key." not in k}
    path = tmp_path / "partial"
    model.save_pretrained(path, state_dict=state)
    with pytest.raises(ValueError, match=r"lacks 4 weights: .*qkv\.bias\[1\]"):
        LLM(str(path))
    shutil.rmtree(path)
    extra = {**model.state_dict(), "encoder.layer.0.extra.weight": torch.zeros(2)}
    model.save_pretrained(path, state_dict=extra)
    with pytest.raises(ValueError, match="matches no model parameter"):
        LLM(str(path))
    assert {"BertModel", "RobertaModel", "XLMRobertaModel"} <= set(MODEL_REGISTRY)


def test_last_token_pooling_of_an_encoder(encoder):
    model, path = encoder
    llm = LLM(path, dtype="float32", pooler_config={"pooling_type": "LAST"})
    tokenizer = llm.get_tokenizer()
    for text, out in zip(TEXTS, llm.embed(TEXTS, use_tqdm=False), strict=True):
        ids = tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(hidden, dim=0)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)
