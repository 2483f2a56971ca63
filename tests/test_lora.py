"""LoRA adapters (vLLM's --enable-lora): a step that mixes requests of several adapters and of
none gives each the answer of the base model with that adapter merged into its weights."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from server_utils import MODEL_NAME, ServerProcess, metrics, request
from tiny_models import write_lora_adapter

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.lora.manager import LoRAAdapterUnloadedError

PROMPTS = ["Hello there, how are", "The capital of France is", "1 2 3 4 5 6 7 8 9 10 11 12 13"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_tokenizer):
    """Two adapters of the tiny llama model, and the model directories with each merged in."""
    root = tmp_path_factory.mktemp("lora")
    made = {}
    for seed, name in ((1, "a1"), (2, "a2")):
        merged = write_lora_adapter(root / name, "llama", seed, rslora=seed == 2)
        merged.save_pretrained(root / f"{name}_merged")
        smollm2_tokenizer.save_pretrained(root / f"{name}_merged")
        made[name] = (str(root / name), str(root / f"{name}_merged"))
    return made


def chosen(out) -> tuple[list[int], list[float]]:
    completion = out.outputs[0]
    pairs = zip(completion.logprobs, completion.token_ids, strict=True)
    logprobs = [entry[token].logprob for entry, token in pairs]
    return completion.token_ids, logprobs


def assert_same(outputs, references) -> None:
    for out, ref in zip(outputs, references, strict=True):
        (ids, logprobs), (ref_ids, ref_logprobs) = chosen(out), chosen(ref)
        assert ids == ref_ids
        assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)


def test_speculative_drafts_with_adapters(tiny_model_dir, adapters):
    """Draft checks in steps with adapter rows (module by module, rows split into decodes):
    each adapter's output as without speculation."""
    base = tiny_model_dir("llama")
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    repeating = ["one two three one two three one two", "a b a b a b a"]
    loras = [LoRARequest(name, i, adapters[name][0]) for i, name in ((1, "a1"), (2, "a2"))]
    per_prompt = [r for r in loras for _ in repeating]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    plain = LLM(base, dtype="float32", enable_lora=True)
    llm = LLM(base, dtype="float32", enable_lora=True, speculative_config=ngram)
    want = plain.generate(repeating * 2, params, use_tqdm=False, lora_request=per_prompt)
    got = llm.generate(repeating * 2, params, use_tqdm=False, lora_request=per_prompt)
    assert_same(got, want)
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0


def test_a_mixed_batch_matches_merged_models(tiny_model_dir, adapters):
    base = tiny_model_dir("llama")
    loras = [None] + [LoRARequest(name, i, adapters[name][0]) for i, name in ((1, "a1"), (2, "a2"))]
    llm = LLM(base, dtype="float32", enable_lora=True)
    outputs = llm.generate(
        PROMPTS * 3, GREEDY, use_tqdm=False, lora_request=[r for r in loras for _ in PROMPTS]
    )
    references = LLM(base, dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
    for name in ("a1", "a2"):
        references += LLM(adapters[name][1], dtype="float32").generate(
            PROMPTS, GREEDY, use_tqdm=False
        )
    assert_same(outputs, references)
    # steps whose every row has one adapter add its terms to the whole batch at once
    alone = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=loras[2])
    assert_same(alone, references[-len(PROMPTS) :])

    # Blocks computed with an adapter hold its K/V: another adapter (or none) never shares them.
    long_prompt = ["A prompt no earlier request began with, long enough to fill blocks. " * 2]
    first = llm.generate(long_prompt, GREEDY, use_tqdm=False, lora_request=loras[1])[0]
    other = llm.generate(long_prompt, GREEDY, use_tqdm=False, lora_request=loras[2])[0]
    again = llm.generate(long_prompt, GREEDY, use_tqdm=False, lora_request=loras[1])[0]
    assert first.num_cached_tokens == other.num_cached_tokens == 0
    assert again.num_cached_tokens >= 16
    assert_same([again], [first])  # equal up to rounding: cached rows change the GEMMs' shapes
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0


def test_adapters_that_cannot_be_served_are_refused(tmp_path, tiny_model_dir, adapters):
    base = tiny_model_dir("llama")
    a1 = LoRARequest("a1", 1, adapters["a1"][0])
    with pytest.raises(ValueError, match="--enable-lora"):
        LLM(base).generate("hi", use_tqdm=False, lora_request=a1)
    llm = LLM(base, dtype="float32", enable_lora=True, max_lora_rank=2)
    with pytest.raises(ValueError, match="rank 4, above max_lora_rank 2"):
        llm.generate("hi", use_tqdm=False, lora_request=a1)
    with pytest.raises(ValueError, match="needs adapter_config.json"):
        llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("x", 3, str(tmp_path)))
    dora = tmp_path / "dora"
    write_lora_adapter(dora, "llama", 3)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora is not supported"):
        llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("d", 4, str(dora)))
    broken = tmp_path / "broken"
    write_lora_adapter(broken, "llama", 5)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot be read"):
        llm.generate("hi", use_tqdm=False, lora_request=LoRARequest("b", 5, str(broken)))
    # Nothing was left queued: the engine still answers.
    assert llm.generate("hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_an_unload_keeps_the_adapter_of_requests_already_running(tiny_model_dir, adapters):
    """Unloading an adapter that requests run with, and loading its name again from another
    path, as the server's endpoints do: those requests finish on the weights they started
    with, which go once they end; a request still naming the unloaded adapter is refused
    rather than loading it again."""
    base = tiny_model_dir("llama")
    llm = LLM(base, dtype="float32", enable_lora=True)
    references = {
        name: LLM(adapters[name][1], dtype="float32").generate(PROMPTS[:1], GREEDY, use_tqdm=False)
        for name in ("a1", "a2")
    }
    # One name from two paths in one batch: the second load leaves the first's requests be.
    swapped = [LoRARequest("x", 1, adapters["a2"][0]), LoRARequest("x", 2, adapters["a1"][0])]
    outputs = llm.generate(PROMPTS[:1] * 2, GREEDY, use_tqdm=False, lora_request=swapped)
    assert_same(outputs, references["a2"] + references["a1"])

    engine = llm.llm_engine
    old = LoRARequest("a", 1, adapters["a2"][0])
    engine.add_request("old", PROMPTS[0], GREEDY, lora_request=old)
    engine.step()
    assert engine.remove_lora("a")
    new = LoRARequest("a", 2, adapters["a1"][0])
    engine.loras.slot(new)
    engine.add_request("new", PROMPTS[0], GREEDY, lora_request=new)
    with pytest.raises(LoRAAdapterUnloadedError, match="'a' was unloaded"):
        engine.add_request("late", PROMPTS[0], GREEDY, lora_request=old)
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert_same([outputs["old"], outputs["new"]], references["a2"] + references["a1"])
    projection = engine.model.model.layers[0].self_attn.qkv_proj
    current = [engine.loras.loaded[name][1] for name in ("x", "a")]
    assert sorted(projection.lora.adapters) == current  # the unloaded or replaced ones went


# ---- the server ----


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters):
    srv = ServerProcess(
        [
            tiny_model_dir("llama"),
            "--served-model-name", MODEL_NAME,
            "--dtype", "float32",
            "--enable-lora",
            "--lora-modules", f"a1={adapters['a1'][0]}",
        ],
        env={"PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING": "1", "PAGEDSERVE_SERVER_DEV_MODE": "1"},
    ).wait_ready()  # fmt: skip
    yield srv
    srv.close()


def served_ids(client, model: str) -> list[list[int]]:
    answer = client.completions.create(
        model=model,
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert answer.model == model
    return [choice.token_ids for choice in sorted(answer.choices, key=lambda c: c.index)]


def test_served_adapters(server, tiny_model_dir, adapters):
    client = server.client()
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL_NAME, "a1"}
    assert models["a1"].parent == MODEL_NAME

    expected = {
        name: [
            o.outputs[0].token_ids
            for o in LLM(path, dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)
        ]
        for name, path in (
            (MODEL_NAME, tiny_model_dir("llama")),
            ("a1", adapters["a1"][1]),
            ("a2", adapters["a2"][1]),
        )
    }
    assert served_ids(client, MODEL_NAME) == expected[MODEL_NAME]
    assert served_ids(client, "a1") == expected["a1"]
    stream = client.chat.completions.create(
        model="a1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    assert {chunk.model for chunk in stream} == {"a1"}

    def post(path, body):
        return request(server.url + path, "POST", body)

    load = {"lora_name": "a2", "lora_path": adapters["a2"][0]}
    status, answer = post("/v1/load_lora_adapter", load)
    assert status == 200, answer
    assert served_ids(client, "a2") == expected["a2"]
    assert post("/v1/load_lora_adapter", load)[0] == 400  # the name is taken
    status, answer = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "/nowhere"})
    assert status == 400 and answer["error"]["param"] == "lora_path"

    assert post("/v1/unload_lora_adapter", {"lora_name": "a2"})[0] == 200
    status, answer = post("/v1/completions", {"model": "a2", "prompt": "hi"})
    assert status == 404 and answer["error"]["param"] == "model"
    assert post("/v1/unload_lora_adapter", {"lora_name": "a2"})[0] == 404
    assert served_ids(client, "a1") == expected["a1"]  # the other adapter is still served


def test_runtime_loads_at_once_and_empty_names(server, adapters):
    """Loads of one name sent at once: one succeeds and the others find the name taken (they
    all loaded it before, and the engine's adapter and the served one could differ); an empty
    name or path is a 400, as in vLLM."""

    def load(body):
        return request(server.url + "/v1/load_lora_adapter", "POST", body)

    bodies = [{"lora_name": "same", "lora_path": adapters[f"a{1 + i % 2}"][0]} for i in range(6)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        statuses = sorted(status for status, _ in pool.map(load, bodies))
    assert statuses == [200] + [400] * 5

    def unload(name):
        return request(server.url + "/v1/unload_lora_adapter", "POST", {"lora_name": name})[0]

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(unload, ["same"] * 4)) == [200, 404, 404, 404]
    for body in (
        {"lora_name": "", "lora_path": adapters["a2"][0]},
        {"lora_name": "x", "lora_path": ""},
    ):
        status, answer = load(body)
        assert status == 400 and "must be provided" in answer["error"]["message"], answer
    status, answer = load({"lora_name": MODEL_NAME, "lora_path": adapters["a2"][0]})
    assert status == 400 and "base model" in answer["error"]["message"], answer
    assert "" not in {m.id for m in server.client().models.list().data}


def test_malformed_adapters_are_400s(server, adapters, tmp_path):
    """Adapters whose tensors or config cannot make a LoRA: a 1-D lora_B, rank 0 tensors, a
    lora_alpha that is not a number."""
    source = Path(adapters["a2"][0])
    tensors = load_file(source / "adapter_model.safetensors")
    config = json.loads((source / "adapter_config.json").read_text())
    a_name = next(name for name in tensors if ".lora_A." in name)
    b_name = a_name.replace(".lora_A.", ".lora_B.")
    cases = {
        "b_1d": ({**tensors, b_name: tensors[b_name][:, 0]}, config),
        "rank_0": (
            {**tensors, a_name: tensors[a_name][:0], b_name: tensors[b_name][:, :0]},
            config,
        ),
        "alpha_text": (tensors, {**config, "lora_alpha": "16"}),
    }
    for name, (weights, adapter_config) in cases.items():
        path = tmp_path / name
        path.mkdir()
        contiguous = {key: value.contiguous() for key, value in weights.items()}
        save_file(contiguous, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps(adapter_config))
        body = {"lora_name": name, "lora_path": str(path)}
        status, answer = request(server.url + "/v1/load_lora_adapter", "POST", body)
        assert status == 400 and answer["error"]["param"] == "lora_path", (name, answer)


def test_a_request_held_past_an_unload_is_a_404(server, adapters):
    """A request that named an adapter, held (by a pause) until after that adapter was
    unloaded and its name loaded again from another path: a 404, never an answer from the
    unloaded adapter loaded again behind the server's back, nor from the base model; the
    request that names the new adapter runs with it."""
    client = server.client()
    want_a1 = served_ids(client, "a1")

    def post(path, body):
        return request(server.url + path, "POST", body)

    def complete():
        body = {"model": "swap", "prompt": PROMPTS, "max_tokens": 12, "temperature": 0}
        return post("/v1/completions", {**body, "return_token_ids": True})

    def load(name):
        body = {"lora_name": "swap", "lora_path": adapters[name][0]}
        return post("/v1/load_lora_adapter", body)[0]

    assert load("a2") == 200
    assert post("/pause?mode=wait", None)[0] == 200
    with ThreadPoolExecutor(2) as pool:
        try:
            held = pool.submit(complete)
            until_waiting(server, 1)
            assert post("/v1/unload_lora_adapter", {"lora_name": "swap"})[0] == 200
            assert load("a1") == 200
            fresh = pool.submit(complete)
            until_waiting(server, 2)
        finally:
            assert post("/resume", None)[0] == 200
        status, answer = held.result()
        assert status == 404, answer
        assert answer["error"]["param"] == "model" and "unloaded" in answer["error"]["message"]
        status, answer = fresh.result()
    assert status == 200, answer
    got = [c["token_ids"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    assert got == want_a1
    models = {m.id: m for m in client.models.list().data}
    assert models["swap"].root == adapters["a1"][0]
    assert post("/v1/unload_lora_adapter", {"lora_name": "swap"})[0] == 200


def until_waiting(server, count: int) -> None:
    """Wait until ``count`` requests wait for the resume (sent from other threads)."""
    deadline = time.monotonic() + 60
    while metrics(server.url)["pagedserve:num_requests_waiting"] < count:
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.05)
