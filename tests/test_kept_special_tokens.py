"""``kept_special_tokens``: the special tokens a server's parsers read (Magistral's ``[THINK]``
and ``[/THINK]``, Mistral's ``[TOOL_CALLS]``) stay in the answer's text while
``skip_special_tokens`` drops every other one (a ``</s>`` or ``[INST]`` the model writes), as
vLLM's Mistral parser drops them; with ``skip_special_tokens`` false, all stay."""

from __future__ import annotations

import pytest

from pagedserve.engine.beam_search import Beam, BeamSearchParams, request_output
from pagedserve.engine.detokenizer import IncrementalDetokenizer, decoded
from pagedserve.sampling_params import SamplingParams
from pagedserve.tokenizer import load_tokenizer

MARKERS = frozenset({"[THINK]", "[/THINK]"})
ANSWER = "[THINK]2+2[INST] is 4[/THINK]<|im_start|>Four[INST]."


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    """SmolLM2's tokenizer (its own special tokens: ``<|im_start|>``...) with Magistral's."""
    tok = load_tokenizer(smollm2_path)
    tok.add_tokens(["[THINK]", "[/THINK]", "[INST]"], special_tokens=True)
    return tok


def streamed(tokenizer, ids: list[int], params: SamplingParams) -> str:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Think:"), params)
    shown = ""
    for token_id in ids:
        detok.append([token_id])
        now = detok.output_text(finished=False)
        assert now.startswith(shown)
        shown = now
    return detok.output_text(finished=True)


def test_only_the_kept_special_tokens_stay(tokenizer):
    ids = tokenizer.encode(ANSWER)
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "[THINK]"  # each a single token
    kept = SamplingParams(kept_special_tokens=MARKERS)
    expected = "[THINK]2+2 is 4[/THINK]Four."
    assert streamed(tokenizer, ids, kept) == expected
    assert decoded(tokenizer, ids, True, MARKERS) == expected


def test_without_skipping_every_special_token_stays(tokenizer):
    ids = tokenizer.encode(ANSWER)
    params = SamplingParams(skip_special_tokens=False, kept_special_tokens=MARKERS)
    assert streamed(tokenizer, ids, params) == ANSWER
    assert decoded(tokenizer, ids, False, MARKERS) == ANSWER


def test_nothing_kept_skips_them_all(tokenizer):
    ids = tokenizer.encode(ANSWER)
    assert streamed(tokenizer, ids, SamplingParams()) == "2+2 is 4Four."
    assert decoded(tokenizer, ids, True, frozenset()) == "2+2 is 4Four."


def test_beam_search_text_keeps_the_same_tokens(tokenizer):
    ids = tokenizer.encode(ANSWER)
    params = BeamSearchParams(beam_width=1, max_tokens=len(ids), kept_special_tokens=MARKERS)
    out = request_output("r", None, [1], [Beam(tokens=ids)], tokenizer, params)
    assert out.outputs[0].text == "[THINK]2+2 is 4[/THINK]Four."
