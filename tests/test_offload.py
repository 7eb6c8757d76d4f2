"""Expert offloading gives the resident model's logits, whatever share of the experts stays in memory,
for stacked and per-expert layouts, float and 4-bit, prefill and cached decode, batch 2."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral import load, load_model, stream_generate
from mlx_mixtral.convert import convert
from mlx_mixtral.errors import LoadError, WeightsError
from mlx_mixtral.memory.plan import plan
from mlx_mixtral.offload.load import load_offloaded
from mlx_mixtral.offload.policy import POLICIES

TOKENS = mx.array([[1, 5, 9, 22, 17, 3, 44, 90, 7, 61], [1, 7, 8, 9, 10, 11, 12, 13, 100, 2]])  # (B, L)
# Float32 on the CPU: the offloaded layer runs the same matmuls on the same numbers, so the only
# differences allowed are summation order (grouped pairs); 1e-6 of max|logit| catches a wrong
# expert, slot or weight.
REL_TOL = 1e-6


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """name -> model dir: per-expert float (transformers' own files), stacked float, stacked 4-bit,
    and per-expert 4-bit (the layout of the hub's mlx-community Mixtral-8x7B 4-bit)."""
    root = tmp_path_factory.mktemp("offload")
    hf = add_tokenizer(make_hf_checkpoint(root / "hf", vocab_size=32000, seed=3))
    stacked = convert(hf, root / "stacked", dtype="float32")
    q4 = convert(hf, root / "q4", quantize=True, q_group_size=32)
    return {"per-expert float": hf, "stacked float": stacked, "stacked 4-bit": q4,
            "per-expert 4-bit": _unstack(q4, root / "q4-per-expert")}  # fmt: skip


def _unstack(src, dst):
    """A copy of an MLX dir with every stacked switch_mlp tensor split into experts.{e}.w{1,2,3}."""
    shutil.copytree(src, dst)
    names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    tensors = dict(mx.load(str(dst / "model.safetensors")))
    out = {}
    for name, value in tensors.items():
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            proj, kind = rest.split(".")
            for e in range(value.shape[0]):
                out[f"{prefix}.experts.{e}.{names[proj]}.{kind}"] = value[e]
        else:
            out[name] = value
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "mlx"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        meta = json.loads(index.read_text())
        meta["weight_map"] = {n: "model.safetensors" for n in out}
        index.write_text(json.dumps(meta))
    return dst


def _rel_err(a, b):
    return float(mx.abs(a - b).max() / mx.abs(b).max())


def _forward_both_ways(model):
    """Logits of the whole batch at once, and of a prefill of 6 then one token at a time."""
    whole = model(TOKENS)
    cache = model.make_cache()
    steps = [model(TOKENS[:, :6], cache=cache)] + [model(TOKENS[:, i : i + 1], cache=cache) for i in range(6, 10)]
    return whole, mx.concatenate(steps, axis=1)


@pytest.mark.parametrize("layout", ["per-expert float", "stacked float", "stacked 4-bit", "per-expert 4-bit"])
@pytest.mark.parametrize("share", ["100%", "60%", "30%"])
def test_offloaded_logits_equal_the_resident_model(layouts, layout, share):
    path = layouts[layout]
    want, _ = _forward_both_ways(load_model(path))
    slots = plan(path, max_memory="1TB").with_expert_cache(share).layer_slots()
    model = load_offloaded(path, slots)
    whole, stepped = _forward_both_ways(model)
    assert _rel_err(whole, want) <= REL_TOL and _rel_err(stepped, want) <= REL_TOL, (layout, share)
    stats = model.offload.stats
    assert stats.tokens == 2 * 10 + (2 * 6 + 4 * 2)  # the whole batch, then prefill 6 and 4 single steps
    if share == "100%":
        assert stats.hit_rate == 1.0 and stats.bytes_read == 0
    else:
        assert 0 < stats.hit_rate < 1 and stats.bytes_read > 0


def test_one_slot_per_layer_runs_a_prompt_in_groups(layouts):
    """With fewer slots than a step needs experts, the layer runs them in groups of what fits."""
    path = layouts["stacked 4-bit"]
    model = load_offloaded(path, [1, 1])
    assert _rel_err(model(TOKENS), load_model(path)(TOKENS)) <= REL_TOL


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("prefetch", [True, False])
def test_every_policy_and_prefetch_setting_gives_the_same_tokens(layouts, policy, prefetch):
    path = layouts["stacked 4-bit"]
    resident, tokenizer = load(path)
    want = [r.token for r in stream_generate(resident, tokenizer, "The capital of France", max_tokens=12)]
    model = load_offloaded(path, [2, 1], policy=policy, prefetch=prefetch)
    got = [r.token for r in stream_generate(model, tokenizer, "The capital of France", max_tokens=12)]
    assert got == want
    stats = model.offload.stats
    assert (stats.prefetched > 0) == prefetch and stats.prefetch_used <= stats.prefetched


def test_load_offloads_when_the_plan_says_so(layouts):
    path = layouts["stacked 4-bit"]
    p = plan(path, max_memory="1TB")
    budget = p.non_expert_bytes + p.kv_bytes + p.overhead + 5 * p.expert_bytes  # room for 5 of 8 experts
    lines = []
    model, _ = load(path, max_memory=budget, on_plan=lambda plan: lines.append(plan.line()))
    assert model.memory_plan.decision == "offload" and model.memory_plan.experts_resident == 5
    assert sum(c.num_slots for c in model.offload.caches) == 5
    assert lines and lines[0].startswith("plan: offload experts:") and "5 of 8 experts" in lines[0]
    resident, _ = load(path, max_memory="1TB")
    assert resident.offload is None and resident.memory_plan.decision == "resident"


def test_a_truncated_shard_mid_run_is_a_one_line_error(layouts, tmp_path):
    path = shutil.copytree(layouts["stacked 4-bit"], tmp_path / "m")
    model, tokenizer = load(path, expert_cache="30%")
    shard = path / "model.safetensors"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(WeightsError) as err:
        for _ in stream_generate(model, tokenizer, "The capital of France is a city", max_tokens=20):
            pass
    assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)
    assert "truncated" in str(err.value) or "ended at byte" in str(err.value)


def test_offloading_a_dense_model_is_refused(tmp_path):
    dense = add_tokenizer(make_hf_checkpoint(tmp_path / "dense", dense=True, vocab_size=32000))
    with pytest.raises(LoadError, match="does not fit"):
        load(dense, max_memory="1MB")
    with pytest.raises(ValueError, match="dense model has no experts"):
        load(dense, expert_cache="50%")


def test_slot_tensors_are_updated_in_place(tmp_path):
    """Placing an expert writes into its slot; a copy of the slot tensors would need all their
    bytes again at once."""
    hf = make_hf_checkpoint(tmp_path / "hf", num_local_experts=8, intermediate_size=256)
    path = convert(hf, tmp_path / "q4", quantize=True, q_group_size=32)
    model = load_offloaded(path, [6, 1], prefetch=False)
    cache, store = model.offload.caches[0], model.offload.store
    incoming = store.read(0, 7)
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    cache.place(7, incoming, keep=set())
    expert = sum(v.nbytes for proj in cache.slots.parameters().values() for v in proj.values()) // cache.num_slots
    assert mx.get_peak_memory() - base < 3 * expert  # the new expert and its cast, not 6 more
    assert cache.cached(7) and sum(cache.cached(e) for e in range(8)) == 6


# Memory beyond the loaded arrays that an offloading process may use: the tokenizer's tables, the
# reader's buffers and thread, the generation loop's temporaries. Measured here: 30-35 MB.
FIXED_RSS_OVERHEAD = 64 << 20

# Peak RSS from VmHWM, the high-water mark of this process image: getrusage's ru_maxrss would carry
# over the peak of the parent it was forked from (the test runner), which exec does not reset.
_MEASURE = """
import json, sys
import mlx.core as mx
from mlx_mixtral import load, stream_generate
def peak():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
mx.set_cache_limit(0)  # freed buffers go back to the system, so the peak is what was held
base = peak()
options = {"memory_check": "off"} if sys.argv[2] == "resident" else {"expert_cache": sys.argv[2]}
model, tokenizer = load(sys.argv[1], **options)
for _ in stream_generate(model, tokenizer, "The capital of France is a city with many", max_tokens=16):
    pass
print(json.dumps({"grew": peak() - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_peak_memory_of_an_offloading_process(tmp_path):
    """A process generating with 25% of the experts in memory stays within the non-expert weights +
    the expert cache + FIXED_RSS_OVERHEAD; the same model resident needs all of its experts."""
    import subprocess
    import sys

    from helpers.random_quantized import write_random_quantized

    path = write_random_quantized(tmp_path / "m", hidden=512, ffn=2048, experts=32, layers=4)

    def grew(share: str) -> int:
        run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), share], capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)["grew"]

    p = plan(path, max_memory="1TB").with_expert_cache("25%")
    cache = p.experts_resident * p.expert_bytes
    offloaded, resident = grew("25%"), grew("resident")
    assert offloaded <= p.non_expert_bytes + cache + FIXED_RSS_OVERHEAD, (offloaded, p.non_expert_bytes, cache)
    assert resident >= p.non_expert_bytes + p.parts["experts"]  # the measurement sees what is held


def test_commands_print_the_plan_and_answer_the_same_when_offloading(tmp_path_factory):
    """generate with a third of the experts in memory: the plan's line, then the resident answer;
    the server reports the expert cache in /health."""
    import subprocess
    import sys

    import httpx
    from helpers.memorized import TEXT_CONTINUATION, TEXT_PROMPT, memorized_4bit
    from helpers.server_harness import LiveServer

    path = memorized_4bit(tmp_path_factory)

    def generate(*extra):
        return subprocess.run([sys.executable, "-m", "mlx_mixtral", "generate", "--model", str(path), "--prompt",
                               TEXT_PROMPT, "--max-tokens", "12", *extra], capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    offloaded, resident = generate("--expert-cache", "30%"), generate()
    assert offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stdout == resident.stdout and TEXT_CONTINUATION.startswith(offloaded.stdout)
    lines = offloaded.stderr.splitlines()
    assert lines[0].startswith("plan: offload experts:") and resident.stderr.startswith("plan: all resident:")
    assert "| experts: hit rate " in lines[-1] and "read per token" in lines[-1]

    server = LiveServer(path, "--expert-cache", "30%")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": TEXT_PROMPT, "max_tokens": 12,
                                                               "temperature": 0}, timeout=120)  # fmt: skip
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == offloaded.stdout
        health = server.health()["offload"]
        assert health["tokens"] > 0 and 0 < health["hit_rate"] < 1 and health["bytes_read_per_token"] > 0
    finally:
        server.stop()


def test_the_kernel_probe_runs_on_an_offloaded_models_slots(layouts, monkeypatch, tmp_path):
    """On a Mac the fused kernels run on the slots of an offloaded layer: the probe (its kernels
    injected here, the pure-MLX twins) approves a geometry for each layer's slots."""
    from mlx_mixtral.metal.probe import Tuner
    from mlx_mixtral.metal.reference import TWINS

    model = load_offloaded(layouts["stacked 4-bit"], [2, 3])
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert model.set_kernels("fused", tuner=Tuner(launcher=TWINS, cache=None, device=mx.cpu)) == "fused"
    geometries = [cache.slots.fused for cache in model.offload.caches]
    assert [g.experts for g in geometries] == [2, 3]  # the slot tensors, not the checkpoint's 4 experts
