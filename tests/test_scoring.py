"""Scores of text pairs (vLLM's LLM.score, /score and /rerank): cross-encoders against
transformers' sequence classifiers, embedding models as cosine similarities."""

from __future__ import annotations

import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, request
from tiny_encoders import bert_tokenizer, tiny_cross_encoder
from tiny_models import tiny_config, tiny_hf_model
from transformers import LlamaForSequenceClassification, Qwen2ForSequenceClassification

from pagedserve import LLM
from pagedserve.entrypoints.scoring import pair_token_ids

QUERY = "where is the cat"
DOCUMENTS = ["the cat sat on the mat", "a dog", "what is this fish", "the mat"]
TRUNCATE = "truncate_prompt_tokens"


@pytest.fixture(scope="module", params=["bert", "xlm_roberta", "modernbert"])
def cross_encoder(request, tmp_path_factory):
    model = tiny_cross_encoder(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    return model, str(path)


@torch.no_grad()
def expected(model, first: str, second: str) -> float:
    encoded = bert_tokenizer()(first, second, return_tensors="pt")
    if getattr(model.config, "type_vocab_size", 1) == 1:
        encoded.pop("token_type_ids")
    return torch.sigmoid(model(**encoded).logits[0, 0]).item()


def test_cross_encoders_match_transformers(cross_encoder):
    model, path = cross_encoder
    llm = LLM(path, dtype="float32")
    assert llm.llm_engine.is_classifier and llm.llm_engine.runner_type == "pooling"
    # One query against many documents, then two lists pairwise.
    for first, second in ((QUERY, DOCUMENTS), (DOCUMENTS, DOCUMENTS[::-1])):
        outputs = llm.score(first, second, use_tqdm=False)
        firsts = [first] * len(second) if isinstance(first, str) else first
        want = [expected(model, a, b) for a, b in zip(firsts, second, strict=True)]
        assert [o.outputs.score for o in outputs] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="give one text_1, or as many as text_2"):
        llm.score(DOCUMENTS[:2], DOCUMENTS, use_tqdm=False)
    with pytest.raises(ValueError, match="it does not embed"):
        llm.embed("a cat", use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


def test_an_embedding_model_scores_by_cosine(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3"), dtype="float32", runner="pooling")
    texts = ["a first text", "something else entirely", "a first text, nearly"]
    vectors = [torch.tensor(o.outputs.embedding) for o in llm.embed(texts, use_tqdm=False)]
    scores = [o.outputs.score for o in llm.score(texts[0], texts, use_tqdm=False)]
    want = [torch.nn.functional.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors]
    assert scores == pytest.approx(want, abs=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["bert", "xlm_roberta", "modernbert"])
def test_classify_gives_class_probabilities(tmp_path, kind):
    model = tiny_cross_encoder(kind, num_labels=3)
    model.save_pretrained(tmp_path)
    bert_tokenizer().save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32")
    outputs = llm.classify(DOCUMENTS, use_tqdm=False)
    for text, out in zip(DOCUMENTS, outputs, strict=True):
        encoded = bert_tokenizer()(text, return_tensors="pt")
        if kind != "bert":
            encoded.pop("token_type_ids")
        with torch.no_grad():
            want = torch.softmax(model(**encoded).logits[0], dim=-1).tolist()
        assert out.outputs.num_classes == 3
        assert out.outputs.probs == pytest.approx(want, abs=1e-5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("served_cross_encoder")
    tiny_cross_encoder("bert").save_pretrained(path)
    bert_tokenizer().save_pretrained(path)
    srv = ServerProcess(
        [str(path), "--served-model-name", MODEL_NAME, "--dtype", "float32"]
    ).wait_ready()
    yield srv
    srv.close()


def post(server, path, body):
    return request(server.url + path, "POST", body)


def test_score_and_rerank_endpoints(server):
    model = tiny_cross_encoder("bert")
    want = [expected(model, QUERY, doc) for doc in DOCUMENTS]
    for path in ("/score", "/v1/score"):
        status, body = post(
            server, path, {"model": MODEL_NAME, "text_1": QUERY, "text_2": DOCUMENTS}
        )
        assert status == 200, body
        assert [d["index"] for d in body["data"]] == list(range(len(DOCUMENTS)))
        assert [d["score"] for d in body["data"]] == pytest.approx(want, abs=1e-5)
        assert body["usage"]["prompt_tokens"] > 0
    best_first = sorted(range(len(DOCUMENTS)), key=lambda i: want[i], reverse=True)
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        status, body = post(server, path, {"query": QUERY, "documents": DOCUMENTS, "top_n": 2})
        assert status == 200, body
        assert [r["index"] for r in body["results"]] == best_first[:2]
        top = body["results"][0]
        assert top["document"]["text"] == DOCUMENTS[best_first[0]]
        assert top["relevance_score"] == pytest.approx(want[best_first[0]], abs=1e-5)
    status, body = post(server, "/rerank", {"query": QUERY, "documents": DOCUMENTS})
    assert len(body["results"]) == len(DOCUMENTS)

    status, body = post(server, "/classify", {"input": DOCUMENTS[:2]})
    assert status == 200, body
    for item, text in zip(body["data"], DOCUMENTS[:2], strict=True):
        encoded = bert_tokenizer()(text, return_tensors="pt")
        with torch.no_grad():
            prob = torch.sigmoid(model(**encoded).logits[0, 0]).item()
        assert item["probs"] == pytest.approx([prob], abs=1e-5)
        assert item["label"] == "LABEL_0" and item["num_classes"] == 1


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2"),
        ("/score", {"text_1": "a", "text_2": "the " * 200}, 400, "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": "b", "model": "other"}, 404, "model"),
        ("/rerank", {"query": "a", "documents": []}, 400, "documents"),
        ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, 400, "top_n"),
        ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": -2}, 400, TRUNCATE),
        ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0}, 400, TRUNCATE),
        (
            "/rerank",
            {"query": "a", "documents": ["b"], "truncate_prompt_tokens": 129},
            400,
            TRUNCATE,
        ),
        ("/classify", {"input": []}, 400, "input"),
        ("/classify", {"input": ["a"], "cache_salt": "a/b"}, 400, "cache_salt"),
        ("/rerank", {"query": "a", "documents": ["b"], "cache_salt": "s" * 129}, 400, "cache_salt"),
        ("/v1/embeddings", {"input": "a cat"}, 400, "model"),
        ("/v1/completions", {"prompt": "a cat"}, 400, None),
    ],
)
def test_bad_score_requests(server, path, body, status, param):
    got, answer = post(server, path, body)
    assert got == status, answer
    assert answer["error"]["param"] == param
    # A long pair is fine when truncated to the context.
    truncated = {"text_1": "a", "text_2": "the " * 200, "truncate_prompt_tokens": 64}
    assert post(server, "/score", truncated)[0] == 200


def test_score_truncation_to_the_context(server):
    """``truncate_prompt_tokens: -1`` cuts each pair to the context length (128 here)."""
    body = {"text_1": "a", "text_2": "the " * 200, "truncate_prompt_tokens": -1}
    status, scored = post(server, "/score", body)
    assert status == 200, scored
    assert scored["usage"]["prompt_tokens"] == 128
    status, ranked = post(server, "/rerank", {"query": "a", "documents": ["the " * 200], **body})
    assert status == 200 and ranked["usage"]["total_tokens"] == 128, ranked


def test_only_classifiers_classify(tiny_model_dir):
    with pytest.raises(ValueError, match="no classification head"):
        LLM(tiny_model_dir("qwen3"), runner="pooling").classify("a", use_tqdm=False)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_decoder_classifiers(tmp_path, smollm2_tokenizer, kind, num_labels):
    """``Qwen2ForSequenceClassification`` and the like (classifiers, reward models): the score
    head on the last token's state."""
    config = tiny_config(kind)
    config.num_labels, config.pad_token_id = num_labels, 2
    model_class = {
        "qwen2": Qwen2ForSequenceClassification,
        "llama": LlamaForSequenceClassification,
    }[kind]
    torch.manual_seed(0)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = 0.1 * torch.randn_like(param)
            param.copy_(1 + noise if "norm" in name else noise)
    model.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32")
    assert llm.llm_engine.pooler.pooling_type == "LAST"
    texts = ["I love this movie", "This is terrible, awful and long " * 3]
    for text, out in zip(texts, llm.classify(texts, use_tqdm=False), strict=True):
        ids = smollm2_tokenizer.encode(text, add_special_tokens=True)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        want = torch.sigmoid(logits) if num_labels == 1 else torch.softmax(logits, dim=-1)
        assert out.outputs.probs == pytest.approx(want.tolist(), abs=1e-5)


RERANKER = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}


def test_a_causal_lm_scores_from_its_yes_and_no_logits(tiny_model_dir):
    """vLLM's hf_overrides for Qwen3-Reranker: the score of a pair is P(yes) among the causal
    LM's next-token logits of "no" and "yes" after it; without the two-way flag each token is a
    label of its own."""
    path = tiny_model_dir("qwen3")
    hf = tiny_hf_model("qwen3")
    llm = LLM(path, dtype="float32", hf_overrides=RERANKER)
    assert llm.llm_engine.is_classifier
    tokenizer = llm.get_tokenizer()
    no, yes = tokenizer.convert_tokens_to_ids(["no", "yes"])

    @torch.no_grad()
    def next_token_logits(ids: list[int]) -> torch.Tensor:
        return hf(torch.tensor([ids])).logits[0, -1, [no, yes]]

    outputs = llm.score(QUERY, DOCUMENTS, use_tqdm=False)
    for document, out in zip(DOCUMENTS, outputs, strict=True):
        logits = next_token_logits(pair_token_ids(tokenizer, QUERY, document, None))
        assert out.outputs.score == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-5)
    labels = LLM(
        path, dtype="float32", hf_overrides={**RERANKER, "is_original_qwen3_reranker": False}
    )
    out = labels.classify(QUERY, use_tqdm=False)[0]
    want = torch.softmax(next_token_logits(tokenizer.encode(QUERY)), -1)
    assert out.outputs.probs == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="not a token of the vocabulary"):
        LLM(path, hf_overrides={**RERANKER, "classifier_from_token": ["no", "yes-and-no-token"]})


def test_sagemaker_invocations_on_a_classifier(server):
    """/invocations answers a classify, rerank or score body as its own endpoint does."""
    for path, body in (
        ("/classify", {"input": DOCUMENTS[:2]}),
        ("/rerank", {"query": QUERY, "documents": DOCUMENTS}),
        ("/score", {"text_1": QUERY, "text_2": DOCUMENTS}),
    ):
        status, direct = post(server, path, body)
        assert status == 200, direct
        status, invoked = post(server, "/invocations", body)
        assert status == 200, invoked
        for key in ("data", "results"):
            assert invoked.get(key) == direct.get(key)
    status, body = post(server, "/invocations", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "ClassifyRequest" in body["error"]["message"]


def test_pooling_endpoint_answers_the_probabilities(server):
    """On a classifier, vLLM's /pooling answers each input's class probabilities."""
    status, classified = post(server, "/classify", {"input": DOCUMENTS[:2]})
    assert status == 200
    status, pooled = post(server, "/pooling", {"input": DOCUMENTS[:2]})
    assert status == 200, pooled
    assert [d["data"] for d in pooled["data"]] == [d["probs"] for d in classified["data"]]
    status, error = post(server, "/pooling", {"input": DOCUMENTS[:2], "task": "embed"})
    assert status == 400 and error["error"]["param"] == "task"
