"""What the decode-stack tests run through ``LLM`` both ways (``enforce_eager``: module by
module; otherwise through the C decode stack) to compare the two runs' tokens and logprobs."""

from __future__ import annotations

from pagedserve import LLM, SamplingParams
from pagedserve.worker.cpu_decode import CpuDecodeStack

# Prompts of 2 to 29 tokens with budgets that end them at different steps: batches that shrink,
# sequences of different lengths across block boundaries (block_size 16).
PROMPTS = [[3 + (7 * i + j) % 900 for j in range(2 + 3 * i % 28)] for i in range(12)]
MAX_TOKENS = [4 + 5 * i % 17 for i in range(12)]


def stack_llm(model: str, enforce_eager: bool, **engine_args) -> LLM:
    """A small float32 (unless ``dtype`` says) CPU engine for ``model``."""
    engine_args.setdefault("dtype", "float32")
    return LLM(
        model,
        device="cpu",
        kv_cache_memory=0.02,
        max_num_seqs=16,
        enforce_eager=enforce_eager,
        **engine_args,
    )


def greedy_runs(llm: LLM) -> list:
    """Each prompt's greedy tokens and their top-3 logprobs."""
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in MAX_TOKENS
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [
        (c.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
        for c in (o.outputs[0] for o in outputs)
    ]


def assert_generations_equal(model: str, monkeypatch, **engine_args) -> None:
    """Greedy generations with their top logprobs are the same through the stack (which must run
    for them) as with ``enforce_eager`` (where it must not)."""
    runs = []
    run = CpuDecodeStack.run

    def counting(self, *args):
        runs.append(1)
        return run(self, *args)

    monkeypatch.setattr(CpuDecodeStack, "run", counting)
    want = greedy_runs(stack_llm(model, True, **engine_args))
    assert not runs
    got = greedy_runs(stack_llm(model, False, **engine_args))
    assert len(runs) > 10
    assert got == want
