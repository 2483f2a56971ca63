"""Decode steps through the padded static buffers of :class:`DecodeGraphs` (replayed CUDA graphs
on a GPU, the same padded pass run eagerly on the CPU) give what the plain step gives."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICES

from pagedserve import LLM, SamplingParams
from pagedserve.worker.decode_graphs import BATCH_BUCKETS, DecodeGraphs

# Prompts across block boundaries (16 tokens a block), with budgets that end them at different
# steps, so the batch shrinks under the graphs and padded rows reuse rows that real requests held.
PROMPTS = [[3 + i for i in range(n)] for n in (5, 17, 40, 2, 31, 64)]
MAX_TOKENS = [30, 9, 26, 14, 21, 40]


def _engine(model_dir: str, device: str, enforce_eager: bool) -> LLM:
    return LLM(
        model_dir,
        device=device,
        dtype="float32",
        kv_cache_memory=0.01,
        max_num_seqs=8,
        enforce_eager=enforce_eager,
    )


def _with_graphs(llm: LLM) -> DecodeGraphs:
    """The engine's graphs; on the CPU, where the engine runs none, the padded eager pass."""
    runner = llm.llm_engine.runner
    if runner.graphs is None:
        assert llm.llm_engine.device.type == "cpu"
        runner.graphs = DecodeGraphs(
            runner.model,
            runner.block_size,
            runner.kv_cache.scratch_block,
            max_num_seqs=8,
            max_blocks=-(-llm.llm_engine.max_model_len // runner.block_size),
            device=llm.llm_engine.device,
        )
    return runner.graphs


def _generate(llm: LLM) -> list:
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0) for n in MAX_TOKENS
    ]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    return llm.generate(prompts, params, use_tqdm=False)


def _logprobs(output) -> list[float]:
    """The logprob of each generated token."""
    completion = output.outputs[0]
    return [lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids, strict=True)]


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("device", DEVICES)
def test_padded_decode_steps_match_eager_steps(device, kind, tiny_model_dir, monkeypatch):
    """Every decode step's logits through the graphs equal the plain forward's on the same KV
    cache, and whole generations equal an engine without graphs: padded rows write only the
    scratch block."""
    model_dir = tiny_model_dir(kind)
    llm = _engine(model_dir, device, enforce_eager=False)
    graphs = _with_graphs(llm)
    runner = llm.llm_engine.runner
    graph_logits = runner._graph_logits
    checked = []

    def checking(input_ids, positions, meta, sample_rows):
        got = graph_logits(input_ids, positions, meta, sample_rows)
        if got is None:  # a step with a prefill chunk: the plain pass runs it
            assert meta.max_query_len > 1
            return None
        hidden = runner.model(input_ids, positions, meta)
        want = runner.model.compute_logits(hidden.index_select(0, runner._to_device(sample_rows)))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        checked.append(len(sample_rows))
        return got

    monkeypatch.setattr(runner, "_graph_logits", checking)
    outputs = _generate(llm)

    assert sorted(set(checked)) == [1, 2, 3, 4, 5, 6]
    # Batches of 3, 5, 6 rows and contexts of 3 blocks ran padded to 4, 8, 8 rows and 4 blocks.
    # Batches of 6 to 1 rows ran as 8, 4, 2 and 1; block tables 5 to 7 wide as 8.
    assert set(graphs.steps) == {(8, 8), (4, 8), (2, 8), (1, 8)}
    assert all(rows in BATCH_BUCKETS or rows == 8 for rows, _ in graphs.steps)
    eager = _generate(_engine(model_dir, device, enforce_eager=True))
    for out, ref in zip(outputs, eager, strict=True):
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        assert _logprobs(out) == pytest.approx(_logprobs(ref), abs=1e-4)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == llm.llm_engine.num_blocks


def test_the_engine_runs_graphs_only_on_a_gpu_and_not_when_eager(tiny_model_dir):
    llm = _engine(tiny_model_dir("llama"), "cpu", enforce_eager=False)
    assert llm.llm_engine.runner.graphs is None
    if torch.cuda.is_available():
        assert _engine(tiny_model_dir("llama"), "cuda", False).llm_engine.runner.graphs
        assert _engine(tiny_model_dir("llama"), "cuda", True).llm_engine.runner.graphs is None


def test_the_scratch_block_is_outside_the_schedulers_pool(tiny_model_dir):
    engine = _engine(tiny_model_dir("llama"), "cpu", enforce_eager=False).llm_engine
    kv_cache = engine.runner.kv_cache
    assert kv_cache.scratch_block == engine.num_blocks
    assert kv_cache.k[0].shape[0] == engine.num_blocks + 1
