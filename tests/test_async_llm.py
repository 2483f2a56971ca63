"""``AsyncLLM``: concurrent generations batched on the engine thread, each an async iterator of
cumulative outputs that match ``LLM``'s; leaving one early or aborting it frees its blocks."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from pagedserve import LLM, AsyncLLM, PoolingParams, SamplingParams

PROMPTS = ["Once upon a time", {"prompt_token_ids": [5, 900, 17, 4000, 33]}]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


async def idle(llm: AsyncLLM) -> bool:
    stats = await llm.engine.call(lambda engine: engine.get_stats())
    return stats.num_running == stats.num_waiting == 0 and (
        stats.num_free_blocks == stats.num_total_blocks
    )


def test_concurrent_generations_match_llm(llama):
    expected = LLM(llama, dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)

    async def collect(llm: AsyncLLM, prompt) -> list:
        return [out async for out in llm.generate(prompt, GREEDY)]

    async def main() -> list[list]:
        async with AsyncLLM(llama, dtype="float32") as llm:
            return await asyncio.gather(*(collect(llm, p) for p in PROMPTS))

    for outputs, want in zip(asyncio.run(main()), expected, strict=True):
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        lengths = [len(o.outputs[0].token_ids) for o in outputs]
        assert lengths == sorted(lengths) and lengths[-1] == 12
        assert outputs[-1].outputs[0].token_ids == want.outputs[0].token_ids
        assert outputs[-1].outputs[0].text == want.outputs[0].text


def test_leaving_early_and_aborting_free_the_blocks(llama):
    long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main() -> None:
        async with AsyncLLM(llama, dtype="float32") as llm:
            async with contextlib.aclosing(llm.generate("Hello", long, request_id="a")) as outs:
                async for out in outs:  # aclosing: the break closes the generator at once
                    if len(out.outputs[0].token_ids) >= 3:
                        break
            assert llm.engine.num_in_flight() == 0  # aborted as the generator closed
            seen = []

            async def consume() -> None:
                async for out in llm.generate("Hello", long, request_id="b"):
                    seen.append(out)
                    if len(seen) == 2:
                        await llm.abort("b")

            await asyncio.wait_for(consume(), timeout=60)
            assert not seen[-1].finished and len(seen) == 2
            assert await llm.reset_prefix_cache()  # after the aborts: no block is held
            assert await idle(llm)
            with pytest.raises(ValueError, match="context"):
                async for _ in llm.generate("Hi", SamplingParams(max_tokens=10**6)):
                    pass
            final = [o async for o in llm.generate("Hello", GREEDY, request_id="a")][-1]
            assert final.finished  # the id of a finished request can be used again

    asyncio.run(main())


def test_encode_matches_llm_embed(tiny_model_dir):
    qwen3 = tiny_model_dir("qwen3")
    want = LLM(qwen3, runner="pooling", dtype="float32").embed(["The quick brown fox"])

    async def main():
        async with AsyncLLM(qwen3, runner="pooling", dtype="float32") as llm:
            return [o async for o in llm.encode("The quick brown fox", PoolingParams())]

    (out,) = asyncio.run(main())
    got, expected = out.outputs.embedding, want[0].outputs.embedding
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-6, rtol=0)


def test_unknown_arguments_are_refused(llama):
    with pytest.raises(TypeError, match="unknown AsyncLLM arguments: max_batch"):
        AsyncLLM(llama, max_batch=4)
