"""Constrained decoding's cost: llguidance mask time per token on the real Mixtral vocabularies
(v1 32000, v3 32768) against the decode step, and decode speed with and without a JSON schema.

    python benchmarks/grammar_mask.py [--tokens 200]

The mask is timed on the host exactly as GrammarConstraint computes it (consume the previous token,
then the mask words), walking random valid answers of each schema. The decode step is a tiny random
Mixtral with the v1 vocabulary on this machine's backend; a real Mixtral-8x7B decode step at 4 bits is
~18 ms or more at the memory-bandwidth limit of a 400 GB/s Mac, so the mask's share there is smaller.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    },
    "required": ["name", "tags", "score", "nested"],
    "additionalProperties": False,
}


def mask_times(tokenizer, steps: int, seed: int = 0) -> list[float]:
    import llguidance

    from mlx_mixtral.grammar import constraint_grammar, grammar_vocabulary

    vocab = grammar_vocabulary(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_lark(constraint_grammar(json_schema=SCHEMA))
    words = np.zeros((tokenizer.vocab_size + 31) // 32, np.int32)
    rng = random.Random(seed)
    times: list[float] = []
    while len(times) < steps:
        matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
        token = None
        while len(times) < steps:
            start = time.perf_counter()
            if token is not None:
                matcher.consume_token(token)
            matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
            times.append(time.perf_counter() - start)
            allowed = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[: tokenizer.vocab_size])
            allowed = allowed[allowed != tokenizer.eos_token_id]
            if allowed.size == 0:
                break
            token = int(allowed[rng.randrange(allowed.size)])
    return times


def decode_tps(model, tokenizer, ids, tokens: int, schema) -> float:
    from mlx_mixtral import stream_generate

    responses = list(
        stream_generate(model, tokenizer, ids, max_tokens=tokens, json_schema=schema, temperature=1.0, seed=0)
    )
    return responses[-1].generation_tps, responses[-1].generation_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()

    from helpers.server_harness import make_chat_model
    from helpers.tokenizer_fixtures import loaded_tokenizer

    from mlx_mixtral import load

    for version in ("v1", "v3"):
        tok = loaded_tokenizer(version)
        t = np.array(mask_times(tok, 2000)) * 1e6
        print(
            f"mask {version} vocab {tok.vocab_size}: median {np.median(t):.0f} us, p90 {np.percentile(t, 90):.0f} us, "
            f"max {t.max():.0f} us per token"
        )
    root = Path(tempfile.mkdtemp(prefix="grammar_bench_"))
    model, tok = load(str(make_chat_model(root / "m")))
    ids = tok.apply_chat_template([{"role": "user", "content": "JSON please"}])
    free, n_free = decode_tps(model, tok, ids, args.tokens, None)
    held, n_held = decode_tps(model, tok, ids, args.tokens, SCHEMA)
    t = np.median(mask_times(tok, 2000)) * 1e6
    step_us = 1e6 / free
    print(
        f"decode step (tiny Mixtral, vocab 32000, this machine): {step_us / 1e3:.2f} ms free ({n_free} tokens), "
        f"{1e3 / held:.2f} ms with a schema ({n_held} tokens); mask {t:.0f} us = {100 * t / step_us:.2f}% of a step"
    )


if __name__ == "__main__":
    main()
