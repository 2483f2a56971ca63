"""``pagedserve generate`` and ``pagedserve chat``: the terminal commands, run in-process on a tiny
model, answer as ``LLM`` does with the same greedy settings."""

from __future__ import annotations

import io

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.cli import main

FLAGS = ["--dtype", "float32", "--max-tokens", "6", "--temperature", "0"]


@pytest.fixture(scope="module")
def model_and_llm(tiny_model_dir):
    path = tiny_model_dir("llama")
    return path, LLM(path, dtype="float32", seed=0)


def greedy_chat(llm: LLM, messages: list[dict[str, str]]) -> str:
    params = SamplingParams(temperature=0, max_tokens=6)
    return llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text


def test_generate_chat_prints_the_answer(model_and_llm, capsys):
    path, llm = model_and_llm
    assert main(["generate", path, "--chat", "--prompt", "Hello there", *FLAGS]) == 0
    expected = greedy_chat(llm, [{"role": "user", "content": "Hello there"}])
    assert capsys.readouterr().out == expected + "\n"


def test_generate_prints_the_prompt_and_its_continuation(model_and_llm, capsys):
    path, llm = model_and_llm
    assert main(["generate", path, "--prompt", "Once upon", *FLAGS]) == 0
    params = SamplingParams(temperature=0, max_tokens=6)
    expected = llm.generate(["Once upon"], params, use_tqdm=False)[0].outputs[0].text
    assert capsys.readouterr().out == "Once upon" + expected + "\n"


def test_chat_keeps_the_conversation_and_resets_it(model_and_llm, capsys, monkeypatch):
    path, llm = model_and_llm
    typed = "Hi\nAnd then?\n/reset\nAnd then?\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    assert main(["chat", path, "--system", "Be brief.", *FLAGS]) == 0
    system = {"role": "system", "content": "Be brief."}
    first = greedy_chat(llm, [system, {"role": "user", "content": "Hi"}])
    history = [
        system,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    second = greedy_chat(llm, history)
    fresh = greedy_chat(llm, [system, {"role": "user", "content": "And then?"}])
    out = capsys.readouterr().out
    answers = f"> {first}\n> {second}\n> > {fresh}\n> "  # "> " is input()'s prompt
    assert out.split("\n", 1)[1] == answers
