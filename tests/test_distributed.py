"""One model sharded over 2 and 3 processes (mx.distributed, ring backend over 127.0.0.1, started by
mlx.launch) gives the tokens and logits of one process; failures end every rank with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.distributed_worker import PROMPT, greedy
from helpers.launch import ring_ports, run_launched
from helpers.tiny_models import make_hf_checkpoint
from mlx.utils import tree_flatten

from mlx_mixtral import load_model

WORKER = Path(__file__).parent / "helpers" / "distributed_worker.py"
LAUNCH_TIMEOUT = 120
# Float32 sums split over ranks differ from one process's by rounding only (~1e-7 relative); a
# wrong head, group or expert slice changes logits by 1e-1 or more.
REL_TOL = 1e-5

# 6 query / 3 KV heads of 16 dims and F = 96 = 3 groups of 32: splits over 3 ranks evenly and
# over 2 ranks unevenly (2 + 1 KV heads, 64 + 32 of F).
SPLITTABLE = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, head_dim=16, intermediate_size=96)


def _launch(n: int, out: Path, models: str, *extra: str) -> subprocess.CompletedProcess:
    return run_launched(n, str(WORKER), str(out), models, *extra, timeout=LAUNCH_TIMEOUT, cwd=WORKER.parent)


def _rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out, np.float64) - ref).max() / np.abs(ref).max())


def _check_matches_one_process(model_dir: Path, n: int, tmp_path: Path) -> str:
    out = tmp_path / f"out{n}"
    out.mkdir()
    run = _launch(n, out, str(model_dir))
    assert (out / "rank0.npz").is_file(), run.stderr
    got = np.load(out / "rank0.npz")
    ref = list(greedy(load_model(model_dir), PROMPT, 6))
    assert got["tokens"].tolist() == [it["token"] for it in ref]
    assert _rel_err(got["prefill"], ref[0]["logits"]) < REL_TOL
    assert _rel_err(got["steps"], np.stack([it["logits"][-1] for it in ref])) < REL_TOL
    return run.stderr


def _save_quantized(src: Path, dst: Path, group_size: int = 32, bits: int = 4) -> Path:
    """An MLX-format 4-bit model dir (mlx-lm's layout: stacked experts, `quantization` in config)."""
    model = load_model(src)
    nn.quantize(model, group_size, bits)
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory):
    hf = make_hf_checkpoint(tmp_path_factory.mktemp("hf_split"), seed=3, **SPLITTABLE)
    return _save_quantized(hf, tmp_path_factory.mktemp("q4") / "model")


def test_two_ranks_match_one_process_hf_float32(tiny_hf_dir, tmp_path):
    log = _check_matches_one_process(tiny_hf_dir, 2, tmp_path)
    assert "rank 1/2: KV heads 1:2 (query heads 2:4), F 48:96 of 96" in log


@pytest.mark.parametrize("n", [2, 3])
def test_quantized_4bit_uneven_and_even_splits_match_one_process(quantized_dir, tmp_path, n):
    log = _check_matches_one_process(quantized_dir, n, tmp_path)
    expected = {
        2: "rank 1/2: KV heads 2:3 (query heads 4:6), F 64:96 of 96",
        3: "rank 2/3: KV heads 2:3 (query heads 4:6), F 64:96 of 96",
    }[n]
    assert expected in log


def test_fewer_kv_heads_than_ranks_replicates_attention(tiny_hf_dir, tmp_path):
    log = _check_matches_one_process(tiny_hf_dir, 3, tmp_path)  # 2 KV heads, 3 ranks
    assert "rank 2/3: all 4 heads (2 KV heads for 3 ranks: attention replicated on every rank), F 64:96" in log


def test_dense_mistral_two_ranks(tmp_path):
    model_dir = make_hf_checkpoint(tmp_path / "dense", dense=True, seed=4, sliding_window=6)
    _check_matches_one_process(model_dir, 2, tmp_path)


def _start_by_hand(
    n: int, out: Path, models: str, *extra: str, env: dict | None = None, rank_env: dict[int, dict] | None = None
) -> list[subprocess.Popen]:
    """Start ranks the way mlx.launch does (MLX_HOSTFILE + MLX_RANK) but without its supervision,
    so only our own failure handling can end them."""
    base = ring_ports(n)
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(n)]))
    return [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), models, *extra],
            cwd=WORKER.parent,
            env={
                **os.environ,
                "MLX_HOSTFILE": str(hostfile),
                "MLX_RANK": str(r),
                **(env or {}),
                **(rank_env or {}).get(r, {}),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 60) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_rank_that_dies_ends_the_others_with_a_clear_message(tiny_hf_dir, tmp_path):
    (rc0, err0), (rc1, err1) = _finish(_start_by_hand(2, tmp_path, str(tiny_hf_dir), "--die", "1:2"))
    assert rc1 == 5 and "simulated crash" in err1
    assert rc0 == 1
    assert "rank 0: lost the connection to another rank while" in err0.strip().splitlines()[-1]


def test_rank_that_dies_under_mlx_launch(tiny_hf_dir, tmp_path):
    run = _launch(2, tmp_path, str(tiny_hf_dir), "--die", "1:2")
    assert "simulated crash" in run.stderr
    assert not (tmp_path / "rank0.npz").exists()


def test_hung_rank_ends_the_others_after_the_timeout(tiny_hf_dir, tmp_path):
    # Only rank 0 has the short limit: the hung rank's own watchdog must not end it first.
    procs = _start_by_hand(
        2, tmp_path, str(tiny_hf_dir), "--hang", "1:2", rank_env={0: {"MLX_MIXTRAL_DIST_TIMEOUT": "3"}}
    )
    start = time.monotonic()
    rc0, err0 = _finish(procs[:1])[0]
    assert time.monotonic() - start < 45
    procs[1].kill()  # the hung rank
    procs[1].communicate()
    assert rc0 == 3, err0
    assert "rank 0: no answer from the other ranks for 3 s while" in err0


def test_missing_peer_at_start_times_out(tiny_hf_dir, tmp_path):
    procs = _start_by_hand(2, tmp_path, str(tiny_hf_dir), env={"MLX_MIXTRAL_DIST_TIMEOUT": "3"})
    procs[1].kill()  # rank 1 never joins
    procs[1].communicate()
    rc0, err0 = _finish(procs[:1])[0]
    assert rc0 != 0
    assert "rank 0: the other ranks did not connect within 3 s" in err0


def test_mismatched_model_dirs_are_refused_on_every_rank(tiny_hf_dir, tmp_path):
    other = make_hf_checkpoint(tmp_path / "other", seed=9)  # same config, different weights
    (rc0, err0), (rc1, err1) = _finish(_start_by_hand(2, tmp_path, f"{tiny_hf_dir},{other}"))
    assert (rc0, rc1) == (1, 1)
    for rank, err in enumerate((err0, err1)):
        assert f"rank {rank}: the model directory differs between ranks (ranks [1] do not match rank 0" in err


def test_ranks_that_generate_different_tokens_stop_with_a_clear_message(tiny_hf_dir, tmp_path):
    (rc0, err0), (rc1, err1) = _finish(_start_by_hand(2, tmp_path, str(tiny_hf_dir), "--diverge"))
    assert rc1 == 1
    assert "rank 1: generated token 8 where rank 0 generated 7; the ranks diverged" in err1
    assert rc0 == 1 and "rank 0: lost the connection to another rank" in err0


def test_distributed_model_generate_and_chat_match_one_process(tmp_path):
    """The library behind `--distributed`: sampled generation (seeded, and seeded by rank 0), a chat
    whose second turn is cut short, and server requests through a prefix cache give what one
    process gives."""
    from helpers.distributed_api_worker import SEEDED_CHAT, run_chat
    from helpers.tiny_models import add_tokenizer

    from mlx_mixtral.chat import ChatSession
    from mlx_mixtral.generate import stream_generate
    from mlx_mixtral.tokenizer import load_tokenizer

    model_dir = add_tokenizer(make_hf_checkpoint(tmp_path / "m", vocab_size=32000, seed=5))
    worker = WORKER.with_name("distributed_api_worker.py")
    run = run_launched(2, str(worker), str(tmp_path), str(model_dir), timeout=LAUNCH_TIMEOUT, cwd=WORKER.parent)
    assert (tmp_path / "api.json").is_file(), run.stderr
    got = json.loads((tmp_path / "api.json").read_text())
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    sampled = stream_generate(
        model, tokenizer, "The capital of France", max_tokens=8, temperature=0.9, top_k=20, seed=11
    )
    assert got["sampled"] == [r.token for r in sampled]
    assert len(got["unseeded"]) == 6
    assert got["chat"] == json.loads(json.dumps(run_chat(ChatSession(model, tokenizer, temperature=0.0))))
    assert got["seeded_chat"] == json.loads(json.dumps(run_chat(ChatSession(model, tokenizer, **SEEDED_CHAT))))
    assert got["served"] == _served_by_one_process(model, tokenizer)
    assert [r["cached"] for r in got["served"]] == [0, 4, 2]  # the stopped request's cache was kept


def _served_by_one_process(model, tokenizer) -> list[dict]:
    """What the server's single-process worker does: take, generate, put back (also when stopped)."""
    from helpers.distributed_api_worker import SERVED

    from mlx_mixtral.generate import stream_generate
    from mlx_mixtral.prefix_cache import PrefixCache

    prefix_cache, out = PrefixCache(model.make_cache, 2), []
    for i, ids in enumerate(SERVED):
        cache, kept = prefix_cache.take(ids)
        fed, tokens = list(ids), []
        for r in stream_generate(model, tokenizer, ids[kept:], cache=cache, max_tokens=4):
            fed.append(r.token)
            tokens.append(r.token)
            if i == 0 and len(tokens) == 2:
                break
        prefix_cache.put(cache, fed)
        out.append({"tokens": tokens, "cached": kept})
    return out
