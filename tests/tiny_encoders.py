"""Tiny random encoders for tests: BERT, XLM-R and ModernBERT models (bare, or with a
classification head) and a WordPiece tokenizer of a few words that encodes pairs as BERT's do."""

from __future__ import annotations

import torch
from tiny_models import VOCAB_SIZE
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    ModernBertModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaModel,
)

BERT_WORDS = ["the", "cat", "sat", "on", "mat", "dog", "what", "is", "where", "this", "a", "fish"]


def bert_tokenizer() -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer of a few words that encodes pairs as BERT's do: ``[CLS] a [SEP] b
    [SEP]``, the second text's tokens of type 1."""
    vocab = {
        t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS])
    }
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        cls_token="[CLS]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_encoder(
    kind: str, num_labels: int | None = None, vocab_size: int = VOCAB_SIZE, scale: float = 0.1
) -> PreTrainedModel:
    """A ``bert``, ``xlm_roberta`` or ``modernbert`` encoder (XLM-R: positions from
    pad_token_id + 1, one token type; ModernBERT: three layers, the first global, the others
    seeing 8 tokens either side, and a classifier pooling the mean), with a
    sequence-classification head of ``num_labels`` labels if given; weights random with
    ``scale``, LayerNorm weights near 1."""
    sizes = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    if num_labels is not None:
        sizes["num_labels"] = num_labels
    if kind == "bert":
        config = BertConfig(**sizes, max_position_embeddings=128)
        model_class = BertModel if num_labels is None else BertForSequenceClassification
    elif kind == "modernbert":
        sizes["num_hidden_layers"] = 3
        config = ModernBertConfig(
            **sizes,
            max_position_embeddings=128,
            local_attention=16,
            global_attn_every_n_layers=3,
            classifier_pooling="mean",
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
            attn_implementation="eager",
        )
        if num_labels is None:
            model_class = ModernBertModel
        else:
            model_class = ModernBertForSequenceClassification
    else:
        config = XLMRobertaConfig(
            **sizes, max_position_embeddings=130, pad_token_id=1, type_vocab_size=1
        )
        model_class = XLMRobertaModel if num_labels is None else XLMRobertaForSequenceClassification
    model = model_class(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            near_one = "LayerNorm.weight" in name or "norm.weight" in name
            param.copy_(1 + 0.1 * noise if near_one else scale * noise)
    return model.eval()


def tiny_cross_encoder(kind: str, num_labels: int = 1) -> PreTrainedModel:
    """A ``bert`` or ``xlm_roberta`` sequence classifier (one label: a cross-encoder) over
    :func:`bert_tokenizer`'s vocabulary."""
    return tiny_encoder(kind, num_labels, vocab_size=5 + len(BERT_WORDS), scale=0.3)
