"""Incremental detokenizer: streamed text equals a full decode; stop strings cut and hold back."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.sampling_params import SamplingParams

TEXTS = [
    "Hello, world! This is a plain sentence.",
    "Emoji 🎉🎉 and a family 👨‍👩‍👧 with skin tone 👋🏽!",
    "日本語のテキストと中文字符, 한국어도 있어요.",
    "Ünïcödé àccents, ∑∫√ maths and «quotes» — dashes.",
    "def f(x):\n    return x  # two spaces\n\n\tTabbed   three spaces\n",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    """The packaged SmolLM2 tokenizer (byte-level BPE: multi-byte characters span tokens)."""
    return smollm2_tokenizer


def stream(
    tokenizer,
    token_ids: list[int],
    params: SamplingParams,
    prompt: list[int] | None = None,
    chunk: int = 1,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``token_ids`` ``chunk`` at a time; the visible text after each step, and the stop."""
    detok = IncrementalDetokenizer(tokenizer, prompt or tokenizer.encode("Say something:"), params)
    visible, stop = [], None
    for i in range(0, len(token_ids), chunk):
        stop = detok.append(token_ids[i : i + chunk])
        visible.append(detok.output_text(finished=stop is not None))
        if stop is not None:
            break
    return detok, visible, stop


def assert_append_only(visible: list[str], final: str) -> None:
    for before, after in zip(visible, visible[1:] + [final], strict=True):
        assert after.startswith(before), (before, after)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_text_equals_full_decode(tokenizer, text, chunk):
    ids = tokenizer.encode(text)
    detok, visible, _ = stream(tokenizer, ids, SamplingParams(), chunk=chunk)
    final = detok.output_text(finished=True)
    assert final == tokenizer.decode(ids) == text
    assert_append_only(visible, final)
    # No partial character is ever shown.
    assert all("\ufffd" not in v for v in visible)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("<|im_start|>assistant\nHi 👋<|im_end|>\n<|im_start|>user")
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<|im_start|>"
    detok, visible, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
    final = detok.output_text(finished=True)
    assert final == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in final) is not skip
    assert_append_only(visible, final)


def test_eos_that_ends_the_sequence_adds_no_text(tokenizer):
    ids = tokenizer.encode("Done.") + [tokenizer.eos_token_id]
    for include, expected in [(False, "Done."), (True, "Done.<|im_end|>")]:
        params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
        detok = IncrementalDetokenizer(tokenizer, [1], params)
        detok.append(ids[:-1])
        detok.append(ids[-1:], stop_terminated=True)
        assert detok.output_text(finished=True) == expected


def test_incomplete_character_is_flushed_when_finished(tokenizer):
    ids = tokenizer.encode("ok 世")[:-1]  # stop inside the character's bytes
    detok, visible, _ = stream(tokenizer, ids, SamplingParams())
    assert visible[-1] == "ok "
    assert detok.output_text(finished=True) == tokenizer.decode(ids)
    assert detok.output_text(finished=True).endswith("\ufffd")


@pytest.mark.parametrize(
    ("text", "stops", "include", "expected", "matched"),
    [
        # stop at a token boundary
        ("Hello world, the stop word is here.", [" the"], False, "Hello world,", " the"),
        ("Hello world, the stop word is here.", [" the"], True, "Hello world, the", " the"),
        # stop ending in the middle of a token
        ("Hello world, the stop word is here.", ["wor"], False, "Hello ", "wor"),
        ("Hello world, the stop word is here.", ["wor"], True, "Hello wor", "wor"),
        # stop across several tokens
        ("Let's see: END_OF_TEXT then more", ["END_OF_TEXT"], False, "Let's see: ", "END_OF_TEXT"),
        ("Let's see: END_OF_TEXT then more", ["D_OF_T"], True, "Let's see: END_OF_T", "D_OF_T"),
        # stop inside a multi-token character
        ("x 世界 y", ["界"], False, "x 世", "界"),
        # several stops: the one the text completes first wins, whatever the list order
        ("Hello world, the stop word is here.", ["stop", "world", "is"], False, "Hello ", "world"),
        ("Hello world, the stop word is here.", ["here", "o w"], False, "Hell", "o w"),
        ("Hello world, the stop word is here.", ["world, the", "ld"], False, "Hello wor", "ld"),
        # stop never met
        ("Hello world.", ["xyz"], False, "Hello world.", None),
    ],
)
@pytest.mark.parametrize("chunk", [1, 4])
def test_stop_strings(tokenizer, text, stops, include, expected, matched, chunk):
    ids = tokenizer.encode(text)
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok, visible, stop = stream(tokenizer, ids, params, chunk=chunk)
    final = detok.output_text(finished=True)
    assert (final, stop) == (expected, matched)
    assert_append_only(visible, final)
    for shown in visible[:-1] if stop is not None else visible:
        for s in stops:
            assert s not in shown
            assert not any(shown.endswith(s[:k]) for k in range(1, len(s))), (shown, s)


def test_stop_strings_match_as_a_scan_of_each(tokenizer):
    """Stop strings are looked up by length in a set and held back through a sorted list
    (clients send thousands): what is matched and shown is still what a scan of every stop
    string gives, the first to end (then the longer) and the longest tail that may become one."""
    rng = random.Random(0)
    for _ in range(150):
        text = "".join(rng.choice("ab ") for _ in range(rng.randint(1, 30)))
        pieces = ("".join(rng.choice("ab ") for _ in range(rng.randint(1, 4))) for _ in range(8))
        stops = sorted(set(pieces))[: rng.randint(1, 8)]
        ids = tokenizer.encode(text)
        detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams(stop=stops))
        for i in range(len(ids)):
            stop = detok.append(ids[i : i + 1])
            so_far = tokenizer.decode(ids[: i + 1])
            found = [(so_far.find(s) + len(s), -len(s), s) for s in stops if s in so_far]
            if found:
                end, neg_len, matched = min(found)
                assert (
                    stop == matched and detok.output_text(finished=True) == so_far[: end + neg_len]
                )
                break
            held = max(
                (k for k in range(1, len(so_far) + 1) for s in stops
                 if len(s) > k and s.startswith(so_far[-k:])),
                default=0,
            )  # fmt: skip
            assert (
                stop is None and detok.output_text(finished=False) == so_far[: len(so_far) - held]
            )


def test_held_back_text_is_released_when_it_is_not_a_stop(tokenizer):
    ids = tokenizer.encode("Hello world, the stop word is here.")
    detok, visible, stop = stream(tokenizer, ids, SamplingParams(stop=["words"]))
    assert stop is None
    assert "Hello world, the stop" in visible  # " word" held back while it might become "words"
    assert not any(v.endswith(" word") for v in visible)
    assert visible[-1] == "Hello world, the stop word is here."
    assert detok.output_text(finished=True) == visible[-1]


def test_hold_back_released_when_finished(tokenizer):
    ids = tokenizer.encode("The end is ST")
    detok, visible, stop = stream(tokenizer, ids, SamplingParams(stop=["STOP"]))
    assert stop is None and visible[-1] == "The end is "
    assert detok.output_text(finished=True) == "The end is ST"


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode("a b a b a b")
    assert len(ids) == 6
    detok, _, stop = stream(tokenizer, ids, SamplingParams(stop=["b"], min_tokens=3))
    assert stop == "b"
    assert detok.output_text(finished=True) == "a b a "  # the "b"s of the first 3 tokens stay


def test_no_detokenize(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams(detokenize=False))
    assert detok.append(tokenizer.encode("a b")) is None
    assert detok.output_text(finished=True) == ""


def test_decode_token(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [1], SamplingParams())
    ids = tokenizer.encode("Hello world")
    assert [detok.decode_token(i) for i in ids] == ["Hello", " world"]
    assert detok.decode_token(tokenizer.eos_token_id) == "<|im_end|>"


def test_spaces_between_special_tokens():
    """A decoder that joins tokens with spaces (WordPiece) shows the setting's effect."""
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["[A]", "[B]"]})
    ids = tok.encode("hello [A][B] world")

    def text(**params) -> str:
        detok = IncrementalDetokenizer(tok, tok.encode("hello"), SamplingParams(**params))
        for i in ids:
            detok.append([i])
        return detok.output_text(finished=True)

    assert text(skip_special_tokens=False) == " hello [A] [B] world"
    assert (
        text(skip_special_tokens=False, spaces_between_special_tokens=False)
        == " hello [A][B] world"
    )
    assert text(skip_special_tokens=True, spaces_between_special_tokens=False) == " hello world"
