"""Smoke tests of the benchmarks (no timing asserts) and of the decode-step accounting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY = [
    "--hidden",
    "64",
    "--ffn",
    "128",
    "--experts",
    "4",
    "--top-k",
    "2",
    "--layers",
    "2",
    "--heads",
    "4",
    "--kv-heads",
    "2",
]


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """One run of benchmarks/vs_mlx_lm.py on a tiny synthetic model: (results dict, stdout, out dir)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import vs_mlx_lm
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path_factory.mktemp("speed")
    capture = tmp_path_factory.mktemp("stdout") / "table.txt"
    saved = sys.stdout
    with open(capture, "w") as f:
        sys.stdout = f
        try:
            assert (
                vs_mlx_lm.main(
                    TINY
                    + [
                        "--quants",
                        "4bit,bf16",
                        "--prompt-lengths",
                        "8,20",
                        "--decode-tokens",
                        "2",
                        "--reps",
                        "1",
                        "--host-reps",
                        "1",
                        "--out",
                        str(out),
                    ]
                )
                == 0
            )
        finally:
            sys.stdout = saved
    run_dir = out / "h64-f128-e4k2-l2"
    return json.loads((run_dir / "results.json").read_text()), capture.read_text(), run_dir


def test_side_by_side_runs_both_packages_and_logits_match_mlx_lm(side_by_side):
    results, table, run_dir = side_by_side
    by_quant = {r["quant"]: r for r in results["results"]}
    q4 = by_quant["4bit"]
    assert [c["prompt_tokens"] for c in q4["cases"]] == [8, 20]
    for case in q4["cases"]:
        for name in ("mlx-mixtral", "mlx-lm"):
            assert case[name]["prefill_tps"] > 0 and case[name]["decode_tps"] > 0 and case[name]["peak_gb"] > 0
    # Same converted weights computed in float32 by both: only summation order differs.
    assert q4["logits"]["both in float32"]["max_abs_diff"] < 1e-4
    assert q4["logits"]["both in float32"]["argmax_agree"] == 1.0
    assert by_quant["bf16"]["logits"]["both in float32"]["max_abs_diff"] < 1e-4
    if mx.default_device() == mx.cpu:  # mlx-lm's bf16 MoE needs gather_mm in bf16, which the CPU lacks
        assert "GatherMM" in by_quant["bf16"]["errors"]["mlx-lm"]
        assert "mlx-lm cannot run this model here" in table
    assert "prefill @20" in table and "decode @8" in table
    assert (run_dir / "results.png").stat().st_size > 0


def test_accounting_matches_minimum_computed_from_the_config(side_by_side):
    from mlx_mixtral.bench import accounting
    from mlx_mixtral.loader import load_model

    _, _, run_dir = side_by_side
    model = load_model(run_dir / "4bit")
    a = model.args
    cache = accounting.prefill_cache(model, model.make_cache(), 5)
    got = accounting.account_decode_step(model, cache, host_reps=1)
    assert cache[0].offset == 5  # the cache is left as it was

    # Independent count: 4-bit affine, group 64, float32 scales+biases on the CPU (loader policy).
    itemsize = model.model.norm.weight.dtype.size

    def q(out_dim, in_dim):
        return out_dim * in_dim // 2 + 2 * out_dim * (in_dim // 64) * itemsize

    d, f, kv = a.hidden_size, a.intermediate_size, a.num_key_value_heads * a.head_dim
    attention = q(d, d) * 2 + q(kv, d) * 2
    router = a.num_local_experts * d * itemsize
    experts = a.num_experts_per_tok * (2 * q(f, d) + q(d, f))
    embedding_row = q(1, d)
    head = q(a.vocab_size, d)
    norms = (2 * a.num_hidden_layers + 1) * d * itemsize
    expected = a.num_hidden_layers * (attention + router + experts) + embedding_row + head + norms
    assert got.weights.minimum == expected
    assert got.weights.bytes_read == expected and got.weights.ratio == 1.0
    assert got.primitives > got.primitives_per_layer * a.num_hidden_layers > 0
    assert got.host_ms > 0


def test_accounting_catches_an_ungathered_expert_read(side_by_side, monkeypatch):
    """Dequantizing every expert before the gathered matmul reads all E experts: the count must show it."""
    from mlx_mixtral.bench import accounting
    from mlx_mixtral.experts import QuantizedSwitchLinear
    from mlx_mixtral.loader import load_model

    def dequantize_all(self, x, indices, sorted_indices=False):
        w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits)  # (E, out, in)
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)

    _, _, run_dir = side_by_side
    model = load_model(run_dir / "4bit")
    monkeypatch.setattr(QuantizedSwitchLinear, "__call__", dequantize_all)
    cache = accounting.prefill_cache(model, model.make_cache(), 5)
    got = accounting.account_decode_step(model, cache, host_reps=1)
    read, least = got.weights.by_kind["experts"]
    # at least all E experts instead of K (the CPU's dequantize may read the packed words once per nibble)
    assert read >= least * model.args.num_local_experts // model.args.num_experts_per_tok
    assert got.weights.ratio > 1.02
    assert any(
        s.startswith("model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight by ")
        for s in got.weights.full_reads_of_gathered
    )


def test_parse_dot_counts_primitives_and_readers():
    from mlx_mixtral.bench.accounting import trace

    a, b, c = mx.array([1.0]), mx.array([2.0]), mx.array([3.0])
    g = trace([(a + b) * c], {"a": a, "b": b, "c": c})
    assert sorted(g.counts().elements()) == ["Add", "Multiply"]
    assert [g.primitives[p] for p in g.readers["a"]] == ["Add"]
    assert [g.primitives[p] for p in g.readers["c"]] == ["Multiply"]


def test_bench_command_prints_a_table_and_the_roofline(side_by_side, tmp_path, capsys):
    from mlx_mixtral.cli import main

    _, _, run_dir = side_by_side
    out_json = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                str(run_dir / "4bit"),
                "--prompt-lengths",
                "6,12",
                "--decode-tokens",
                "2",
                "--reps",
                "1",
                "--bandwidth",
                "100",
                "--json",
                str(out_json),
                "--plot",
                str(tmp_path / "b.png"),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "% roofline" in stdout.splitlines()[0] and len(stdout.splitlines()) == 3
    result = json.loads(out_json.read_text())
    assert result["bandwidth_gbs"] == 100 and result["decode_step"]["ratio"] == 1.0
    a = result["decode_step"]
    for run in result["runs"]:
        # roofline = bandwidth / (weights + KV cache read at that context), from the traced bytes
        assert run["roofline_tps"] < 100e9 / a["minimum_bytes"]
        assert run["roofline_pct"] == pytest.approx(100 * run["decode_tps"] / run["roofline_tps"])
    assert (tmp_path / "b.png").stat().st_size > 0


def test_bench_command_rejects_bad_lengths(capsys):
    from mlx_mixtral.cli import main

    assert main(["bench", "--model", "x", "--prompt-lengths", "12,abc"]) == 2
    assert capsys.readouterr().err == (
        "mlx-mixtral bench: error: argument --prompt-lengths: '12,abc': expected comma-separated integers "
        "(see 'mlx-mixtral bench --help')\n"
    )


def test_chip_bandwidth_table():
    from mlx_mixtral.bench.timing import chip_bandwidth

    assert chip_bandwidth("Apple M2 Max") == 400
    assert chip_bandwidth("Apple M2") == 100
    assert chip_bandwidth("Apple M4 Pro") == 273
    assert chip_bandwidth("AMD EPYC") is None


def test_kernel_comparison_probes_the_model_own_layer(side_by_side, monkeypatch):
    from mlx_mixtral.bench.timing import fused_vs_builtin
    from mlx_mixtral.loader import load_model
    from mlx_mixtral.metal.probe import Tuner
    from mlx_mixtral.metal.reference import TWINS

    _, _, run_dir = side_by_side
    model = load_model(run_dir / "4bit")
    if not mx.metal.is_available():
        assert "Metal" in fused_vs_builtin(model)["skipped"]
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)  # as on a Mac, with the twins as kernels
    summary = fused_vs_builtin(model, Tuner(launcher=TWINS, cache=None, device=mx.cpu))
    assert summary["geometry"] == "float32/g64/4bit/down:g64/4bit/D64/F128/E4/K2"  # the model's own experts
    assert summary["max_error"] == 0.0 and summary["fused_us"] > 0 and summary["builtin_us"] > 0
