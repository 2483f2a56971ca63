"""Malformed but plausible checkpoints of the MoE (Mixtral, Qwen2-MoE, Qwen3-MoE) and dense
(Gemma 1, Granite, OLMo 2) families: each must be refused at load time with a ValueError that
names the config field or tensor at fault, never a deep traceback or a model that loads and
then computes garbage. ``pagedserve serve`` turns that error into a clean exit."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from malformed_models import (
    as_int,
    case,
    drop_tensors,
    edited,
    load,
    put,
    set_field,
    write_base,
)
from server_utils import free_port
from tiny_moe import MOE_KINDS

DENSE_KINDS = ["gemma", "granite", "olmo2"]
# The per-expert tensors of layer 0 as the Hub names them.
MIXTRAL_EXPERTS = "model.layers.0.block_sparse_moe.experts."
QWEN_MLP = "model.layers.0.mlp."


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``base_dir(kind)``: :func:`write_base`'s model of ``kind``, written once."""
    made: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_base(tmp_path_factory.mktemp(f"base_{kind}"), kind)
        return made[kind]

    return make


ALL_KINDS = [*MOE_KINDS, *DENSE_KINDS]

# Attention shapes, shared by every family (model/llama.py).
ATTENTION_CASES = [
    *[
        case(
            k,
            set_field(num_key_value_heads=3),
            "num_key_value_heads 3 must be a positive divisor of num_attention_heads 4",
            "kv_heads_3",
        )
        for k in ALL_KINDS
    ],
    *[
        case(
            k,
            set_field(num_key_value_heads=0),
            "num_key_value_heads 0 must be a positive divisor",
            "kv_heads_0",
        )
        for k in ("mixtral", "olmo2")
    ],
    *[
        case(
            k,
            set_field(num_attention_heads=0),
            "num_attention_heads must be a positive integer, got 0",
            "heads_0",
        )
        for k in ("mixtral", "granite", "olmo2")
    ],
    *[
        case(
            k,
            set_field(head_dim=8),
            r"model\.layers\.0\.self_attn\.\w+\.(weight|bias): "
            "checkpoint shape",
            "head_dim_8",
        )
        for k in ALL_KINDS
    ],
]
CONFIG_CASES = [*ATTENTION_CASES]


@pytest.mark.parametrize(("kind", "edit", "message"), CONFIG_CASES)
def test_malformed_config_is_refused(base_dir, tmp_path, kind, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited(base_dir(kind), tmp_path / "m", config=edit))


# Tensors every family loads alike (model/llama.py, model/strict_loading.py).
LOADER_TENSOR_CASES = [
    *[
        case(
            k,
            put("model.layers.0.mlp.extra.weight", torch.zeros(3)),
            r"'model\.layers\.0\.mlp\.extra\.weight' matches no model parameter",
            "extra",
        )
        for k in [*ALL_KINDS, "llama"]
    ],
    case(
        "qwen3_moe",
        drop_tensors("model.layers.0.self_attn.q_norm"),
        r"lacks 1 weights: model\.layers\.0\.self_attn\.q_norm\.weight",
        "no_q_norm",
    ),
    case(
        "olmo2",
        drop_tensors("model.layers.0.self_attn.q_norm"),
        r"lacks 1 weights: model\.layers\.0\.self_attn\.q_norm\.weight",
        "no_q_norm",
    ),
    case(
        "olmo2",
        put("model.layers.0.self_attn.k_norm.weight", torch.ones(64)),
        r"k_norm\.weight: checkpoint shape \(64,\) != model shape \(32,\)",
        "k_norm_shape",
    ),
    case(
        "olmo2",
        put("model.layers.0.self_attn.k_proj.weight", torch.zeros(48, 64)),
        r"k_proj\.weight: checkpoint shape \(48, 64\) != expected \(32, 64\)",
        "k_proj_shape",
    ),
    case(
        "qwen2_moe",
        as_int("model.layers.0.self_attn.q_proj.bias"),
        r"q_proj\.bias' has dtype int32",
        "int",
    ),
    case(
        "olmo2",
        as_int("model.layers.0.self_attn.q_norm.weight"),
        r"q_norm\.weight' has dtype int32",
        "int",
    ),
    case(
        "gemma",
        as_int("model.embed_tokens.weight"),
        r"embed_tokens\.weight' has dtype int32; expected a floating-point dtype",
        "int",
    ),
    case(
        "granite",
        as_int("model.layers.1.mlp.down_proj.weight"),
        r"down_proj\.weight' has dtype int32",
        "int",
    ),
    case(
        "llama",
        as_int("model.layers.0.self_attn.q_proj.weight"),
        r"q_proj\.weight' has dtype int32",
        "int",
    ),
]
TENSOR_CASES = [*LOADER_TENSOR_CASES]


@pytest.mark.parametrize(("kind", "edit", "message"), TENSOR_CASES)
def test_malformed_tensors_are_refused(base_dir, tmp_path, kind, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited(base_dir(kind), tmp_path / "m", tensors=edit))


def test_serve_exits_with_the_error_on_stderr(base_dir, tmp_path, smollm2_tokenizer):
    """``pagedserve serve`` on a malformed checkpoint exits non-zero at start-up, its stderr
    naming the field, with no traceback."""
    path = edited(base_dir("qwen3_moe"), tmp_path / "m", config=set_field(num_experts_per_tok=9))
    smollm2_tokenizer.save_pretrained(path)
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", "--model", path, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "num_experts_per_tok 9 must be in 1..4" in result.stderr
    assert "Traceback" not in result.stderr
