"""Concurrent clients against this server and mlx_lm.server, same converted model, same run.

    python benchmarks/serve_load.py                                  # a small random Mixtral, 4-bit
    python benchmarks/serve_load.py --model DIR --clients 1,2,4,8    # any converted MLX directory

For each server (ours with `--max-batch 8`, mlx_lm.server with `--decode-concurrency 8`) and each
client count, that many `openai` clients stream one chat completion each at the same moment
(distinct prompts, greedy, `max_tokens` tokens, EOS banned by logit_bias so every answer has the
same length). Reported: aggregate generated tok/s (all tokens / wall time), mean per-stream decode
tok/s (after its first token), p50/p95 time to first token. Then the head-of-line case on our
server: a short request sent just after a 2,000-token prompt; its time to first token against the
long prompt's. Results go to stdout as a table and to benchmarks/out/serve_load/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import Shape, add_shape_flags, shape_from_args, write_checkpoint  # noqa: E402

EOS = 2
OUT = Path(__file__).resolve().parent / "out" / "serve_load"  # benchmarks/out/ is git-ignored
TOPICS = ["the sea", "a city at night", "mountains", "a library", "trains", "winter", "a garden", "the moon"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_dir(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from mlx_mixtral.convert import convert

    shape: Shape = shape_from_args(args)
    src = OUT / f"hf-{shape.tag()}"
    dst = OUT / f"mlx-{shape.tag()}-4bit"
    if not src.is_dir():
        write_checkpoint(src, shape)
    if not dst.is_dir():
        convert(src, dst, quantize=True, q_bits=4, q_group_size=64)
    return dst


class Server:
    def __init__(self, name: str, cmd: list[str], port: int):
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{name} did not start in 300 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def one_stream(client, model: str, content: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    times = []
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        logit_bias={str(EOS): -100},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    ttft = times[0] - start if times else float("nan")
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return {"start": start, "end": time.perf_counter(), "chunks": len(times), "ttft": ttft, "decode_tps": decode}


def load_round(server: Server, model: str, clients: int, max_tokens: int, rnd: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
    prompts = [f"Write about {TOPICS[i % len(TOPICS)]} (client {i}, round {rnd})." for i in range(clients)]
    barrier = threading.Barrier(clients)

    def run(prompt: str) -> dict:
        barrier.wait()
        return one_stream(client, model, prompt, max_tokens)

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, prompts))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["chunks"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "aggregate_tps": tokens / wall,
        "per_stream_tps": statistics.mean(r["decode_tps"] for r in results),
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
        "tokens": tokens,
    }


def head_of_line(server: Server, model: str, long_tokens: int) -> dict:
    """A short completion sent 50 ms after a long prompt: how long until each gets its first token.
    The bound the scheduler gives the short one: the prefill chunk in progress, then one step."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)
    from mlx_mixtral.bench.timing import random_prompt

    long_prompt = random_prompt(long_tokens, 32000, seed=99)  # token ids: exactly long_tokens of them
    out = {}

    def first_token(name: str, prompt: str) -> None:
        start = time.perf_counter()
        # logprobs=1: every token gets an event, also one whose text is still held back (a partial
        # UTF-8 character), so this times the first token, not the first visible character
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=8, stream=True, logprobs=1):
            if chunk.choices:
                out[name] = time.perf_counter() - start
                break

    long = threading.Thread(target=first_token, args=("long", long_prompt))
    long.start()
    time.sleep(0.05)
    first_token("short", [1, 22557])  # "<s> Hello"
    long.join()
    return {"long_prompt_tokens": long_tokens, "long_ttft": out.get("long"), "short_ttft": out.get("short")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a converted MLX model directory (default: a random Mixtral-shaped one)")
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2, help="rounds per client count; the best is kept")
    p.add_argument("--long-prompt", type=int, default=2000)
    p.add_argument("--port", type=int, default=8931)
    p.add_argument("--skip-mlx-lm", action="store_true")
    add_shape_flags(p)
    args = p.parse_args(argv)
    path = model_dir(args)
    counts = [int(c) for c in args.clients.split(",")]
    batch = str(max(counts))
    servers = {
        "mlx-mixtral": [sys.executable, "-m", "mlx_mixtral", "serve", "--model", str(path), "--max-batch", batch,
                        "--served-model-name", "m", "--log-level", "warning", "--port", str(args.port)],
        "mlx-lm": [sys.executable, "-m", "mlx_lm.server", "--model", str(path), "--decode-concurrency", batch,
                   "--prompt-concurrency", batch, "--log-level", "WARNING", "--port", str(args.port + 1)],
    }  # fmt: skip
    if args.skip_mlx_lm:
        del servers["mlx-lm"]
    results: dict = {"model": str(path), "max_tokens": args.max_tokens, "load": {}, "head_of_line": None}
    for name, cmd in servers.items():
        log(f"starting {name}")
        server = Server(name, cmd, args.port + (name == "mlx-lm"))
        model = "m" if name == "mlx-mixtral" else str(path)
        try:
            one_stream(
                __import__("openai").OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0),
                model,
                "warm up",
                8,
            )
            rows = []
            for clients in counts:
                best = max(
                    (load_round(server, model, clients, args.max_tokens, r) for r in range(args.rounds)),
                    key=lambda row: row["aggregate_tps"],
                )
                log(f"{name} {clients} clients: {best['aggregate_tps']:.1f} tok/s aggregate")
                rows.append(best)
            results["load"][name] = rows
            if name == "mlx-mixtral":
                results["head_of_line"] = head_of_line(server, model, args.long_prompt)
        finally:
            server.stop()
    print_table(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict) -> None:
    ours = results["load"]["mlx-mixtral"]
    theirs = {r["clients"]: r for r in results["load"].get("mlx-lm", [])}
    single = ours[0]["aggregate_tps"]
    print(f"model: {results['model']}, {results['max_tokens']} tokens per stream")
    print("| clients | server | aggregate tok/s | per-stream tok/s | TTFT p50 s | TTFT p95 s | vs 1 client "
          "| vs mlx-lm |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in ours:
        other = theirs.get(row["clients"])
        ratio = f"{row['aggregate_tps'] / other['aggregate_tps']:.2f}x" if other else "-"
        scale = row["aggregate_tps"] / single
        print(f"| {row['clients']} | mlx-mixtral | {row['aggregate_tps']:.1f} | {row['per_stream_tps']:.1f} | "
              f"{row['ttft_p50']:.3f} | {row['ttft_p95']:.3f} | {scale:.2f}x | {ratio} |")  # fmt: skip
        if other:
            print(f"| {other['clients']} | mlx-lm | {other['aggregate_tps']:.1f} | {other['per_stream_tps']:.1f} | "
                  f"{other['ttft_p50']:.3f} | {other['ttft_p95']:.3f} | | |")  # fmt: skip
    hol = results["head_of_line"]
    if hol:
        print(f"head of line: a short request sent 50 ms after a {hol['long_prompt_tokens']}-token prompt got its "
              f"first token in {hol['short_ttft']:.3f} s; the long one in {hol['long_ttft']:.3f} s")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
