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
    drop_field,
    drop_tensors,
    edited,
    load,
    put,
    set_experts,
    set_field,
    write_base,
)
from server_utils import free_port
from tiny_moe import MOE_KINDS
from transformers import GraniteConfig

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
# The MoE families' config fields (model/moe.py).
QWEN_MOE = ("qwen2_moe", "qwen3_moe")
MOE_CONFIG_CASES = [
    *[
        case(
            k,
            set_field(num_experts_per_tok=n),
            f"num_experts_per_tok {n} must be in 1..4",
            f"top_k_{n}",
        )
        for k in MOE_KINDS
        for n in (0, 5)
    ],
    case(
        "mixtral",
        set_field(num_local_experts=0),
        "num_local_experts must be a positive integer",
        "experts_0",
    ),
    case(
        "mixtral",
        drop_field("num_local_experts"),
        r"mlp\.gate\.weight: checkpoint shape \(4, 64\)",
        "experts_missing",
    ),
    case(
        "mixtral",
        set_experts(8),
        r"mlp\.gate\.weight: checkpoint shape \(4, 64\) != model shape \(8",
        "experts_8",
    ),
    *[
        case(
            k,
            set_experts(None),
            r"mlp\.gate\.weight: checkpoint shape \(4, 64\)",
            "experts_missing",
        )
        for k in QWEN_MOE
    ],
    case(
        "qwen3_moe",
        set_experts(-1),
        "num_experts must be an integer >= 0, got -1",
        "experts_negative",
    ),
    case(
        "qwen3_moe",
        set_experts(0),
        r"'model\.layers\.1\.mlp\.\S+' matches no model "
        "parameter",
        "experts_0",
    ),
    case(
        "qwen2_moe",
        set_experts(3),
        r"experts\.3\.\w+\.weight' is expert 3, but the config "
        "has 3",
        "experts_3",
    ),
    *[
        case(
            k,
            set_field(moe_intermediate_size=0),
            "moe_intermediate_size must be a positive integer",
            "moe_intermediate_0",
        )
        for k in QWEN_MOE
    ],
    *[
        case(
            k,
            drop_field("moe_intermediate_size"),
            r"experts\.0\.\w+\.weight: checkpoint shape",
            "moe_intermediate_missing",
        )
        for k in QWEN_MOE
    ],
    *[
        case(
            k,
            set_field(decoder_sparse_step=s),
            f"decoder_sparse_step must be a positive integer, got {s}",
            f"sparse_step_{s}",
        )
        for k in QWEN_MOE
        for s in (0, -1)
    ],
    case(
        "qwen2_moe",
        drop_field("shared_expert_intermediate_size"),
        r"shared_expert\.down_proj\.weight: checkpoint shape",
        "shared_size_missing",
    ),
    case(
        "qwen2_moe",
        set_field(shared_expert_intermediate_size=0),
        "shared_expert_intermediate_size must be a positive integer",
        "shared_size_0",
    ),
]
# Activations and rotation each family can not run.
ACTIVATION_CASES = [
    *[
        case(k, set_field(hidden_act="relu"), "unsupported hidden_act 'relu'", "relu")
        for k in ALL_KINDS
    ],
    case(
        "olmo2",
        set_field(partial_rotary_factor=0.5),
        "partial_rotary_factor 0.5 is not supported",
        "partial_rotary",
    ),
]
CONFIG_CASES = [*ATTENTION_CASES, *MOE_CONFIG_CASES, *ACTIVATION_CASES]


@pytest.mark.parametrize(("kind", "edit", "message"), CONFIG_CASES)
def test_malformed_config_is_refused(base_dir, tmp_path, kind, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited(base_dir(kind), tmp_path / "m", config=edit))


GRANITE_MULTIPLIERS = [
    "embedding_multiplier",
    "attention_multiplier",
    "residual_multiplier",
    "logits_scaling",
]


@pytest.mark.parametrize("field", GRANITE_MULTIPLIERS)
@pytest.mark.parametrize("value", [0, -2.0, None, "2.0"])
def test_granite_multiplier_must_be_positive_number(base_dir, tmp_path, field, value):
    """Zero would zero the embeddings or every block, or divide the logits by zero; null and
    strings fail transformers' own field check, which must surface as a ValueError too."""
    path = edited(base_dir("granite"), tmp_path / "m", config=set_field(**{field: value}))
    with pytest.raises(ValueError, match=field):
        load(path)


def test_granite_missing_multipliers_take_transformers_defaults(base_dir, tmp_path):
    """A config without the four scalars loads as transformers builds it: each one is 1."""
    path = edited(base_dir("granite"), tmp_path / "m", config=drop_field(*GRANITE_MULTIPLIERS))
    model = load(path)
    defaults = GraniteConfig()
    assert {getattr(defaults, f) for f in GRANITE_MULTIPLIERS} == {1.0}
    layer = model.model.layers[0]
    assert layer.self_attn.attn.scale == defaults.attention_multiplier
    assert layer.residual_multiplier == defaults.residual_multiplier
    assert model.model.embed_tokens.multiplier == defaults.embedding_multiplier
    assert model.logits_scaling == defaults.logits_scaling


@pytest.mark.parametrize("layers", [[1], [1, 2, -1]])
def test_qwen_mlp_only_layers_names_dense_layers(base_dir, tmp_path, layers):
    """``mlp_only_layers`` makes the layers it names dense; an index that names no layer is
    ignored, as transformers and vLLM ignore it."""
    path = edited(base_dir("qwen2_moe"), tmp_path / "m", config=set_field(mlp_only_layers=layers))
    model = load(path)
    assert model.model.layers[0].mlp.experts.num_experts == 4
    assert not hasattr(model.model.layers[1].mlp, "experts")


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
# The experts' tensors (model/layers/fused_moe.py).
MOE_TENSOR_CASES = [
    case(
        "mixtral",
        put(f"{MIXTRAL_EXPERTS}0.w1.weight", torch.zeros(48, 64)),
        r"experts\.0\.w1\.weight: checkpoint shape \(48, 64\) != model shape \(64, 64\)",
        "w1_shape",
    ),
    case(
        "mixtral",
        put(f"{MIXTRAL_EXPERTS}1.w2.weight", torch.zeros(64, 32)),
        r"experts\.1\.w2\.weight: checkpoint shape \(64, 32\)",
        "w2_shape",
    ),
    case(
        "mixtral_stacked",
        put(f"{QWEN_MLP}experts.gate_up_proj", torch.zeros(4, 64, 64)),
        r"model\.layers\.0\.mlp\.experts\.gate_up_proj: checkpoint shape \(4, 64, 64\)",
        "stacked_shape",
    ),
    case(
        "mixtral",
        put(f"{MIXTRAL_EXPERTS}4.w1.weight", torch.zeros(64, 64)),
        r"experts\.4\.w1\.weight' is expert 4, but the config has 4 experts",
        "expert_4",
    ),
    case(
        "qwen3_moe",
        put("model.layers.1.mlp.experts.7.up_proj.weight", torch.zeros(32, 64)),
        "is expert 7, but the config has 4 experts",
        "expert_7",
    ),
    case(
        "mixtral",
        drop_tensors(f"{MIXTRAL_EXPERTS}3.w3"),
        r"lacks 1 weights: model\.layers\.0\.mlp\.experts\.gate_up_proj\[3\]\[1\]",
        "no_w3",
    ),
    case(
        "mixtral",
        put(f"{MIXTRAL_EXPERTS}0.w1.bias", torch.zeros(64)),
        r"experts\.0\.w1\.bias' matches no expert parameter",
        "expert_bias",
    ),
    case(
        "qwen2_moe",
        put(f"{QWEN_MLP}experts.x.gate_proj.weight", torch.zeros(32, 64)),
        "matches no expert parameter",
        "expert_x",
    ),
    case(
        "qwen2_moe",
        drop_tensors(f"{QWEN_MLP}shared_expert."),
        r"lacks 3 weights: model\.layers\.0\.mlp\.shared_expert\.",
        "no_shared_expert",
    ),
    case(
        "qwen2_moe",
        drop_tensors(f"{QWEN_MLP}shared_expert_gate"),
        r"lacks 1 weights: model\.layers\.0\.mlp\.shared_expert_gate",
        "no_shared_gate",
    ),
    case(
        "qwen2_moe",
        put(f"{QWEN_MLP}gate.weight", torch.zeros(5, 64)),
        r"mlp\.gate\.weight: checkpoint shape \(5, 64\)",
        "router_shape",
    ),
    case(
        "mixtral",
        as_int(f"{MIXTRAL_EXPERTS}0.w1.weight"),
        r"w1\.weight' has dtype int32; expected a floating-point dtype",
        "int_expert",
    ),
    case(
        "mixtral_stacked",
        as_int(f"{QWEN_MLP}experts.down_proj"),
        r"experts\.down_proj' has dtype int32",
        "int_stacked",
    ),
]
TENSOR_CASES = [*LOADER_TENSOR_CASES, *MOE_TENSOR_CASES]


@pytest.mark.parametrize(("kind", "edit", "message"), TENSOR_CASES)
def test_malformed_tensors_are_refused(base_dir, tmp_path, kind, edit, message):
    with pytest.raises(ValueError, match=message):
        load(edited(base_dir(kind), tmp_path / "m", tensors=edit))


@pytest.mark.parametrize(
    ("kind", "fields", "message"),
    [
        ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be in 1..4"),
        # transformers' own type check, met first by the tokenizer (which reads config.json).
        (
            "granite",
            {"logits_scaling": None},
            "config.json: Validation error for field 'logits_scaling'",
        ),
    ],
    ids=["qwen3_moe-top_k_9", "granite-null_logits_scaling"],
)
def test_serve_exits_with_the_error_on_stderr(
    base_dir, tmp_path, smollm2_tokenizer, kind, fields, message
):
    """``pagedserve serve`` on a malformed checkpoint exits non-zero at start-up, its stderr
    naming the field, with no traceback."""
    path = edited(base_dir(kind), tmp_path / "m", config=set_field(**fields))
    smollm2_tokenizer.save_pretrained(path)
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", "--model", path, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
