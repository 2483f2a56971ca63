"""The packaged SmolLM2 tokenizer built from its GGUF: digits, round trips, special tokens, the
chat template, and template overrides."""

from __future__ import annotations

import llguidance.hf
import pytest
from tokenizers import decoders
from transformers import PreTrainedTokenizerFast

from pagedserve.tokenizer import load_tokenizer, read_chat_template

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_digits_are_one_token_each(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.convert_ids_to_tokens(tok.encode("1969")) == ["1", "9", "6", "9"]
    assert tok.convert_ids_to_tokens(tok.encode(" 42 apples")) == ["Ġ", "4", "2", "Ġapples"]
    # The pre-tokenizer itself splits digits (SmolLM's tokenizer.json), not only the vocabulary.
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("year 2024")
    assert [p for p, _ in pieces] == ["year", "Ġ", "2", "0", "2", "4"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "naïve café, crème brûlée, Ångström",
        "日本語のテキストと中文文本",
        "emoji 🎉🚀👩‍💻 mixed",
        "two  spaces,   three, \ttab\t\tand\nnewlines\n\n\nend  ",
        "  leading and trailing  ",
        "code:\n    def f(x):\n\treturn x ** 2\r\n",
    ],
)
def test_round_trip(smollm2_tokenizer, text):
    ids = smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids) == text


def test_special_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]
    assert tok.encode("hi")[0] != tok.bos_token_id  # SmolLM2 adds no BOS
    assert len(tok) == 49152


def test_a_misread_gguf_tokenizer_is_mended(smollm2_path, monkeypatch):
    """transformers 5.17 builds SmolLM2's GGUF tokenizer as SentencePiece would (byte fallback,
    its decoders), with its bos as eos and no pad: it decodes the same, but llguidance then reads
    "Ġ" as a letter. The file's own word wins: byte-level BPE, and its special token ids."""
    from_pretrained = PreTrainedTokenizerFast.from_pretrained

    def misread(*args, **kwargs):
        tok = from_pretrained(*args, **kwargs)
        backend = tok.backend_tokenizer
        backend.model.byte_fallback = True
        backend.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Fuse(), decoders.ByteLevel()]
        )
        tok.eos_token = tok.bos_token
        tok.pad_token = None
        return tok

    monkeypatch.setattr(PreTrainedTokenizerFast, "from_pretrained", misread)
    tok = load_tokenizer(smollm2_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    text = "Let me check 42."
    assert llguidance.hf.from_tokenizer(tok).decode_str(tok.encode(text)) == text


def test_chat_template(smollm2_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    text = smollm2_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    text = smollm2_tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and SYSTEM not in text
    assert not text.endswith("<|im_start|>assistant\n")


def test_hf_directory_tokenizer_matches(tiny_model_dir, smollm2_tokenizer):
    """A tokenizer saved to an HF directory loads back identical, chat template included."""
    tok = load_tokenizer(tiny_model_dir("llama"))
    text = "Numbers 12345 and ünïcödé 🎉"
    assert tok.encode(text) == smollm2_tokenizer.encode(text)
    assert tok.chat_template == smollm2_tokenizer.chat_template
    assert tok.eos_token_id == 2


def test_tokenizer_only_directory(smollm2_tokenizer, tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("x 1969 ✓") == smollm2_tokenizer.encode("x 1969 ✓")


def test_chat_template_override(tiny_model_dir, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    file = tmp_path / "template.jinja"
    file.write_text(template)
    messages = [{"role": "user", "content": "hi"}]
    for override in (template, str(file)):
        tok = load_tokenizer(tiny_model_dir("llama"), chat_template=override)
        assert tok.apply_chat_template(messages, tokenize=False) == "[user] hi\n"
    assert read_chat_template(str(file)) == template
    with pytest.raises(FileNotFoundError, match="chat template"):
        read_chat_template(str(tmp_path / "missing.jinja"))
