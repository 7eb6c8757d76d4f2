"""Live `mlx-mixtral serve` processes on 127.0.0.1 for the server tests, and their reference answers.

The model is a tiny random Mixtral with the real Mixtral-8x7B tokenizer (vocab 32000), saved by
transformers; reference answers come from transformers' greedy generate on the same checkpoint and
from mistral-common / SentencePiece for the token ids and text.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from helpers.tiny_models import add_tokenizer, make_hf_checkpoint, mistral_tokenizer_path

CONTEXT = 2048  # the tiny model's max_position_embeddings: long prompts are cheap to exceed
EOS = 2


def make_chat_model(path: Path) -> Path:
    make_hf_checkpoint(path, vocab_size=32000, max_position_embeddings=CONTEXT)
    return add_tokenizer(path)


def wait_for_health(url: str, log: list[str], timeout: float = 60.0) -> None:
    """Return once the server at `url` answers /health; else fail with what it logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"server at {url} did not answer /health:\n{''.join(log)}")


def leave_mid_stream(url: str, path: str, body: dict, events: int = 4) -> float:
    """POST a streaming request, read `events` server-sent events, then close the connection as a
    client that gives up does; the time it closed."""
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + path, json=body) as response:
            assert response.status_code == 200
            seen = 0
            for line in response.iter_lines():
                seen += line.startswith("data:")
                if seen == events:
                    break
        return time.monotonic()  # leaving the block closed the connection


def wait_idle(url: str, cancelled: int, timeout: float = 30.0) -> dict:
    """/health once the worker is idle and has cancelled at least `cancelled` generations."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = httpx.get(url + "/health", timeout=5).json()
        if not h["busy"] and h["cancelled"] >= cancelled:
            return h
        time.sleep(0.01)
    raise AssertionError(f"the worker is still busy {timeout} s after the client left: {h}")


class LiveServer:
    """`python -m mlx_mixtral serve ... --port 0` in a subprocess; `url` once it answers /health."""

    def __init__(self, model_dir: Path, *args: str):
        cmd = [
            sys.executable,
            "-m",
            "mlx_mixtral",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "0",
            "--log-level",
            "warning",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        self.url = self._wait_for_address()
        threading.Thread(target=self._drain, daemon=True).start()  # keep the pipe from filling up
        wait_for_health(self.url, self.log)

    def _wait_for_address(self) -> str:
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("serving "):
                return line.split(" at ", 1)[1].split("/ ", 1)[0]
        raise RuntimeError(f"server exited ({self.proc.wait()}):\n{''.join(self.log)}")

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Reference:
    """Someone else's answers: mistral-common token ids, SentencePiece text, transformers greedy."""

    def __init__(self, model_dir: Path):
        import sentencepiece
        import torch
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        from helpers.tiny_models import load_hf_model

        self.torch = torch
        self.hf = load_hf_model(model_dir)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_path("v1")))
        self.mistral = MistralTokenizer.from_file(str(mistral_tokenizer_path("v1")))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        return self.mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens

    def text_ids(self, text: str) -> list[int]:
        return [1] + self.sp.encode(text)  # BOS, as Hugging Face's tokenizer adds it

    def greedy(self, ids: list[int], max_tokens: int, ban_eos: bool = False) -> tuple[list[int], str]:
        """Greedy continuation (stopping at EOS unless banned) and its text."""
        with self.torch.no_grad():
            out = self.hf.generate(
                self.torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=max_tokens,
                eos_token_id=None if ban_eos else EOS,
                pad_token_id=0,
                **({"suppress_tokens": [EOS]} if ban_eos else {}),
            )
        tokens = out[0, len(ids) :].tolist()
        if tokens and tokens[-1] == EOS:
            tokens = tokens[:-1]
        return tokens, self.sp.decode(tokens)

    def continuation_text(self, ids: list[int], tokens: list[int]) -> str:
        """What `tokens` add to the text of the prompt `ids` (BOS first): a completion's text."""
        return self.sp.decode(ids[1:] + tokens)[len(self.sp.decode(ids[1:])) :]

    def logprobs(self, ids: list[int], tokens: list[int]) -> list[float]:
        """log p(token_i | ids + tokens[:i]) for each generated token."""
        with self.torch.no_grad():
            logits = self.hf(self.torch.tensor([ids + tokens])).logits[0].double()
        lp = self.torch.log_softmax(logits, dim=-1)
        return [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(tokens)]


# One model and one server per configuration for the whole test session (several test files use
# them); they stop when the interpreter exits.
_shared: dict[str, object] = {}
STRICT_KEY = "test-key-123"
STRICT_ARGS = (
    "--api-key",
    STRICT_KEY,
    "--max-tokens-cap",
    "16",
    "--max-body-bytes",
    "4000",
    "--max-messages",
    "4",
    "--cors-origin",
    "http://allowed.example",
    "--served-model-name",
    "tiny",
)


def shared(name: str):
    if name not in _shared:
        if name == "model_dir":
            import tempfile

            root = tempfile.mkdtemp(prefix="mlx_mixtral_server_")
            atexit.register(shutil.rmtree, root, True)  # registered first, so it runs after the servers stop
            _shared[name] = make_chat_model(Path(root) / "tiny")
        elif name == "reference":
            _shared[name] = Reference(shared("model_dir"))
        else:
            args = {"server": (), "strict_server": STRICT_ARGS}[name]
            server = LiveServer(shared("model_dir"), *args)
            atexit.register(server.stop)
            _shared[name] = server
    return _shared[name]
