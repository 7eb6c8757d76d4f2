"""The model card (README.md) of a converted directory, size statistics, and hub upload."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_mixtral.convert.source import Source
from mlx_mixtral.errors import ConvertError
from mlx_mixtral.text import argv_text
from mlx_mixtral.weights import INDEX_NAME


def model_stats(model_dir: Path) -> dict:
    """Size, shard count and bits per weight (stored bytes * 8 / parameters, counting packed
    weights, scales and biases, as mlx-lm reports it) of a converted directory."""
    meta = json.loads((model_dir / INDEX_NAME).read_text())
    size, params = meta["metadata"]["total_size"], meta["metadata"]["total_parameters"]
    return {
        "total_size": size,
        "total_parameters": params,
        "shards": len(set(meta["weight_map"].values())),
        "bits_per_weight": size * 8 / params,
    }


def describe_quantization(config: dict) -> str:
    q = config.get("quantization")
    if not q:
        return f"not quantized ({config.get('torch_dtype') or config.get('dtype') or 'as stored'})"
    overrides = [v for k, v in q.items() if isinstance(v, dict)]
    kept = sum(1 for v in q.values() if v is False)
    text = f"{q['bits']}-bit {q.get('mode', 'affine')}, group size {q['group_size']}"
    if overrides:
        bits = sorted({v["bits"] for v in overrides})
        text += f"; {len(overrides)} modules at {'/'.join(map(str, bits))} bits"
    if kept:
        text += f"; {kept} modules (MoE routers, ...) kept in floating point"
    return text


def write_model_card(model_dir: Path, source: Source, *, name: str, hub_id: str | None = None) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    stats = model_stats(model_dir)
    family = "mixtral" if source.args.is_moe else "mistral"
    if source.repo_id:
        origin = f"[{source.repo_id}](https://huggingface.co/{source.repo_id})"
    else:
        origin = f"`{argv_text(source.path.name)}`"
    name = argv_text(hub_id or name)  # directory names are the OS's bytes; the card is UTF-8 text
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation", f"tags:\n- mlx\n- {family}"]
    if source.repo_id:
        front.append(f"base_model: {source.repo_id}")
    front.append("---")
    body = f"""
# {name}

{origin} converted to MLX format with mlx-mixtral.

- Weights: {describe_quantization(config)}
- {stats["bits_per_weight"]:.2f} bits per weight, {stats["total_size"] / 1e9:.2f} GB in {stats["shards"]} file(s)

## Use

```bash
pip install mlx-mixtral
mlx-mixtral generate --model {name} --prompt "Hello"
```

The files follow mlx-lm's layout, so `mlx_lm.generate --model {name}` loads them too.
"""
    (model_dir / "README.md").write_text("\n".join(front) + "\n" + body)


def upload(model_dir: Path, repo_id: str) -> None:
    """Create (if needed) the hub model repository and upload the directory to it."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(model_dir),
            repo_type="model",
            commit_message="Upload MLX model converted with mlx-mixtral",
        )
    except Exception as e:  # hub and network errors come in many types; report them in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{model_dir}: converted, but the upload to {repo_id!r} failed ({first})") from None
