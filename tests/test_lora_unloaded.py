"""What the LoRA manager keeps of unloaded adapters, so that a request routed to one before its
unload is refused after it: nothing on a server, whose requests carry only adapters it loaded;
offline (a first use loads), the last ``MAX_UNLOADED`` unloads, and a request past that runs
with the weights it names, loaded again."""

from __future__ import annotations

import pytest
from tiny_models import write_lora_adapter

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.entrypoints.cli import api_settings, build_parser
from pagedserve.lora import manager
from pagedserve.lora.manager import LoRAAdapterUnloadedError

PROMPT = "Hello there, how are"
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=0)


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, smollm2_tokenizer) -> tuple[str, str]:
    """An adapter of the tiny llama, and the model with it merged in."""
    root = tmp_path_factory.mktemp("unloaded_lora")
    merged = write_lora_adapter(root / "adapter", "llama", 1)
    merged.save_pretrained(root / "merged")
    smollm2_tokenizer.save_pretrained(root / "merged")
    return str(root / "adapter"), str(root / "merged")


def test_a_server_keeps_nothing_of_its_unloads(base, adapter):
    llm = LLM(base, dtype="float32", enable_lora=True)
    engine, loras = llm.llm_engine, llm.llm_engine.loras
    loras.loads_on_use = False  # as the server runs it: it loads its adapters itself
    routed = []
    for i in range(1, 41):  # one name loaded and unloaded, as /v1/load_lora_adapter and unload
        lora = LoRARequest("swap", i, adapter[0])
        loras.load(lora)
        routed.append(lora)
        assert engine.remove_lora("swap")
    assert not loras.unloaded and not loras.loaded and not loras.retired
    current = LoRARequest("swap", 41, adapter[0])
    loras.load(current)
    for late in routed:  # each routed before its unload, from the path loaded now
        with pytest.raises(LoRAAdapterUnloadedError, match="'swap' was unloaded"):
            engine.add_request("late", PROMPT, GREEDY, lora_request=late)
    stray = LoRARequest("other", 99, adapter[0])  # never loaded by the server: not served
    with pytest.raises(LoRAAdapterUnloadedError):
        engine.add_request("stray", PROMPT, GREEDY, lora_request=stray)
    (out,) = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=current)
    assert out.outputs[0].token_ids == merged_tokens(adapter)


def test_offline_the_last_unloads_are_refused_and_older_ones_load_again(base, adapter, monkeypatch):
    monkeypatch.setattr(manager, "MAX_UNLOADED", 3)
    llm = LLM(base, dtype="float32", enable_lora=True)
    engine = llm.llm_engine
    unloaded = []
    for i in range(1, 6):
        lora = LoRARequest(f"n{i}", i, adapter[0])
        engine.loras.slot(lora)
        assert engine.remove_lora(lora.lora_name)
        unloaded.append(lora)
    assert list(engine.loras.unloaded) == unloaded[-3:]
    for lora in unloaded[-3:]:
        with pytest.raises(LoRAAdapterUnloadedError):
            llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=lora)
    (out,) = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=unloaded[0])
    assert out.outputs[0].token_ids == merged_tokens(adapter)


def merged_tokens(adapter: tuple[str, str]) -> list[int]:
    (out,) = LLM(adapter[1], dtype="float32").generate(PROMPT, GREEDY, use_tqdm=False)
    return out.outputs[0].token_ids


def test_the_server_runs_its_engine_with_the_adapters_it_loads(base, adapter):
    argv = ["serve", base, "--enable-lora", "--lora-modules", f"a={adapter[0]}"]
    engine, settings = api_settings(build_parser(argv).parse_args(argv))
    try:
        loras = engine.engine.loras
        assert not loras.loads_on_use
        assert loras.loaded["a"][0] == settings.lora_modules[0]
    finally:
        engine.shutdown()
