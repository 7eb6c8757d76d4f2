"""Speculative decoding: decode speed plain vs prompt lookup vs a draft model, acceptance rates,
and what verifying costs a MoE target (one forward over 1, 2, ..., K+1 tokens).

    python benchmarks/speculative.py                       # random Mixtral-shaped models, a few minutes here
    python benchmarks/speculative.py --tokens 32 --layers 2   # a quick look
    python benchmarks/speculative.py --model DIR [--draft-model DIR]   # a real checkpoint and its tokenizer

With random weights nothing the target says is predictable from the text, so the numbers show the
machinery: what a round costs and what it yields when drafts are, or are not, accepted. The "edit"
prompt is a block of token ids, a short instruction, and the block again (what asking a model to
change one line of a code block looks like); a random model's greedy output soon falls into a loop
of its own, which prompt lookup then drafts correctly. The "free-form" prompt has no repetition.
The random draft model shares the target's vocabulary but not its weights, so it is almost never
right: its row measures the overhead of drafting; "self-draft" (the target drafting for itself,
always accepted) bounds what a perfect draft of the target's cost would give.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synthetic import Shape  # noqa: E402  (benchmarks/, the script's own folder)

from mlx_mixtral import load  # noqa: E402
from mlx_mixtral.cache import KVCache  # noqa: E402
from mlx_mixtral.config import ModelArgs  # noqa: E402
from mlx_mixtral.generate import generate_step  # noqa: E402
from mlx_mixtral.memory.plan import kv_bytes  # noqa: E402
from mlx_mixtral.model import Mixtral  # noqa: E402
from mlx_mixtral.sampling import make_sampler  # noqa: E402
from mlx_mixtral.speculative import DraftStats  # noqa: E402

VOCAB = 32000
EDIT_TEXT = """def area(shape, w, h):
    if shape == "square":
        return w * w
    if shape == "rect":
        return w * h
    if shape == "triangle":
        return w * h / 2
    raise ValueError(shape)
"""


def random_model(hidden: int, ffn: int, experts: int, layers: int, seed: int, dtype: mx.Dtype) -> Mixtral:
    mx.random.seed(seed)
    args = ModelArgs.from_dict(
        {
            "model_type": "mixtral",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 128),
            "num_key_value_heads": max(1, hidden // 512),
            "num_local_experts": experts,
            "num_experts_per_tok": 2,
            "vocab_size": VOCAB,
            "max_position_embeddings": 32768,
        }
    )
    model = Mixtral(args)  # MLX's default initialisation: random, untrained
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def prompts(tokenizer, rng: np.random.Generator) -> dict[str, list[int]]:
    if tokenizer is not None:
        edit = f"{EDIT_TEXT}\nRewrite this function with the triangle case returning 0.5 * w * h:\n\n{EDIT_TEXT}"
        free = "Write a short story about a lighthouse keeper who finds a message in a bottle."
        return {"edit": tokenizer.encode(edit), "free-form": tokenizer.encode(free)}
    block = rng.integers(3, VOCAB, 96).tolist()
    instruction = rng.integers(3, VOCAB, 16).tolist()
    return {"edit": [1, *block, *instruction, *block], "free-form": [1, *rng.integers(3, VOCAB, 208).tolist()]}


def decode(model, prompt: list[int], tokens: int, sampler, **speculative) -> tuple[float, DraftStats, list[int]]:
    """Decode tokens/s after the first token (prefill excluded), the draft counts, the tokens."""
    stats = DraftStats()
    out, first = [], None
    steps = generate_step(
        prompt, model, max_tokens=tokens, sampler=sampler, key=mx.random.key(0), draft_stats=stats, **speculative
    )
    for token, _ in steps:
        out.append(token)
        if first is None:
            first = time.perf_counter()
    return (len(out) - 1) / (time.perf_counter() - first), stats, out


def verify_costs(model, prompt: list[int], k: int, repeats: int) -> list[float]:
    """Median ms of one target forward over L = 1..k+1 new tokens after the prompt (the cache
    trimmed back after each, as a rejected round does)."""
    cache = model.make_cache()
    model(mx.array([prompt]), cache=cache)
    mx.eval([c.state for c in cache])
    costs = []
    for n in range(1, k + 2):
        times = []
        for _ in range(repeats + 1):
            tokens = mx.array([prompt[-n:]])
            start = time.perf_counter()
            mx.eval(model(tokens, cache=cache)[:, -1])
            times.append(time.perf_counter() - start)
            for c in cache:
                c.trim(n)
        costs.append(1000 * statistics.median(times[1:]))  # the first is a warm-up
    return costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a real checkpoint instead of the random model")
    p.add_argument("--draft-model", default=None, help="with --model: its draft (default: none)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=96, help="tokens generated per run")
    p.add_argument("--num-draft-tokens", type=int, default=3)
    p.add_argument("--prompt-lookup", type=int, default=2)
    p.add_argument("--temp", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per verify length")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on the CPU)")
    p.add_argument("--kv-only", action="store_true", help="only the KV cache size table")
    args = p.parse_args(argv)
    if args.kv_only:
        kv_table()
        return 0
    k = args.num_draft_tokens
    on_gpu = mx.default_device() == mx.gpu
    dtype_name = args.dtype or ("bfloat16" if on_gpu else "float32")
    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(0)

    if args.model:
        model, tokenizer = load(args.model)
        draft = load(args.draft_model)[0] if args.draft_model else None
        shape = f"{args.model}" + (f", draft {args.draft_model}" if draft is not None else "")
    else:
        tokenizer = None
        model = random_model(args.hidden, args.ffn, args.experts, args.layers, 0, dtype)
        draft = random_model(args.hidden // 4, args.ffn // 4, 4, 1, 1, dtype)
        shape = (
            f"random Mixtral: hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts (top 2), "
            f"{args.layers} layers, vocab {VOCAB}, {dtype_name}; "
            f"draft: hidden {args.hidden // 4}, ffn {args.ffn // 4}, 4 experts, 1 layer"
        )
    print(f"# {shape}; device {mx.default_device()}; {args.tokens} tokens, K={k}, temp {args.temp}")
    sampler = make_sampler(args.temp)
    texts = prompts(tokenizer, rng)
    decode(model, texts["free-form"][:16], 8, sampler)  # warm-up

    modes: list[tuple[str, dict]] = [
        ("plain", {}),
        (f"prompt lookup n={args.prompt_lookup}", dict(prompt_lookup=args.prompt_lookup, num_draft_tokens=k)),
    ]
    if draft is not None:
        modes.append(("draft model", dict(draft_model=draft, num_draft_tokens=k)))
    modes.append(("self-draft (bound)", dict(draft_model=model, num_draft_tokens=k)))

    print("\n| prompt | mode | decode tok/s | speed-up | drafted | accepted | acceptance | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, prompt in texts.items():
        base, reference = None, None
        for mode, options in modes:
            tps, stats, out = decode(model, prompt, args.tokens, sampler, **options)
            if base is None:
                base, reference = tps, out
            rate = f"{100 * stats.accepted / stats.drafted:.1f}%" if stats.drafted else "-"
            same = "-" if not options else ("yes" if out == reference else "no")
            print(
                f"| {name} ({len(prompt)} tok) | {mode} | {tps:.1f} | {tps / base:.2f}x | {stats.drafted} | "
                f"{stats.accepted} | {rate} | {same} |"
            )

    costs = verify_costs(model, texts["edit"], k, args.repeats)
    E, top = model.args.num_local_experts, model.args.num_experts_per_tok
    print("\n| verify forward over L tokens | ms | x one token | ms per token | experts read per layer |")
    print("|---|---:|---:|---:|---:|")
    for n, ms in enumerate(costs, start=1):
        # L tokens each routed to `top` of E experts uniformly touch E (1 - (1 - top/E)^L) of them:
        # the expert weights a bandwidth-bound device reads grow with L, unlike a dense model's.
        touched = E * (1 - (1 - top / E) ** n)
        print(f"| L = {n} | {ms:.2f} | {ms / costs[0]:.2f} | {ms / n:.2f} | {touched:.2f} of {E} |")
    kv_table()
    return 0


MIXTRAL_8X7B = ModelArgs.from_dict(Shape(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8).config())


def kv_table() -> None:
    """Mixtral-8x7B's KV cache at 4k and 32k tokens, float16 vs 8 and 4 bits: the planner's
    arithmetic, and what one real cache layer holds after that many tokens, times the layers."""
    a = MIXTRAL_8X7B
    print(f"\n| KV cache, Mixtral-8x7B ({a.num_hidden_layers} layers x {a.num_key_value_heads} KV heads x "
          f"{a.head_dim}), group 64 | float16 GB | 8-bit GB | 4-bit GB |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for tokens in (4096, 32768):
        planned = [kv_bytes(a, tokens, 2, bits) / 1e9 for bits in (None, 8, 4)]
        measured = [_one_layer_bytes(a, tokens, bits) * a.num_hidden_layers / 1e9 for bits in (None, 8, 4)]
        print(f"| {tokens} tokens, planner | " + " | ".join(f"{g:.3f}" for g in planned) + " |")
        print(f"| {tokens} tokens, a real cache | " + " | ".join(f"{g:.3f}" for g in measured) + " |")


def _one_layer_bytes(a: ModelArgs, tokens: int, bits: int | None) -> int:
    cache = KVCache(bits=bits, group_size=64)
    kv = mx.zeros((1, a.num_key_value_heads, tokens, a.head_dim), mx.float16)  # (B, H_kv, L, D)
    cache.update_and_fetch(kv, kv)
    stored = [x for part in cache.state for x in (part if isinstance(part, tuple) else (part,))]
    mx.eval(stored)
    return sum(x.nbytes for x in stored)


if __name__ == "__main__":
    sys.exit(main())
