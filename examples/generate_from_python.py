"""Generate text from Python with mlx-mixtral: one call, a stream with statistics, sampling with a
seed, stop strings and log-probabilities.

    python examples/generate_from_python.py --model mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit \
        --prompt "Write a haiku about the sea."

Answers go to stdout, statistics to stderr.
"""

import argparse
import sys

from mlx_mixtral import LoadError, generate, load, stream_generate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlx-community/Mixtral-8x7B-Instruct-v0.1-4bit")
    p.add_argument("--prompt", default="Write a haiku about the sea.")
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    try:
        model, tokenizer = load(args.model)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    # 1. Plain text in, text out (greedy). A str prompt is encoded with BOS; pass ids to control it.
    # The completion continues the prompt's text, word-boundary space included.
    print(f"[greedy] {args.prompt}{generate(model, tokenizer, args.prompt, max_tokens=args.max_tokens)}")

    # 2. An instruct model wants its chat template: apply it and pass the token ids.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    print("[chat]", end=" ", flush=True)
    last = None
    for last in stream_generate(model, tokenizer, ids, max_tokens=args.max_tokens):
        print(last.text, end="", flush=True)  # whole characters only, never a broken emoji
    print()
    if last is not None:
        print(
            f"  {last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, {last.generation_tokens} "
            f"generated at {last.generation_tps:.1f} tok/s, finish: {last.finish_reason}, "
            f"peak memory {last.peak_memory:.2f} GB",
            file=sys.stderr,
        )

    # 3. Sampling: the same seed gives the same text; stop strings are cut off and never printed.
    options = dict(max_tokens=args.max_tokens, temperature=0.8, top_p=0.95, min_p=0.05, seed=42, stop=["\n\n"])
    a, b = generate(model, tokenizer, ids, **options), generate(model, tokenizer, ids, **options)
    print("[sampled, seed 42]", a)
    print("[same seed again is identical]", a == b)

    # 4. Log-probabilities: the chosen token's and the 3 most likely alternatives at each step.
    print("[logprobs]")
    for r in stream_generate(model, tokenizer, args.prompt, max_tokens=5, logprobs=3):
        alternatives = ", ".join(f"{tokenizer.decode([t])!r} {lp:.2f}" for t, lp in r.top_logprobs)
        print(f"  {tokenizer.decode([r.token])!r:>14} {r.logprob:7.3f}   top: {alternatives}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
