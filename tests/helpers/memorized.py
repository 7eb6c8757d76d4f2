"""A tiny Mixtral trained in MLX (seconds on the CPU) to memorize a text and a chat transcript,
saved as a Hugging Face checkpoint with the real Mixtral tokenizer.

Random-weight models babble byte pieces whose text does not re-encode to the same ids; this
one answers in canonical tokens, so tests can check exact text and exact prefill counts.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from helpers.tiny_models import add_tokenizer
from mlx_mixtral.config import ModelArgs
from mlx_mixtral.model import Mixtral
from mlx_mixtral.tokenizer import load_tokenizer

# The truth text: "the" is followed by different words, so attention and positions must carry
# the context; a model that only learned bigrams cannot reproduce it.
TEXT_PROMPT = "The cat sat on the mat and"
TEXT_CONTINUATION = " the dog sat on the log, while the bird sang in the tree."

TRANSCRIPT = [
    {"role": "user", "content": "What is Mixtral?"},
    {"role": "assistant", "content": "A sparse mixture of experts model."},
    {"role": "user", "content": "How many experts does it use?"},
    {"role": "assistant", "content": "Eight experts, two for each token."},
]

CONFIG = dict(
    model_type="mixtral",
    vocab_size=32000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def training_sequences(tokenizer) -> list[list[int]]:
    return [
        tokenizer.encode(TEXT_PROMPT + TEXT_CONTINUATION, add_special_tokens=True),
        tokenizer.apply_chat_template(TRANSCRIPT, add_generation_prompt=False),
    ]


def train(sequences: list[list[int]], *, seed: int = 0, max_steps: int = 300) -> tuple[Mixtral, int]:
    """Adam on next-token cross-entropy until every position's argmax is right with a margin
    (loss < 0.02). The embedding stays at its random init: it is 2M of the 2.5M parameters and
    training it only slows the steps down. Returns the model and the steps taken."""
    mx.random.seed(seed)
    model = Mixtral(ModelArgs.from_dict(CONFIG))
    model.model.embed_tokens.freeze()
    batch = [mx.array(s)[None] for s in sequences]

    # Targets from position 2 on: both sequences start with BOS, so what follows it is ambiguous.
    def loss_fn(m):
        losses = [nn.losses.cross_entropy(m(x[:, :-1])[:, 1:], x[:, 2:]).mean() for x in batch]
        return sum(losses) / len(losses)

    step_fn = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=3e-3)
    for step in range(1, max_steps + 1):
        loss, grads = step_fn(model)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if loss.item() < 0.02:
            return model, step
    raise AssertionError(f"did not memorize the text in {max_steps} steps (loss {loss.item():.3f})")


def save_hf(model: Mixtral, path: Path) -> Path:
    """Write the model as transformers' MixtralForCausalLM checkpoint: per-expert
    `experts.{e}.w1/w2/w3` (gate/down/up) matrices, not this package's stacked tensors."""
    hf_names = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    tensors = {}
    for name, value in tree_flatten(model.parameters()):
        if ".switch_mlp." in name:
            prefix, rest = name.split(".switch_mlp.")
            proj, kind = rest.split(".")
            for e in range(value.shape[0]):
                tensors[f"{prefix}.experts.{e}.{hf_names[proj]}.{kind}"] = value[e]
        else:
            tensors[name] = value
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), tensors, metadata={"format": "pt"})
    config = {**CONFIG, "architectures": ["MixtralForCausalLM"], "hidden_act": "silu", "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return add_tokenizer(path)


def memorized_hf(tmp_path_factory) -> Path:
    """The trained checkpoint in Hugging Face format (trained once per test session)."""
    return _memorized(str(tmp_path_factory.getbasetemp() / "memorized"))[0]


def memorized_4bit(tmp_path_factory) -> Path:
    """The same model converted by this package's converter to 4-bit (group 64) MLX format."""
    return _memorized(str(tmp_path_factory.getbasetemp() / "memorized"))[1]


def training_steps(tmp_path_factory) -> int:
    return _memorized(str(tmp_path_factory.getbasetemp() / "memorized"))[2]


@functools.cache
def _memorized(root: str) -> tuple[Path, Path, int]:
    from mlx_mixtral.convert import convert

    root_dir = Path(root)
    root_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(add_tokenizer(root_dir))
    model, steps = train(training_sequences(tokenizer))
    hf_dir = save_hf(model, root_dir / "hf")
    return hf_dir, convert(hf_dir, root_dir / "mlx-4bit", quantize=True, q_bits=4, q_group_size=64), steps
