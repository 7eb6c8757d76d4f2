"""Offline quick start: the whole pipeline on a tiny Mixtral, with no download.

1. builds a tiny, randomly initialised Mixtral checkpoint with transformers, in the Hugging Face
   hub layout, with the REAL Mixtral-8x7B tokenizer (tokenizer.model.v1 shipped in mistral-common);
2. converts it to 4-bit MLX format with mlx-mixtral's converter;
3. loads it, generates from a prompt, and holds a two-turn chat that keeps its KV cache.

The weights are random, so the text is gibberish; what this shows is that every stage works.
Each chat turn re-encodes the conversation with the chat template and prefills only what the
cache does not hold yet. Gibberish answers do not re-encode to the ids that were generated, so
here the second turn also recomputes part of the first answer; a trained model's answers do
re-encode the same, and its second turn prefills only its own tokens (tests/test_chat.py).

Needs the test extra (transformers, torch, mistral-common): `pip install -e ".[test]"`, then
`python examples/quickstart_offline.py [--out DIR]`. Generated text goes to stdout, progress
and statistics to stderr. Afterwards try `mlx-mixtral chat --model DIR/mixtral-tiny-4bit`.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def build_hf_checkpoint(path: Path) -> Path:
    """A tiny MixtralForCausalLM saved by transformers, plus Mixtral's SentencePiece tokenizer."""
    import mistral_common
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    )
    MixtralForCausalLM(config).eval().save_pretrained(path)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="directory for the checkpoints (default: a temp dir)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mlx-mixtral-quickstart-"))
    out.mkdir(parents=True, exist_ok=True)

    from mlx_mixtral import ChatSession, generate, load
    from mlx_mixtral.convert import convert

    hf_dir = build_hf_checkpoint(out / "mixtral-tiny-hf")
    print(f"1. built {hf_dir}", file=sys.stderr)
    mlx_dir = convert(hf_dir, out / "mixtral-tiny-4bit", quantize=True, q_bits=4, q_group_size=64, force=True)
    print(f"2. converted to 4-bit: {mlx_dir}", file=sys.stderr)

    model, tokenizer = load(mlx_dir)
    print(
        f"3. loaded: {model.args.num_hidden_layers} layers, {model.args.num_local_experts} experts, "
        f"tokenizer {tokenizer.chat_template_name}",
        file=sys.stderr,
    )
    prompt = "The capital of France is"
    print(f"generate: {prompt}{generate(model, tokenizer, prompt, max_tokens=16)}")

    chat = ChatSession(model, tokenizer, system="You are concise.", max_tokens=16)
    for question in ["Hello, who are you?", "What can you do?"]:
        answer = "".join(chat.send(question))
        print(f"chat: {question} -> {answer}")
        print(
            f"   prefilled {chat.last.prompt_tokens} new tokens (conversation so far: "
            f"{len(chat.cached_ids)} tokens in the KV cache)",
            file=sys.stderr,
        )
    print(f"done. Try: mlx-mixtral chat --model {mlx_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
