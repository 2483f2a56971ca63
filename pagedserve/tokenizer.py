"""Load a model's tokenizer (HF directory or GGUF file) with its chat template."""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError
from tokenizers import decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagedserve.model.gguf_loader import metadata, open_gguf
from pagedserve.model_path import resolve_model

logger = logging.getLogger(__name__)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """SmolLM's tokenizer.json: every digit on its own, then GPT-2's byte-level split."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# ``tokenizer.ggml.pre`` values whose pre-tokenizer transformers does not rebuild from a GGUF.
GGUF_PRE_TOKENIZERS = {"smollm": _smollm_pre_tokenizer}


def load_tokenizer(path: str, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The fast tokenizer of a model path (HF dir, ``.gguf`` file or cached Hub id) or of a
    directory of tokenizer files alone.

    ``chat_template`` overrides the model's own: a path to a template file, or the template text.
    """
    local = Path(path).expanduser()
    has_tokenizer_files = (local / "tokenizer.json").is_file() or (
        local / "tokenizer_config.json"
    ).is_file()
    model = local if has_tokenizer_files else Path(resolve_model(path))
    if model.suffix == ".gguf":
        tokenizer = _gguf_tokenizer(model)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        except StrictDataclassError as exc:  # it reads config.json, whose field has a bad type
            raise ValueError(f"{model / 'config.json'}: {exc}") from exc
    if not tokenizer.is_fast:
        raise ValueError(f"{model} has no fast tokenizer (tokenizer.json)")
    if chat_template is not None:
        tokenizer.chat_template = read_chat_template(chat_template)
    return tokenizer


def read_chat_template(template: str) -> str:
    """The template text of ``template``: itself if it is Jinja, else the file it names."""
    if "{" in template:
        return template
    file = Path(template).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"chat template {template!r} is neither an existing file nor a Jinja template"
        )
    return file.read_text()


# The special tokens a GGUF names by id, and the tokenizer attribute each sets.
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def _gguf_tokenizer(file: Path) -> PreTrainedTokenizerFast:
    """transformers builds the tokenizer from the GGUF metadata, but not always faithfully, so
    the file's own word wins where it was misread:
    - the pre-tokenizer, which ``tokenizer.ggml.pre`` names and transformers ignores for some
      vocabularies;
    - a byte-level BPE (``tokenizer.ggml.model`` "gpt2"): some versions (5.17) build it with
      SentencePiece's byte fallback and decoders, which decode the same but make llguidance read
      its tokens as raw text, so structured outputs fail;
    - the special tokens (5.17 makes SmolLM2's bos its eos too, and drops its pad).
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(file.parent), gguf_file=file.name)
    reader = open_gguf(str(file))
    backend = tokenizer.backend_tokenizer
    pre = metadata(reader, "tokenizer.ggml.pre")
    if pre in GGUF_PRE_TOKENIZERS:
        backend.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    elif pre not in (None, "default", "gpt-2"):
        logger.info("GGUF pre-tokenizer %r: keeping the one transformers builds", pre)
    if metadata(reader, "tokenizer.ggml.model") == "gpt2" and isinstance(backend.model, models.BPE):
        backend.model.byte_fallback = False
        backend.normalizer = None
        backend.decoder = decoders.ByteLevel()
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        token_id = metadata(reader, key)
        if token_id is not None and 0 <= int(token_id) < len(tokenizer):
            setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(int(token_id)))
    return tokenizer
