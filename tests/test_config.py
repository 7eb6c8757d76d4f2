"""ModelArgs from the real configs of the Mixtral/Mistral family, and its errors."""

import pytest
from mlx.utils import tree_flatten

from mlx_mixtral import Mixtral, ModelArgs
from mlx_mixtral.errors import ConfigError

# config.json of mistralai/Mixtral-8x7B-v0.1 on the hub (top-level rope_theta).
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
MIXTRAL_8X22B = {
    **MIXTRAL_8X7B,
    "hidden_size": 6144,
    "intermediate_size": 16384,
    "num_hidden_layers": 56,
    "num_attention_heads": 48,
    "vocab_size": 32768,
    "max_position_embeddings": 65536,
}
# Mistral-7B-v0.1: dense, 4096-token sliding window, rope_theta 1e4.
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 32000,
}


def _params(args):
    return sum(v.size for _, v in tree_flatten(Mixtral(args).parameters()))  # lazy: shapes only


def test_mixtral_8x7b_matches_model_card():
    args = ModelArgs.from_dict(MIXTRAL_8X7B)
    assert (args.head_dim, args.num_local_experts, args.num_experts_per_tok) == (128, 8, 2)
    assert args.rope_theta == 1e6 and args.sliding_window is None and args.is_moe
    assert round(_params(args) / 1e9, 1) == 46.7  # "46.7B parameters" in the paper/model card


def test_mixtral_8x22b_matches_model_card():
    args = ModelArgs.from_dict(MIXTRAL_8X22B)
    assert (args.head_dim, args.num_key_value_heads, args.num_hidden_layers) == (128, 8, 56)
    assert round(_params(args) / 1e9) == 141


def test_dense_mistral_has_no_experts():
    args = ModelArgs.from_dict(MISTRAL_7B)
    assert not args.is_moe and args.sliding_window == 4096 and args.rope_theta == 1e4
    assert "mlp" in Mixtral(args).layers[0]
    assert round(_params(args) / 1e9, 2) == 7.24


def test_transformers5_rope_parameters_and_unknown_keys():
    cfg = {k: v for k, v in MIXTRAL_8X7B.items() if k != "rope_theta"}
    cfg["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    cfg["some_future_key"] = {"x": 1}
    assert ModelArgs.from_dict(cfg).rope_theta == 5e5


def test_linear_rope_scaling_and_explicit_head_dim():
    args = ModelArgs.from_dict({**MISTRAL_7B, "head_dim": 64, "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert args.head_dim == 64 and args.rope_scale == 0.25


def test_mistral_native_params_json():
    params = {
        "dim": 4096,
        "n_layers": 32,
        "head_dim": 128,
        "hidden_dim": 14336,
        "n_heads": 32,
        "n_kv_heads": 8,
        "norm_eps": 1e-05,
        "vocab_size": 32000,
        "moe": {"num_experts_per_tok": 2, "num_experts": 8},
        "rope_theta": 1e6,
    }
    args = ModelArgs.from_dict(params)
    assert args.model_type == "mixtral" and args.num_local_experts == 8 and args.num_hidden_layers == 32
    assert ModelArgs.from_dict(args.to_hf_dict()) == args


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({**MIXTRAL_8X7B, "model_type": "llama"}, "unsupported model_type 'llama'"),
        ({k: v for k, v in MIXTRAL_8X7B.items() if k != "hidden_size"}, "missing required field 'hidden_size'"),
        ({k: v for k, v in MIXTRAL_8X7B.items() if k != "model_type"}, "no 'model_type'"),
        ({**MIXTRAL_8X7B, "num_experts_per_tok": 9}, "num_experts_per_tok=9 must be between 1 and num_local_experts=8"),
        ({**MIXTRAL_8X7B, "hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({**MIXTRAL_8X7B, "num_key_value_heads": 5}, "not a multiple of num_key_value_heads=5"),
        ({**MIXTRAL_8X7B, "rope_scaling": {"rope_type": "yarn", "factor": 4}}, "unsupported rope_type 'yarn'"),
        ({**MIXTRAL_8X7B, "quantization_config": {"quant_method": "awq", "bits": 4}}, "quant_method 'awq'"),
    ],
)
def test_config_errors_name_the_field(cfg, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelArgs.from_dict(cfg)
