"""The memory planner: sizes by part, KV cache, the decision, and what it says, checked against sizes
worked out by hand for Mixtral-8x7B and 8x22B, and before any weight is downloaded."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_mixtral import load
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.errors import LoadError
from mlx_mixtral.memory.budget import Budget, parse_bytes
from mlx_mixtral.memory.plan import overhead, plan, plan_model

MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, num_local_experts=8,
                    num_experts_per_tok=2, max_position_embeddings=32768)  # fmt: skip
MIXTRAL_8X22B = dict(model_type="mixtral", hidden_size=6144, num_hidden_layers=56, num_attention_heads=48,
                     num_key_value_heads=8, intermediate_size=16384, vocab_size=32768, num_local_experts=8,
                     num_experts_per_tok=2, max_position_embeddings=65536)  # fmt: skip


def quantized_shapes(config: dict, bits: int, group: int = 64) -> dict:
    """The tensors the converter writes for this config at `bits` (stacked experts, bf16 scales and
    biases, float router and norms), as (safetensors dtype, shape)."""
    a = ModelArgs.from_dict(config)
    d, f, e, hd = a.hidden_size, a.intermediate_size, a.num_local_experts, a.head_dim

    def q(name, rows, cols, lead=()):
        return {f"{name}.weight": ("U32", (*lead, rows, cols * bits // 32)),
                f"{name}.scales": ("BF16", (*lead, rows, cols // group)),
                f"{name}.biases": ("BF16", (*lead, rows, cols // group))}  # fmt: skip

    t = {
        **q("model.embed_tokens", a.vocab_size, d),
        **q("lm_head", a.vocab_size, d),
        "model.norm.weight": ("BF16", (d,)),
    }
    for i in range(a.num_hidden_layers):
        p = f"model.layers.{i}"
        t.update(q(f"{p}.self_attn.q_proj", a.num_attention_heads * hd, d))
        t.update(q(f"{p}.self_attn.k_proj", a.num_key_value_heads * hd, d))
        t.update(q(f"{p}.self_attn.v_proj", a.num_key_value_heads * hd, d))
        t.update(q(f"{p}.self_attn.o_proj", d, a.num_attention_heads * hd))
        t[f"{p}.block_sparse_moe.gate.weight"] = ("BF16", (e, d))
        t.update(q(f"{p}.block_sparse_moe.switch_mlp.gate_proj", f, d, (e,)))
        t.update(q(f"{p}.block_sparse_moe.switch_mlp.up_proj", f, d, (e,)))
        t.update(q(f"{p}.block_sparse_moe.switch_mlp.down_proj", d, f, (e,)))
        t[f"{p}.input_layernorm.weight"] = ("BF16", (d,))
        t[f"{p}.post_attention_layernorm.weight"] = ("BF16", (d,))
    return t


def by_hand(config: dict, bits: int, context: int) -> dict:
    """The same sizes from the formula: a quantized weight is bits/8 bytes per parameter plus a
    2-byte scale and bias per 64 parameters; the KV cache 2 x layers x KV heads x head dim x 2 bytes
    per token; one expert is gate, up and down of one layer."""
    a = ModelArgs.from_dict(config)
    per_param = bits / 8 + 4 / 64
    d, f = a.hidden_size, a.intermediate_size
    expert = 3 * d * f * per_param
    experts = a.num_hidden_layers * a.num_local_experts * expert
    attention = (
        a.num_hidden_layers * d * a.head_dim * (2 * a.num_attention_heads + 2 * a.num_key_value_heads) * per_param
    )
    other = 2 * a.vocab_size * d * per_param + a.num_hidden_layers * (a.num_local_experts * d + 2 * d) * 2 + d * 2
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 2 * context
    return {"expert": expert, "experts": experts, "non_expert": attention + other, "kv": kv,
            "overhead": overhead(a), "num_experts": a.num_hidden_layers * a.num_local_experts}  # fmt: skip


def mac(ram_gb: int) -> Budget:
    """Apple's recommended GPU working set: about 2/3 of RAM up to 32 GB, 3/4 above."""
    return Budget(int(ram_gb * 1e9 * (2 / 3 if ram_gb <= 32 else 3 / 4)), f"a {ram_gb} GB Mac")


CASES = [(name, config, bits, ram) for name, config in (("8x7B", MIXTRAL_8X7B), ("8x22B", MIXTRAL_8X22B))
         for bits in (4, 3, 2) for ram in (16, 24, 32, 64, 128)]  # fmt: skip


@pytest.mark.parametrize("name,config,bits,ram", CASES, ids=[f"{c[0]}-{c[2]}bit-{c[3]}GB" for c in CASES])
@pytest.mark.parametrize("context", [4096, None])
def test_decisions_match_sizes_worked_out_by_hand(name, config, bits, ram, context):
    args = ModelArgs.from_dict(config)
    p = plan_model(args, quantized_shapes(config, bits), mac(ram), max_kv_size=context, dtype=mx.bfloat16)
    h = by_hand(config, bits, context or config["max_position_embeddings"])
    assert p.expert_bytes == pytest.approx(h["expert"], rel=1e-9)
    assert p.parts["experts"] == pytest.approx(h["experts"], rel=1e-9)
    assert p.non_expert_bytes == pytest.approx(h["non_expert"], rel=1e-9)
    assert p.kv_bytes == h["kv"] and p.overhead == h["overhead"]
    fixed = h["non_expert"] + h["kv"] + h["overhead"]
    room = mac(ram).bytes - fixed
    if room >= h["experts"]:
        assert p.decision == "resident" and p.experts_resident == h["num_experts"]
    elif room >= args.num_hidden_layers * h["expert"]:
        assert p.decision == "offload" and p.experts_resident == int(room // h["expert"])
        assert sum(p.layer_slots()) == p.experts_resident and min(p.layer_slots()) >= 1
    else:
        assert p.decision == "refuse" and p.experts_resident == 0


def test_the_numbers_people_plan_with():
    """Mixtral-8x7B at 4-bit g64: ~99 MB per expert, ~25.4 GB of experts, ~0.9 GB of the rest, and
    the fp16 KV cache at 128 KiB per token; 46.7B and 140.6B parameters."""
    p = plan_model(ModelArgs.from_dict(MIXTRAL_8X7B), quantized_shapes(MIXTRAL_8X7B, 4), mac(64), dtype=mx.bfloat16)
    assert round(p.expert_bytes / 1e6) == 99 and round(p.parts["experts"] / 1e9, 1) == 25.4
    assert round(p.non_expert_bytes / 1e9, 1) == 0.9 and p.kv_bytes == 32768 * 128 * 1024
    assert round(ModelArgs.from_dict(MIXTRAL_8X7B).num_parameters() / 1e9, 2) == 46.70
    assert round(ModelArgs.from_dict(MIXTRAL_8X22B).num_parameters() / 1e9, 2) == 140.63
    # On a 16 GB Mac 8x7B offloads (the hub's 4-bit model does not fit), on 64 GB it is resident.
    assert plan_model(ModelArgs.from_dict(MIXTRAL_8X7B), quantized_shapes(MIXTRAL_8X7B, 4), mac(16),
                      dtype=mx.bfloat16).decision == "offload"  # fmt: skip
    assert p.decision == "resident"


def test_cpu_plans_count_float32_scales():
    """On the CPU backend the loader holds every float tensor in float32, and so does the plan."""
    cfg = {**MIXTRAL_8X7B, "num_hidden_layers": 1}
    bf16 = plan_model(ModelArgs.from_dict(cfg), quantized_shapes(cfg, 4), mac(64), dtype=mx.bfloat16)
    f32 = plan_model(ModelArgs.from_dict(cfg), quantized_shapes(cfg, 4), mac(64), dtype=mx.float32)
    packed = 3 * 8 * 4096 * 14336 / 2
    assert f32.parts["experts"] - packed == pytest.approx(2 * (bf16.parts["experts"] - packed))


def test_a_budget_below_the_non_expert_weights_names_both_sizes(tiny_hf_dir):
    with pytest.raises(LoadError) as err:
        load(tiny_hf_dir, max_memory="100KB")
    message = str(err.value)
    assert "\n" not in message and "does not fit" in message
    assert "weights without the experts" in message and "exceed the budget of 100 KB (--max-memory)" in message


@pytest.mark.parametrize("text,expected", [("12GB", 12 * 10**9), ("1.5GiB", 3 * 2**29), ("500 MB", 5 * 10**8),
                                           (4096, 4096)])  # fmt: skip
def test_sizes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["0", "-1GB", "12 parsecs", "", True])
def test_bad_sizes(text):
    with pytest.raises(ValueError, match="expected e.g."):
        parse_bytes(text, "max_memory")


def test_a_hub_id_is_planned_from_its_config_and_headers_only(monkeypatch, tmp_path, tiny_hf_dir):
    """Nothing but config.json and the safetensors headers (range requests) is fetched, and a model
    that does not fit is refused before any download."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from mlx_mixtral.weights import find_weight_files, read_headers

    headers = read_headers(find_weight_files(tiny_hf_dir))
    fetched = []

    class Info:
        def __init__(self, t):
            self.dtype, self.shape = t.dtype, list(t.shape)

    class File:
        tensors = {n: Info(t) for n, t in headers.items()}

    class Meta:
        files_metadata = {"model.safetensors": File()}

    def not_cached(*a, **k):
        if not k.get("local_files_only"):
            fetched.append("snapshot")  # a download of files
        raise LocalEntryNotFoundError("not cached")

    def config(repo, filename, revision=None):
        fetched.append(filename)
        return str(tiny_hf_dir / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", config)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo, revision=None: Meta())
    p = plan("org/tiny", max_memory="1TB")
    local = plan(tiny_hf_dir, max_memory="1TB")
    assert p.parts == local.parts and p.decision == "resident" and fetched == ["config.json"]
    with pytest.raises(LoadError, match="does not fit"):
        load("org/tiny", max_memory="100KB")
    assert "snapshot" not in fetched


def test_plan_command(tiny_hf_dir):
    run = subprocess.run([sys.executable, "-m", "mlx_mixtral", "plan", "--model", str(tiny_hf_dir),
                          "--max-memory", "1TB", "--json"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["decision"] == "resident" and doc["parts"]["experts"] > 0 and doc["budget_source"] == "--max-memory"
    refused = subprocess.run([sys.executable, "-m", "mlx_mixtral", "plan", "--model", str(tiny_hf_dir),
                              "--max-memory", "1KB"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 1 and "does not fit" in refused.stdout
