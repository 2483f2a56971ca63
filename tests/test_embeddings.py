"""Embeddings from a pooling engine (``runner="pooling"``): ``LLM.embed`` and ``/v1/embeddings``
against transformers' final hidden states of the same tiny Qwen3 decoder, pooled by hand."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil

import numpy as np
import openai
import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, request
from tiny_models import sentence_transformers_dir, tiny_hf_model

from pagedserve import LLM, PoolingParams
from pagedserve.bench.datasets import random_text_requests
from pagedserve.bench.serve import run_benchmark
from pagedserve.bench.serve_metrics import compute_metrics, format_report

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,  # 60 tokens: chunked at 32 a step
    "Embeddings turn text into vectors.",
    {"prompt_token_ids": [5, 17, 99, 300, 4000]},
]


@pytest.fixture(scope="module")
def decoder():
    """transformers' Qwen3 decoder with the tiny model's weights (``Qwen3Model``, no head)."""
    return tiny_hf_model("qwen3").model


@pytest.fixture(scope="module")
def qwen3_dir(tiny_model_dir):
    return tiny_model_dir("qwen3")


def token_ids(llm: LLM, prompt) -> list[int]:
    if isinstance(prompt, dict):
        return prompt["prompt_token_ids"]
    return llm.get_tokenizer().encode(prompt, add_special_tokens=True)


@torch.no_grad()
def expected(decoder, ids: list[int], mode: str = "LAST", normalize: bool = True) -> torch.Tensor:
    hidden = decoder(torch.tensor([ids])).last_hidden_state[0]
    pooled = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[mode]
    return torch.nn.functional.normalize(pooled, dim=0) if normalize else pooled


def assert_embeddings(llm: LLM, outputs, decoder, mode: str = "LAST", normalize: bool = True):
    assert len(outputs) == len(PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        ids = token_ids(llm, prompt)
        assert out.finished and out.prompt_token_ids == ids
        assert out.outputs.hidden_size == 64
        want = expected(decoder, ids, mode, normalize)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)


def assert_no_blocks_held(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks


def test_last_token_pooling_matches_transformers(qwen3_dir, decoder):
    llm = LLM(qwen3_dir, dtype="float32", runner="pooling", max_num_batched_tokens=32)
    assert llm.llm_engine.runner_type == "pooling"
    outputs = llm.embed(PROMPTS, use_tqdm=False)
    assert_embeddings(llm, outputs, decoder)
    for out in outputs:
        assert np.linalg.norm(out.outputs.embedding) == pytest.approx(1.0, abs=1e-5)
    raw = llm.embed(PROMPTS, PoolingParams(normalize=False), use_tqdm=False)
    assert_embeddings(llm, raw, decoder, normalize=False)

    # The second call found the prompts' full blocks in the prefix cache; the last token is
    # always computed, so the embeddings are the same.
    assert raw[0].num_cached_tokens >= 32
    assert_no_blocks_held(llm)

    truncated = llm.embed(PROMPTS[0], truncate_prompt_tokens=7, use_tqdm=False)[0]
    ids = token_ids(llm, PROMPTS[0])[-7:]
    assert truncated.prompt_token_ids == ids
    torch.testing.assert_close(
        torch.tensor(truncated.outputs.embedding), expected(decoder, ids), atol=2e-5, rtol=0
    )


@pytest.mark.parametrize("mode", ["MEAN", "CLS"])
def test_mean_and_cls_pooling_over_chunked_prompts(tmp_path, qwen3_dir, decoder, mode):
    key = {"MEAN": "mean_tokens", "CLS": "cls_token"}[mode]
    model = sentence_transformers_dir(qwen3_dir, tmp_path / "st", key)
    llm = LLM(
        model, dtype="float32", max_num_batched_tokens=32
    )  # auto: a Pooling module means pooling
    assert llm.llm_engine.runner_type == "pooling"
    assert llm.llm_engine.pooler.pooling_type == mode
    assert_embeddings(llm, llm.embed(PROMPTS, use_tqdm=False), decoder, mode)
    # Every position counts, so nothing may come from the prefix cache.
    again = llm.embed(PROMPTS, use_tqdm=False)
    assert all(out.num_cached_tokens == 0 for out in again)
    assert_embeddings(llm, again, decoder, mode)
    assert_no_blocks_held(llm)


def test_pooler_config_overrides_and_preemption(tmp_path, qwen3_dir, decoder):
    model = sentence_transformers_dir(qwen3_dir, tmp_path / "st", "lasttoken", normalize=True)
    llm = LLM(
        model,
        dtype="float32",
        pooler_config={"pooling_type": "mean", "normalize": False},
        max_num_batched_tokens=32,
    )
    engine = llm.llm_engine
    assert (engine.pooler.pooling_type, engine.pooler.normalize) == ("MEAN", False)
    ids = token_ids(llm, PROMPTS[0])
    engine.add_request("a", ids, PoolingParams())
    assert engine.step() == []  # the first 32 of 60 tokens, summed
    # Preempted (as when the KV cache runs out), it is recomputed from its first token: the
    # sum starts again.
    (req,) = engine.scheduler.running
    engine.scheduler.running.remove(req)
    engine.scheduler._preempt(req)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    (out,) = outputs
    want = expected(decoder, ids, "MEAN", normalize=False)
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)
    assert_no_blocks_held(llm)


def test_dimensions_need_a_matryoshka_model(tmp_path, qwen3_dir, decoder):
    llm = LLM(qwen3_dir, dtype="float32", runner="pooling")
    with pytest.raises(ValueError, match="Matryoshka"):
        llm.embed("hi", PoolingParams(dimensions=16), use_tqdm=False)
    assert_no_blocks_held(llm)

    model = tmp_path / "mrl"
    shutil.copytree(qwen3_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32]}))
    llm = LLM(str(model), dtype="float32", runner="pooling")
    out = llm.embed(PROMPTS[1], PoolingParams(dimensions=16), use_tqdm=False)[0]
    hidden = expected(decoder, token_ids(llm, PROMPTS[1]), normalize=False)
    want = torch.nn.functional.normalize(hidden[:16], dim=0)
    torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="dimensions must be one of 16, 32"):
        llm.embed("hi", PoolingParams(dimensions=8), use_tqdm=False)


def test_a_bare_decoder_checkpoint_embeds(tmp_path, smollm2_tokenizer, decoder):
    """An embedding model saved as ``Qwen3Model`` (no head, no ``model.`` prefix), as e5-mistral
    and others are: ``auto`` runs it as a pooling model."""
    model = tmp_path / "bare"
    decoder.save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["architectures"] == ["Qwen3Model"]
    llm = LLM(str(model), dtype="float32")
    assert llm.llm_engine.runner_type == "pooling"
    assert_embeddings(llm, llm.embed(PROMPTS, use_tqdm=False), decoder)


def test_each_runner_refuses_the_other_task(qwen3_dir):
    pooling = LLM(qwen3_dir, runner="pooling")
    with pytest.raises(ValueError, match="does not generate"):
        pooling.generate("hi", use_tqdm=False)
    assert_no_blocks_held(pooling)
    generating = LLM(qwen3_dir)
    assert generating.llm_engine.runner_type == "generate"
    with pytest.raises(ValueError, match="--runner pooling"):
        generating.embed("hi", use_tqdm=False)
    with pytest.raises(ValueError, match="runner must be one of"):
        LLM(qwen3_dir, runner="embed")


# ---- the server ----


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen3_dir):
    model = sentence_transformers_dir(qwen3_dir, tmp_path_factory.mktemp("st") / "m", "mean_tokens")
    srv = ServerProcess(
        [model, "--served-model-name", MODEL_NAME, "--dtype", "float32"]
    ).wait_ready()
    yield srv
    srv.close()


def post(server, body, path="/v1/embeddings"):
    return request(server.url + path, "POST", body)


def test_openai_client_embeddings(server, decoder, smollm2_tokenizer):
    client = server.client()
    texts = [PROMPTS[0], PROMPTS[1]]
    # The client asks for base64 unless told otherwise, and decodes it.
    result = client.embeddings.create(model=MODEL_NAME, input=texts)
    assert [d.index for d in result.data] == [0, 1]
    ids = [smollm2_tokenizer.encode(t, add_special_tokens=True) for t in texts]
    for data, prompt_ids in zip(result.data, ids, strict=True):
        want = expected(decoder, prompt_ids, "MEAN")
        torch.testing.assert_close(torch.tensor(data.embedding), want, atol=2e-5, rtol=0)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(map(len, ids))
    assert result.model == MODEL_NAME

    floats = client.embeddings.create(model=MODEL_NAME, input=ids[1], encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(result.data[1].embedding, abs=1e-6)

    status, body = post(server, {"input": texts[1], "encoding_format": "base64"})
    assert status == 200 and body["object"] == "list"
    raw = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert raw.tolist() == pytest.approx(result.data[1].embedding, abs=1e-6)


def test_chat_messages_embed_as_the_template_writes_them(server):
    messages = [{"role": "user", "content": "What is an embedding?"}]
    status, tokens = post(
        server, {"messages": messages, "add_generation_prompt": False}, "/tokenize"
    )
    assert status == 200
    status, by_messages = post(server, {"messages": messages})
    assert status == 200
    status, by_ids = post(server, {"input": tokens["tokens"]})
    assert status == 200
    assert by_messages["data"][0]["embedding"] == by_ids["data"][0]["embedding"]
    assert by_messages["usage"]["prompt_tokens"] == tokens["count"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": "hi", "dimensions": 8}, 400, "dimensions"),
        ({"input": []}, 400, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": [[1, 2], [70000]]}, 400, "input"),
        ({"input": "word " * 300}, 400, "input"),
        ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
        ({"input": "hi", "messages": [{"role": "user", "content": "hi"}]}, 400, "messages"),
        ({}, 400, "input"),
        ({"input": "hi", "model": "other"}, 404, "model"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, answer = post(server, body)
    assert got == status, answer
    assert answer["error"]["param"] == param


def test_a_pooling_server_does_not_generate(server):
    for path, body in [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ]:
        status, answer = post(server, body, path)
        assert status == 400
        assert "embedding model" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model=MODEL_NAME, prompt="hi")
    # Nothing was left behind: the server still embeds.
    assert post(server, {"input": "still here"})[0] == 200


def test_an_embedding_server_scores_by_cosine(server):
    texts = ["a first text", "something else", "a first text, nearly"]
    status, embedded = post(server, {"input": texts})
    assert status == 200
    vectors = [torch.tensor(d["embedding"]) for d in embedded["data"]]
    status, scored = post(server, {"text_1": texts[0], "text_2": texts}, "/score")
    assert status == 200, scored
    want = [torch.nn.functional.cosine_similarity(vectors[0], v, dim=0).item() for v in vectors]
    assert [d["score"] for d in scored["data"]] == pytest.approx(want, abs=1e-5)
    status, ranked = post(server, {"query": texts[0], "documents": texts[1:]}, "/v1/rerank")
    assert status == 200
    assert ranked["results"][0]["index"] == max((1, 0), key=lambda i: want[i + 1])
    # -1 keeps as many tokens as the context holds: all of these.
    status, whole = post(
        server, {"text_1": texts[0], "text_2": texts, "truncate_prompt_tokens": -1}, "/score"
    )
    assert status == 200, whole
    assert whole["data"] == scored["data"] and whole["usage"] == scored["usage"]
    for keep in (0, -2, 257):
        body = {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": keep}
        status, error = post(server, body, "/score")
        assert status == 400 and error["error"]["param"] == "truncate_prompt_tokens", error


def test_bench_serve_measures_an_embedding_server(server, smollm2_tokenizer):
    requests = random_text_requests(smollm2_tokenizer, 6, 20, 1, 0, seed=3)
    results, duration, model = asyncio.run(
        run_benchmark(server.url, requests, smollm2_tokenizer, endpoint="embeddings")
    )
    assert model == MODEL_NAME and duration > 0
    assert all(r.success and r.latency > 0 and r.output_tokens == 0 for r in results)
    metrics = compute_metrics(results, duration, [99])
    assert metrics["total_input_tokens"] == sum(r.prompt_len for r in results) > 0
    report = format_report(metrics, [99], float("inf"), None, only_e2el=True)
    assert "E2EL" in report and "TTFT" not in report


def test_sagemaker_invocations_embed(server):
    """/invocations answers an embeddings body (text or vLLM's chat form) as /v1/embeddings."""
    messages = [{"role": "user", "content": "What is an embedding?"}]
    for body in ({"input": PROMPTS[0]}, {"messages": messages}):
        status, direct = post(server, body)
        status_invoked, invoked = post(server, body, "/invocations")
        assert status == status_invoked == 200, invoked
        assert invoked["object"] == "list"
        assert invoked["data"][0]["embedding"] == direct["data"][0]["embedding"]


def test_pooling_endpoint_answers_the_embeddings(server):
    """vLLM's /pooling: the same inputs as /v1/embeddings, each answered as a "pooling" object
    whose data is the embedding; a task the model does not serve is a 400."""
    body = {"input": [PROMPTS[0], PROMPTS[1]]}
    status, embedded = post(server, body)
    assert status == 200
    for extra in ({}, {"task": "embed"}):
        status, pooled = post(server, {**body, **extra}, "/pooling")
        assert status == 200, pooled
        assert pooled["object"] == "list" and pooled["id"].startswith("pool")
        assert [d["object"] for d in pooled["data"]] == ["pooling", "pooling"]
        assert [d["data"] for d in pooled["data"]] == [d["embedding"] for d in embedded["data"]]
        assert pooled["usage"] == embedded["usage"]
    for extra, param in (({"task": "classify"}, "task"), ({"task": "token_embed"}, "task")):
        status, error = post(server, {**body, **extra}, "/pooling")
        assert status == 400 and error["error"]["param"] == param, error


def test_base64_in_vllms_embed_dtype_and_endianness(server):
    """vLLM's ``embed_dtype`` and ``endianness`` set how base64 embeddings are written."""
    status, floats = post(server, {"input": PROMPTS[0]})
    assert status == 200
    want = torch.tensor(floats["data"][0]["embedding"])
    for dtype, endianness in [
        ("float32", "native"),
        ("float16", "big"),
        ("bfloat16", "little"),
        ("fp8_e4m3", "big"),
        ("fp8_e5m2", "native"),
    ]:
        body = {"input": PROMPTS[0], "encoding_format": "base64", "embed_dtype": dtype}
        status, encoded = post(server, {**body, "endianness": endianness})
        assert status == 200, encoded
        raw = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype=np.uint8)
        torch_dtype = getattr(torch, dtype.replace("fp8_", "float8_").replace("e4m3", "e4m3fn"))
        width = torch_dtype.itemsize
        if endianness == "big" and width > 1:
            raw = raw.reshape(-1, width)[:, ::-1].reshape(-1).copy()
        got = torch.from_numpy(raw.copy()).view(torch_dtype).float()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.to(torch_dtype).float(), atol=0, rtol=0)
    for field, value in (("embed_dtype", "int8"), ("endianness", "middle")):
        status, error = post(server, {"input": "hi", "encoding_format": "base64", field: value})
        assert status == 400 and error["error"]["param"] == field, error


def test_truncation_side_right_keeps_the_first_tokens(server):
    ids = list(range(100, 140))
    body = {"input": ids, "truncate_prompt_tokens": 3, "truncation_side": "right"}
    status, cut = post(server, body)
    status_first, first = post(server, {"input": ids[:3]})
    assert status == status_first == 200
    assert cut["data"][0]["embedding"] == first["data"][0]["embedding"]


@pytest.mark.parametrize("salt", ["", "s" * 129, "user@example", "a/b", "a\\b", "a\x00b"], ids=repr)
def test_cache_salt_outside_the_rule_is_refused(server, salt):
    """vLLM holds a pooling request's ``cache_salt`` to chat's rule: a 400 naming it."""
    for path, body in [
        ("/v1/embeddings", {"input": "hi"}),
        ("/pooling", {"input": "hi"}),
        ("/score", {"text_1": "a", "text_2": "b"}),
        ("/rerank", {"query": "a", "documents": ["b"]}),
    ]:
        status, answer = post(server, {**body, "cache_salt": salt}, path)
        assert status == 400 and answer["error"]["param"] == "cache_salt", (path, answer)


def test_cache_salt_within_the_rule_embeds_as_without(server):
    """A salt only keeps prefix blocks apart: the embedding is the one without it."""
    salt = "k-ÿ:é" + "s" * 123
    status, plain = post(server, {"input": "a salted text"})
    assert status == 200
    status, salted = post(server, {"input": "a salted text", "cache_salt": salt})
    assert status == 200, salted
    assert salted["data"][0]["embedding"] == pytest.approx(plain["data"][0]["embedding"], abs=1e-6)
    body = {"text_1": "a", "text_2": "b", "cache_salt": salt}
    assert post(server, body, "/score")[0] == 200
