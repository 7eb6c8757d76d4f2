"""The converter around the weights: files it writes and copies, bad input (one-line errors, no
output), a conversion killed mid-way, the command line, and the hub upload (with a fake client)."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from helpers.tiny_models import add_tokenizer, make_hf_checkpoint

from mlx_mixtral.convert import convert, parse_size
from mlx_mixtral.errors import ConvertError

SHAPE = dict(intermediate_size=128)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = add_tokenizer(make_hf_checkpoint(tmp_path_factory.mktemp("hf"), **SHAPE))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return path


@pytest.fixture
def hf_copy(tmp_path, hf_dir):
    """A private copy to break."""
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)


def test_output_files_follow_mlx_lm_format(tmp_path, hf_dir):
    out = convert(hf_dir, tmp_path / "out", quantize=True, max_shard_size="50KB")
    shards = sorted(out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 1 and [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    total, names = 0, set()
    for shard in shards:
        assert shard.stat().st_size <= 50_000 + 4096  # the limit counts tensor bytes, not the header
        with open(shard, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
        assert header_len % 8 == 0  # tensor data starts 8-byte aligned (space-padded header)
        assert header.pop("__metadata__") == {"format": "mlx"}
        for name, info in header.items():
            assert index["weight_map"][name] == shard.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
            names.add(name)
        # safetensors' own reader checks offsets are contiguous and cover the data
        from safetensors import safe_open

        with safe_open(shard, "numpy") as f:
            assert sorted(f.keys()) == sorted(header)
    assert index["metadata"]["total_size"] == total and set(index["weight_map"]) == names
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "README.md", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mlx") and "4-bit affine" in card and "bits per weight" in card
    assert leftovers(tmp_path, ".out.") == []


def test_tensor_larger_than_shard_limit_gets_its_own_file(tmp_path, hf_dir):
    out = convert(hf_dir, tmp_path / "out", max_shard_size="10KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    by_file = {}
    for name, f in index["weight_map"].items():
        by_file.setdefault(f, []).append(name)
    embed_file = index["weight_map"]["model.embed_tokens.weight"]  # 128 x 64 float32 = 32 KB
    assert by_file[embed_file] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize(
    "text, expected",
    [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("1.5GiB", 3 * 2**29), ("64kb", 64_000), (12345, 12345)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ConvertError, match="invalid shard size"):
        parse_size(text)


def _truncate(src):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    return "truncated"


def _corrupt_header(src):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _index_missing_shard(src):
    mx.save_safetensors(str(src / "model-00001-of-00002.safetensors"), dict(mx.load(str(src / "model.safetensors"))))
    weight_map = {
        k: f"model-0000{1 + (i % 2)}-of-00002.safetensors"
        for i, k in enumerate(mx.load(str(src / "model.safetensors")))
    }
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "model.safetensors").unlink()
    return "model-00002-of-00002.safetensors' .*which does not exist"


def _missing_config(src):
    (src / "config.json").unlink()
    return "no config.json or params.json"


def _int64_tensor(src):
    tensors = dict(mx.load(str(src / "model.safetensors")))
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].astype(
        mx.int64
    )
    mx.save_safetensors(str(src / "model.safetensors"), tensors)
    return "'model.layers.0.self_attn.q_proj.weight' has dtype I64, which cannot be converted"


def _unknown_model_type(src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    return "unsupported model_type 'llama'"


def _wrong_shape(src):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    return "has shape .* config.json implies"


def _missing_tensor(src):
    tensors = dict(mx.load(str(src / "model.safetensors")))
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), tensors)
    return "lacks tensor 'model.layers.1.post_attention_layernorm.weight'"


BREAKAGES = [
    _truncate,
    _corrupt_header,
    _index_missing_shard,
    _missing_config,
    _int64_tensor,
    _unknown_model_type,
    _wrong_shape,
    _missing_tensor,
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_bad_sources_fail_with_one_line_and_leave_nothing(tmp_path, hf_copy, breakage):
    message = breakage(hf_copy)
    with pytest.raises(ConvertError, match=message) as e:
        convert(hf_copy, tmp_path / "out", quantize=True)
    assert "\n" not in str(e.value)
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dtype="float64"), "unsupported dtype 'float64'"),
        (dict(quantize=True, q_bits=7), "unsupported bits 7"),
        (dict(quantize=True, q_group_size=16), "unsupported group size 16"),
        (dict(quantize=True, q_mode="int4"), "unsupported quantization mode 'int4'"),
        (dict(quantize=True, q_mode="nvfp4", q_group_size=32), "mode 'nvfp4' uses 4 bits with group size 16"),
        (dict(recipe="mixed_9_9"), "unknown recipe 'mixed_9_9'"),
        (dict(recipe="mixed_3_6", q_mode="mxfp4"), "only mode 'affine' allows"),
        (dict(quantize=True, dequantize=True), "either quantize or dequantize"),
        (dict(max_shard_size="lots"), "invalid shard size 'lots'"),
    ],
)
def test_bad_options_fail_with_one_line(tmp_path, hf_dir, kwargs, message):
    with pytest.raises(ConvertError, match=message):
        convert(hf_dir, tmp_path / "out", **kwargs)
    assert leftovers(tmp_path, "out") == []


def test_existing_destination_needs_force(tmp_path, hf_dir):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        convert(hf_dir, dst)
    assert (dst / "keep.txt").is_file()
    convert(hf_dir, dst, force=True, quantize=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert leftovers(tmp_path, ".out.") == []
    with pytest.raises(ConvertError, match="the destination is the source"):
        convert(dst, dst, force=True)
    with pytest.raises(ConvertError, match="the destination holds the source"):
        convert(dst, tmp_path, force=True)
    assert (dst / "config.json").is_file()
    assert (convert(dst, tmp_path / "resharded") / "config.json").is_file()


def test_hub_id_resolves_through_the_hub_cache(tmp_path, hf_dir, monkeypatch):
    """A hub id is found in huggingface-hub's cache layout (models--org--name/snapshots/<commit>)
    offline; the model card then names it as the base model."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConvertError, match="^someone/tiny-mixtral: not in the local hub cache"):
        convert("someone/tiny-mixtral", tmp_path / "out")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-mixtral"
    shutil.copytree(hf_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = convert("someone/tiny-mixtral", tmp_path / "out", quantize=True)
    assert (out / "tokenizer.model").is_file()
    assert "base_model: someone/tiny-mixtral" in (out / "README.md").read_text()


_KILLED_SCRIPT = """
import sys, time
from mlx_mixtral.convert import convert

def stop_midway(p):
    if p.done == 2:  # embeddings and layer 0 are on disk, the rest is not
        print("MIDWAY", flush=True)
        time.sleep(600)

convert(sys.argv[1], sys.argv[2], quantize=True, max_shard_size="20KB", progress=stop_midway)
"""


def test_killed_conversion_leaves_no_destination(tmp_path, hf_dir):
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SCRIPT, str(hf_dir), str(dst)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "MIDWAY"
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partial) == 1 and list(partial[0].glob("model-*.safetensors"))  # really mid-way
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not dst.exists()
    # The next conversion to the same place succeeds and clears the dead run's partial directory.
    convert(hf_dir, dst, quantize=True)
    assert (dst / "config.json").is_file()
    assert leftovers(tmp_path, "out") == ["out"]


def test_interrupted_or_failed_write_leaves_nothing(tmp_path, hf_dir, monkeypatch):
    def interrupt(p):
        if p.done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(hf_dir, tmp_path / "out", progress=interrupt)
    assert leftovers(tmp_path, "out") == []

    from mlx_mixtral.convert import shards

    def disk_full(self, name, array):
        raise OSError(28, "No space left on device", str(tmp_path / "x.safetensors"))

    monkeypatch.setattr(shards.ShardWriter, "write", disk_full)
    with pytest.raises(ConvertError, match="x.safetensors: No space left on device"):
        convert(hf_dir, tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_mixtral.convert", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_cli_converts_and_reports_on_stderr(tmp_path, hf_dir):
    dst = tmp_path / "cli"
    r = _cli("--hf-path", str(hf_dir), "--mlx-path", str(dst), "-q", "--q-bits", "8", "--q-group-size", "32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(dst)
    assert "8-bit affine, group size 32" in r.stderr and "bits per weight" in r.stderr
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 8

    again = _cli("--hf-path", str(hf_dir), "--mlx-path", str(dst))
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_mlx_mixtral_dispatcher_runs_convert(tmp_path, hf_dir):
    from mlx_mixtral.cli import main

    assert (
        main(
            [
                "convert",
                "--hf-path",
                str(hf_dir),
                "--mlx-path",
                str(tmp_path / "d"),
                "--recipe",
                "mixed_3_6",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "d" / "config.json").read_text())["quantization"]["lm_head"]["bits"] == 6


class FakeHfApi:
    calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        self.calls.append(("upload_folder", kwargs["repo_id"], sorted(p.name for p in folder.iterdir())))


def test_upload_goes_through_huggingface_hub(tmp_path, hf_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    FakeHfApi.calls = []
    out = convert(hf_dir, tmp_path / "up", quantize=True, upload_repo="someone/tiny-mixtral-4bit")
    (create, repo, kwargs), (upload, repo2, files) = FakeHfApi.calls
    assert (create, repo, kwargs["exist_ok"]) == ("create_repo", "someone/tiny-mixtral-4bit", True)
    assert (upload, repo2) == ("upload_folder", "someone/tiny-mixtral-4bit")
    assert {"config.json", "model.safetensors", "model.safetensors.index.json", "README.md"} <= set(files)
    assert "someone/tiny-mixtral-4bit" in (out / "README.md").read_text()


def test_failed_upload_keeps_the_model_and_says_so(tmp_path, hf_dir, monkeypatch):
    import huggingface_hub

    class Offline(FakeHfApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("network unreachable\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(ConvertError, match="converted, but the upload to 'a/b' failed \\(network unreachable\\)$"):
        convert(hf_dir, tmp_path / "up", upload_repo="a/b")
    assert (tmp_path / "up" / "config.json").is_file()


def test_partial_directory_of_a_live_process_is_left_alone(tmp_path, hf_dir):
    live = tmp_path / f".out.partial-{os.getpid()}-abc"
    live.mkdir()
    convert(hf_dir, tmp_path / "out")
    assert live.is_dir()
