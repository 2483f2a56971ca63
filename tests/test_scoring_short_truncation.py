"""A cross-encoder's ``truncate_prompt_tokens`` below the pair's special tokens (``[CLS] a
[SEP] b [SEP]``: 3): transformers then cuts nothing, and vLLM 0.32 cuts the pair's encoding to
that many tokens from the tokenizer's truncation side (BERT's: the right, so the first tokens
stay); the score is the classifier's on what is left, offline and served alike."""

from __future__ import annotations

import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, request
from tiny_encoders import bert_tokenizer, tiny_cross_encoder

from pagedserve import LLM
from pagedserve.entrypoints.scoring import pair_token_ids

QUERY = "where is the cat"
DOCUMENT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("short_truncation_cross_encoder")
    tiny_cross_encoder("bert").save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    return str(path)


@torch.no_grad()
def expected(ids: list[int]) -> float:
    """transformers' classifier on ``ids``, its token types as vLLM keeps them: the first
    ``len(ids)`` of the whole pair's."""
    whole = bert_tokenizer()(QUERY, DOCUMENT)
    types = whole["token_type_ids"][: len(ids)]
    model = tiny_cross_encoder("bert")
    logits = model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
    return torch.sigmoid(logits[0, 0]).item()


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_the_pair_is_cut_to_truncate_prompt_tokens(keep):
    tokenizer = bert_tokenizer()
    whole = tokenizer(QUERY, DOCUMENT)["input_ids"]
    ids = pair_token_ids(tokenizer, QUERY, DOCUMENT, keep)
    assert len(ids) == keep
    if keep < 3:  # below the special tokens: the first tokens of the whole encoding
        assert ids == whole[:keep]
    else:  # transformers' own longest-first cut, special tokens kept
        assert ids == tokenizer(QUERY, DOCUMENT, truncation=True, max_length=keep)["input_ids"]


@pytest.mark.parametrize("keep", [0, -1])
def test_nothing_left_is_refused(keep):
    with pytest.raises(ValueError, match="truncate_prompt_tokens must be >= 1"):
        pair_token_ids(bert_tokenizer(), QUERY, DOCUMENT, keep)


def test_a_left_truncating_tokenizer_keeps_the_last_tokens():
    tokenizer = bert_tokenizer()
    tokenizer.truncation_side = "left"
    whole = tokenizer(QUERY, DOCUMENT)["input_ids"]
    assert pair_token_ids(tokenizer, QUERY, DOCUMENT, 2) == whole[-2:]


def test_offline_scores_what_is_left(model_dir):
    llm = LLM(model_dir, dtype="float32")
    for keep in (1, 2):
        (out,) = llm.score(QUERY, [DOCUMENT], truncate_prompt_tokens=keep, use_tqdm=False)
        assert len(out.prompt_token_ids) == keep
        first = bert_tokenizer()(QUERY, DOCUMENT)["input_ids"][:keep]
        assert out.outputs.score == pytest.approx(expected(first), abs=1e-5)


@pytest.fixture(scope="module")
def server(model_dir):
    args = [model_dir, "--served-model-name", MODEL_NAME, "--dtype", "float32"]
    srv = ServerProcess(args).wait_ready()
    yield srv
    srv.close()


def test_served_score_and_rerank_cut_the_pair(server):
    first = bert_tokenizer()(QUERY, DOCUMENT)["input_ids"][:2]
    body = {"text_1": QUERY, "text_2": [DOCUMENT], "truncate_prompt_tokens": 2}
    status, scored = request(server.url + "/score", "POST", body)
    assert status == 200, scored
    assert scored["usage"]["prompt_tokens"] == 2
    assert scored["data"][0]["score"] == pytest.approx(expected(first), abs=1e-5)
    body = {"query": QUERY, "documents": [DOCUMENT], "truncate_prompt_tokens": 1}
    status, ranked = request(server.url + "/rerank", "POST", body)
    assert status == 200, ranked
    assert ranked["usage"]["total_tokens"] == 1
