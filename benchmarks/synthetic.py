"""Write a random Mixtral-shaped checkpoint in the Hugging Face hub format, sized by flags.

    python benchmarks/synthetic.py OUT_DIR --hidden 1024 --ffn 3584 --experts 8 --layers 8

The directory holds what a hub Mixtral repository holds: `config.json` (MixtralForCausalLM),
`model-0000i-of-0000n.safetensors` shards with per-expert `block_sparse_moe.experts.{e}.w{1,2,3}`
names plus `model.safetensors.index.json`, `generation_config.json`, and Mixtral-8x7B's real
SentencePiece `tokenizer.model` (from mistral-common, found through tests/tiny_models.py), so the
vocabulary is 32000. Weights are random bfloat16 (normal, std 0.02 as transformers' init), written
a few layers at a time so building a large one needs little memory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VOCAB = 32000  # Mixtral-8x7B's tokenizer.model.v1


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    ffn: int = 896
    experts: int = 8
    top_k: int = 2
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vocab: int = VOCAB

    def config(self) -> dict:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_local_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "max_position_embeddings": 32768,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }

    def tag(self) -> str:
        return f"h{self.hidden}-f{self.ffn}-e{self.experts}k{self.top_k}-l{self.layers}"


def _layer(i: int, s: Shape) -> dict:
    import mlx.core as mx

    def rand(*shape):
        return (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)

    head_dim = s.hidden // s.heads
    p = f"model.layers.{i}"
    t = {
        f"{p}.self_attn.q_proj.weight": rand(s.heads * head_dim, s.hidden),
        f"{p}.self_attn.k_proj.weight": rand(s.kv_heads * head_dim, s.hidden),
        f"{p}.self_attn.v_proj.weight": rand(s.kv_heads * head_dim, s.hidden),
        f"{p}.self_attn.o_proj.weight": rand(s.hidden, s.heads * head_dim),
        f"{p}.input_layernorm.weight": mx.ones((s.hidden,), mx.bfloat16),
        f"{p}.post_attention_layernorm.weight": mx.ones((s.hidden,), mx.bfloat16),
        f"{p}.block_sparse_moe.gate.weight": rand(s.experts, s.hidden),
    }
    for e in range(s.experts):  # HF names: w1 gate, w2 down, w3 up
        t[f"{p}.block_sparse_moe.experts.{e}.w1.weight"] = rand(s.ffn, s.hidden)
        t[f"{p}.block_sparse_moe.experts.{e}.w2.weight"] = rand(s.hidden, s.ffn)
        t[f"{p}.block_sparse_moe.experts.{e}.w3.weight"] = rand(s.ffn, s.hidden)
    return t


def write_checkpoint(path: str | Path, shape: Shape = Shape(), *, seed: int = 0, layers_per_shard: int = 2) -> Path:
    """Build the checkpoint at `path` (atomically: a `.building` dir renamed at the end).
    An existing complete checkpoint of the same shape is reused; another shape is an error."""
    import mlx.core as mx

    path = Path(path)
    if (path / "model.safetensors.index.json").is_file():
        existing = json.loads((path / "config.json").read_text())
        if existing != shape.config():
            raise ValueError(f"{path}: holds a checkpoint of another shape; remove it or choose another dir")
        return path
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise ValueError(
            f"hidden {shape.hidden} / heads {shape.heads} / kv_heads {shape.kv_heads}: "
            f"hidden must divide by heads and heads by kv_heads"
        )
    tmp = path.with_name(path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.random.seed(seed)
    count = -(-shape.layers // layers_per_shard)
    weight_map, total = {}, 0
    for s in range(count):
        tensors = {}
        for i in range(s * layers_per_shard, min(shape.layers, (s + 1) * layers_per_shard)):
            tensors.update(_layer(i, shape))
        if s == 0:
            tensors["model.embed_tokens.weight"] = (0.02 * mx.random.normal((shape.vocab, shape.hidden))).astype(
                mx.bfloat16
            )
        if s == count - 1:
            tensors["model.norm.weight"] = mx.ones((shape.hidden,), mx.bfloat16)
            tensors["lm_head.weight"] = (0.02 * mx.random.normal((shape.vocab, shape.hidden))).astype(mx.bfloat16)
        name = f"model-{s + 1:05d}-of-{count:05d}.safetensors"
        mx.eval(tensors)
        mx.save_safetensors(str(tmp / name), tensors, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(v.nbytes for v in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(shape.config(), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.tiny_models import mistral_tokenizer_path

    shutil.copy(mistral_tokenizer_path("v1"), tmp / "tokenizer.model")
    shutil.rmtree(path, ignore_errors=True)  # a partial dir from an interrupted older run
    tmp.rename(path)
    return path


def add_shape_flags(parser: argparse.ArgumentParser) -> None:
    d = Shape()
    parser.add_argument("--hidden", type=int, default=d.hidden, help="hidden size D")
    parser.add_argument("--ffn", type=int, default=d.ffn, help="expert FFN size F")
    parser.add_argument("--experts", type=int, default=d.experts, help="experts per layer E")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="experts per token K")
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--heads", type=int, default=d.heads, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=d.kv_heads, help="key/value heads")


def shape_from_args(args: argparse.Namespace) -> Shape:
    return Shape(
        hidden=args.hidden,
        ffn=args.ffn,
        experts=args.experts,
        top_k=args.top_k,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to create")
    add_shape_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = shape_from_args(args)
    path = write_checkpoint(args.out, shape, seed=args.seed)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {shape.tag()} {json.dumps(asdict(shape))}, {size / 1e9:.2f} GB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
