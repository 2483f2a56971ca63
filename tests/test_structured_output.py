"""Structured outputs through the engine: every output keeps to its constraint.

A tiny random model is the hardest client for a grammar: it would write anything, so whatever
keeps its outputs inside the constraint is the mask, not the model. The packaged SmolLM2 shows
the common case, a chat model asked for JSON.
"""

import json
import re

import pytest

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.sample.structured_output import GrammarCompiler, check_grammar, closed_objects

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["colour", "ok", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), kv_cache_memory=0.05)


def _texts(llm, constraint, n=6, prompt="Answer:", **params):
    params = SamplingParams(
        **{"n": n, "temperature": 1.0, "seed": 7, "max_tokens": 64, **params},
        structured_outputs=constraint,
    )
    (out,) = llm.generate([prompt], params, use_tqdm=False)
    return out.outputs


def test_choice_is_one_of_the_choices(tiny):
    choices = ["yes", "no", "not sure"]
    outputs = _texts(tiny, StructuredOutputsParams(choice=choices))
    assert all(o.text in choices and o.finish_reason == "stop" for o in outputs)


def test_regex_is_matched(tiny):
    outputs = _texts(tiny, StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"))
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", o.text) for o in outputs), outputs


def test_json_schema_is_followed(tiny):
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    for out in _texts(tiny, constraint):
        value = json.loads(out.text)
        assert set(value) == {"colour", "ok", "count"} and out.finish_reason == "stop"
        assert value["colour"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
        assert isinstance(value["count"], int) and 0 <= value["count"] <= 99
        assert " " not in out.text and "\n" not in out.text


GBNF = r"""
root ::= "SELECT " column " FROM " table
column ::= "id" | "name" | "age"
table ::= [a-z]{1,4} "_" [0-9]
"""


@pytest.mark.parametrize(
    "grammar",
    [
        GBNF,
        'start: "SELECT " column " FROM " TABLE\ncolumn: "id" | "name" | "age"\n'
        "TABLE: /[a-z]{1,4}_[0-9]/\n",
    ],
    ids=["gbnf", "lark"],
)
def test_grammar_is_followed(tiny, grammar):
    """A context-free grammar, written in GBNF (vLLM's EBNF, llama.cpp's) or in Lark."""
    for out in _texts(tiny, StructuredOutputsParams(grammar=grammar)):
        assert re.fullmatch(r"SELECT (id|name|age) FROM [a-z]{1,4}_[0-9]", out.text), out.text


def test_greedy_rows_are_constrained_too(tiny):
    outputs = _texts(tiny, StructuredOutputsParams(choice=["alpha", "beta"]), n=1, temperature=0)
    assert outputs[0].text in ("alpha", "beta")


def test_allowed_token_ids_narrow_the_grammar(tiny, smollm2_tokenizer):
    """Both limits hold at once: of the two choices only the one spelled by allowed tokens."""
    (yes,) = smollm2_tokenizer.encode("yes")
    outputs = _texts(
        tiny, StructuredOutputsParams(choice=["yes", "no"]), allowed_token_ids=[yes, 0, 1, 2]
    )
    assert all(o.text == "yes" for o in outputs)


def test_free_requests_beside_constrained_ones_are_unchanged(tiny):
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = tiny.generate(["Hello there"], free, use_tqdm=False)[0].outputs[0].token_ids
    constrained = SamplingParams(
        temperature=1.0, max_tokens=32, structured_outputs=StructuredOutputsParams(regex="[ab]+c")
    )
    mixed = tiny.generate(
        ["Answer:", "Hello there", "Answer:"], [constrained, free, constrained], use_tqdm=False
    )
    assert mixed[1].outputs[0].token_ids == alone
    for i in (0, 2):
        text = mixed[i].outputs[0].text
        # the grammar ends at "c"; a length cut leaves a prefix of the language
        assert re.fullmatch(r"[ab]+c|[ab]*", text), text
    stats = tiny.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_objects_that_list_their_properties_take_no_others(tiny):
    """As vLLM's default backend: an object schema with properties and no word on
    additionalProperties is closed (a random model would otherwise add keys until cut off);
    one that says additionalProperties: true stays open."""
    digit = {"type": "integer", "minimum": 0, "maximum": 9}
    schema = {"type": "object", "properties": {"a": digit}, "required": ["a"]}
    constraint = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    for out in _texts(tiny, constraint, max_tokens=24):
        assert out.finish_reason == "stop" and set(json.loads(out.text)) == {"a"}, out.text
    closed = closed_objects({"properties": {"b": {"properties": {}}}, "$defs": {"c": schema}})
    assert closed["additionalProperties"] is False
    assert closed["properties"]["b"]["additionalProperties"] is False
    assert closed["$defs"]["c"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # a copy
    kept = {"properties": {}, "additionalProperties": True}
    assert closed_objects(kept) == kept and closed_objects({"type": "object"}) == {"type": "object"}
    # Composed objects stay open: each part closed alone would refuse the others' keys.
    base = {"type": "object", "properties": {"a": digit}}
    composed = {"allOf": [{"$ref": "#/$defs/B"}], "properties": {"c": digit},
                "required": ["a", "c"], "$defs": {"B": base}}  # fmt: skip
    assert closed_objects(composed) is composed
    check_grammar(StructuredOutputsParams(json=composed))
    loose = {"properties": {"a": digit}, "required": ["a", "b"]}  # b: some other key
    assert "additionalProperties" not in closed_objects(loose)


def test_structural_tag_holds_each_triggered_segment(tiny):
    """vLLM's structural tag: free text, but from each trigger ("@") on, the structure's begin,
    JSON of its schema, and its end. A logit bias makes the random model write the trigger; the
    rest of each segment is the grammar's."""
    tag = {
        "structures": [
            {
                "begin": "@call",
                "schema": {
                    "type": "object",
                    "properties": {"x": {"type": "integer"}},
                    "required": ["x"],
                    "additionalProperties": False,
                },
                "end": "!",
            }
        ],
        "triggers": ["@"],
    }
    at = 48  # "@" in SmolLM2's vocabulary
    outputs = _texts(
        tiny,
        StructuredOutputsParams(structural_tag=tag, disable_any_whitespace=True),
        logit_bias={at: 100.0},
        max_tokens=48,
    )
    decoder = json.JSONDecoder()
    segments = 0
    for out in outputs:
        text = out.text
        starts = [i for i, c in enumerate(text) if c == "@"]
        assert starts and starts[0] == 0, text
        for n, start in enumerate(starts):
            assert text.startswith("@call", start) or start + 5 > len(text), text
            try:
                value, end = decoder.raw_decode(text, start + 5)
            except json.JSONDecodeError:  # only a segment cut by max_tokens may be unfinished
                assert n == len(starts) - 1 and out.finish_reason == "length", text
                continue
            assert set(value) == {"x"} and isinstance(value["x"], int), text
            assert text[end : end + 1] in ("!", ""), text
            segments += 1
    assert segments >= len(outputs)


def test_a_tag_shaped_trigger_that_is_text_here_matches_as_text(smollm2_tokenizer):
    """llguidance takes a trigger written <...> for one special token; SmolLM2 writes
    <tool_call> as text (it is one token only in Qwen's vocabulary), and a tag on it works."""
    tool = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    tag = {"structures": [{"begin": "<tool_call>", "schema": tool, "end": "</tool_call>"}],
           "triggers": ["<tool_call>"]}  # fmt: skip
    compiler = GrammarCompiler(smollm2_tokenizer, len(smollm2_tokenizer), {0})
    matcher = compiler.matcher(StructuredOutputsParams(structural_tag=tag))
    ok = smollm2_tokenizer.encode('Sure. <tool_call>{"x": 7}</tool_call>')
    assert matcher.try_consume_tokens(ok) == len(ok) and not matcher.is_error()
    matcher = compiler.matcher(StructuredOutputsParams(structural_tag=tag))
    bad = smollm2_tokenizer.encode('Sure. <tool_call>{"y": 7}')
    assert matcher.try_consume_tokens(bad) < len(bad)


@pytest.mark.parametrize(
    "constraint",
    [
        {"json": {"type": "nonsense"}},
        {"json": "{not json"},
        {"regex": "a(("},
        {"grammar": "root ::= missing"},
        {"grammar": "root ::= (("},
        {"choice": []},
        {"regex": "a", "choice": ["a"]},
        {},
        {"structural_tag": "{not json"},
        {"structural_tag": {"structures": [{"begin": "<a>", "end": ""}], "triggers": ["<b"]}},
        {"structural_tag": {"structures": [], "triggers": ["<a"]}},
        {"structural_tag": {"format": {"type": "triggered_tags"}}},
    ],
)
def test_bad_constraints_are_refused(tiny, constraint):
    with pytest.raises(ValueError):
        params = SamplingParams(structured_outputs=StructuredOutputsParams(**constraint))
        tiny.llm_engine.add_request("bad", [1, 2, 3], params)
    assert not tiny.llm_engine.has_unfinished_requests()


def test_chat_model_answers_a_json_object(smollm2_path, smollm2_cache_gib):
    llm = LLM(smollm2_path, kv_cache_memory=smollm2_cache_gib(64))
    messages = [{"role": "user", "content": "Describe a cat as JSON with a name and an age."}]
    params = SamplingParams(
        temperature=0, max_tokens=120, structured_outputs=StructuredOutputsParams(json_object=True)
    )
    (out,) = llm.chat(messages, params, use_tqdm=False)[0].outputs
    assert isinstance(json.loads(out.text), dict) and out.finish_reason == "stop"


def test_preemption_keeps_the_grammar_where_it_was(tiny_model_dir):
    """Seeded constrained requests give the same outputs alone and in a cache too small for all
    of them at once, where running requests are preempted and recomputed. Both engines run on
    the CPU in float32, where the block arithmetic below holds and a batch's numbers do not
    depend on its size (a GPU's auto dtype is bfloat16)."""
    tiny = LLM(tiny_model_dir("llama"), kv_cache_memory=0.05, device="cpu")
    constraint = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured_outputs=constraint)
        for i in range(16)
    ]
    prompts = [f"Request {i}:" for i in range(16)]
    alone = [
        tiny.generate([p], q, use_tqdm=False)[0].outputs[0].text
        for p, q in zip(prompts, params, strict=True)
    ]
    # 8 blocks of 16 tokens, 512 bytes a token (2 layers, 2 kv heads of 16, float32 K and V)
    small = LLM(tiny_model_dir("llama"), kv_cache_memory=8 * 16 * 512 / (1 << 30), device="cpu")
    assert small.llm_engine.num_blocks == 8
    crowded = [r.outputs[0].text for r in small.generate(prompts, params, use_tqdm=False)]
    assert crowded == alone
    stats = small.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_total_blocks
