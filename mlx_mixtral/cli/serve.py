"""`mlx-mixtral serve`: an OpenAI-compatible HTTP server and a browser chat page for one local model.

    mlx-mixtral serve --model M [--host 127.0.0.1] [--port 8080] [--api-key K] [--cors-origin URL ...]

The app is in mlx_mixtral/server/ (app.py, the OpenAI shapes in protocol.py and schema.py, the
generation worker in worker.py), the prefix cache in mlx_mixtral/prefix_cache.py. With --port 0 the system picks
a free port; the address is printed to stderr once the server listens.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from mlx_mixtral.batching.scheduler import DEFAULT_MAX_BATCH
from mlx_mixtral.cli.options import (
    add_kernels_arg,
    add_memory_args,
    add_speculative_args,
    check_chat_template,
    load_draft,
    memory_options,
    one_line,
    refuse_offload_when_distributed,
    refuse_speculation_when_distributed,
    report,
)
from mlx_mixtral.cli.parser import command_parser
from mlx_mixtral.distributed.model import DistributedModel
from mlx_mixtral.errors import MixtralError, OptionError
from mlx_mixtral.loader import load
from mlx_mixtral.memory.plan import kv_context
from mlx_mixtral.server.app import Settings, create_app
from mlx_mixtral.server.guard import LOOPBACK_HOSTS
from mlx_mixtral.server.worker import DistributedEngine, Engine, Follower, LocalEngine, Worker
from mlx_mixtral.speculative import check_speculation
from mlx_mixtral.text import argv_text

PROG = "mlx-mixtral serve"
API_KEY_ENV = "MLX_MIXTRAL_API_KEY"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = command_parser(PROG, __doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="MLX or Hugging Face model directory, or a hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the model")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    p.add_argument(
        "--api-key",
        type=argv_text,
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from this origin (repeatable; '*' for any); CORS is off otherwise",
    )
    p.add_argument("--served-model-name", type=argv_text, help="the model id clients see (default: --model as given)")
    p.add_argument("--max-tokens-cap", type=_positive, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=_positive, default=1_000_000, help="largest request body")
    p.add_argument("--max-messages", type=_positive, default=256, help="most messages in one chat request")
    p.add_argument(
        "--max-kv-size",
        type=_positive,
        default=None,
        help="keep only the newest N tokens' keys/values (sliding window; no context limit)",
    )
    p.add_argument(
        "--prompt-cache-size", type=int, default=4, help="conversations whose KV cache is kept for reuse (0: none)"
    )
    p.add_argument(
        "--max-batch",
        type=_positive,
        help=f"requests decoded together (default {DEFAULT_MAX_BATCH}; 1 with --draft-model/--prompt-lookup, "
        "which serve one at a time); the rest wait in order. The KV cache is planned for N sequences of "
        "--max-kv-size tokens when that is given, else for one full context that the batch shares",
    )
    p.add_argument(
        "--chat-template",
        type=argv_text,
        default=None,
        help="mistral-v1, mistral-v3, jinja or Jinja source (default: chosen from the tokenizer)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="how much the HTTP server logs to stderr",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="shard the model over the processes of `mlx.launch`; rank 0 serves, the others follow",
    )
    add_kernels_arg(p)
    add_memory_args(p)
    add_speculative_args(p)
    args = p.parse_args(argv)
    if args.api_key is None and os.environ.get(API_KEY_ENV):  # not a parser default: --help would show it
        args.api_key = argv_text(os.environ[API_KEY_ENV])
    if args.prompt_cache_size < 0:
        p.error(f"--prompt-cache-size must be >= 0, got {args.prompt_cache_size}")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    try:
        check_speculation(args.num_draft_tokens, args.prompt_lookup)
    except OptionError as e:
        p.error(f"--{e.option.replace('_', '-')}: {e}")
    speculating = args.draft_model is not None or args.prompt_lookup is not None
    if speculating and args.max_batch not in (None, 1):
        p.error(
            f"--max-batch {args.max_batch} with --draft-model/--prompt-lookup: speculative decoding serves one "
            "request at a time; leave out --max-batch or pass 1"
        )
    if args.max_batch is None:
        args.max_batch = 1 if speculating else DEFAULT_MAX_BATCH
    return args


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket | None:
    """The bound socket, or None once the reason it cannot be had is on stderr."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        print(f"{PROG}: error: cannot listen on {host}:{port} ({e.strerror})", file=sys.stderr)
        return None
    return sock


def _load_engine(args: argparse.Namespace) -> Callable[[], Engine | Follower]:
    def load_engine() -> Engine | Follower:
        if args.distributed:
            dm = DistributedModel.start(args.model, kernels=args.kernels)
            if not dm.is_leader:
                return Follower(dm.follow)
            return DistributedEngine(dm, max_kv_size=args.max_kv_size, prompt_cache_size=args.prompt_cache_size)
        sequences = args.max_batch if args.max_kv_size is not None else 1
        model, tokenizer = load(args.model, sequences=sequences, **memory_options(args))
        speculative = dict(
            draft_model=load_draft(args, model),
            num_draft_tokens=args.num_draft_tokens,
            prompt_lookup=args.prompt_lookup,
        )
        return LocalEngine(
            model,
            tokenizer,
            max_kv_size=args.max_kv_size,
            prompt_cache_size=args.prompt_cache_size,
            max_batch=args.max_batch,
            kv_tokens=sequences * kv_context(model.args, args.max_kv_size),
            speculative=speculative,
        )

    return load_engine


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.distributed:
        refuse_offload_when_distributed(args)
        refuse_speculation_when_distributed(args)
    sock = None
    if not args.distributed:  # a taken port fails before minutes of loading (ranks bind once loaded)
        sock = _listen(args.host, args.port)
        if sock is None:
            return 1
    try:
        status = _serve(args, sock)
    except MixtralError as e:  # reported here, not by the dispatcher: this process must end below
        status = report(PROG, e)
    # Once a model was loaded on the worker thread, MLX (0.32.4 here) can abort while the interpreter
    # tears down ("terminate called without an active exception"; a model loaded on a second thread
    # hits it in about half of the runs, server or not). Everything is flushed and shut down by now,
    # so leave without that teardown.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _serve(args: argparse.Namespace, sock: socket.socket | None) -> int:
    """Load, then serve until Ctrl-C/SIGTERM (rank 0), or follow rank 0 (the other ranks)."""
    print(f"loading {args.model} ...", file=sys.stderr)
    try:
        worker = Worker(_load_engine(args))
    except OSError as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    if not worker.is_leader:  # ranks 1..N-1 follow rank 0's generations until it closes
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to act on
        return worker.wait()
    try:  # a bad --chat-template fails here, not in every request
        check_chat_template(worker.tokenizer, args.chat_template)
    except MixtralError:
        worker.stop()
        raise
    if sock is None:  # --distributed: rank 0 binds only now
        sock = _listen(args.host, args.port)
        if sock is None:
            worker.stop()
            return 1
    settings = Settings(
        model_id=args.served_model_name or argv_text(args.model),
        api_key=args.api_key,
        cors_origins=args.cors_origin,
        max_tokens_cap=args.max_tokens_cap,
        max_body_bytes=args.max_body_bytes,
        max_messages=args.max_messages,
        max_kv_size=args.max_kv_size,
        chat_template=args.chat_template,
        # On loopback, a Host check keeps web pages from reaching the server through DNS rebinding.
        allowed_hosts=LOOPBACK_HOSTS if _is_loopback(args.host) else None,
    )
    app = create_app(worker, settings)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {settings.model_id} at http://{shown}:{port}/ (chat page), API at http://{shown}:{port}/v1",
        file=sys.stderr,
        flush=True,
    )
    if not _is_loopback(args.host) and args.api_key is None:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr)
    server = _Server(config, worker)
    worker.on_fatal = lambda: setattr(server, "should_exit", True)  # e.g. a rank of the group died
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
        return 130
    if worker.fatal_error is not None:
        print(f"{PROG}: error: {one_line(worker.fatal_error)}", file=sys.stderr)
        return 1
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, but Ctrl-C/SIGTERM first ends the running generation (its client gets a 503
    error event), so open streams close and the graceful shutdown does not wait for them."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.worker.shut_down()
        super().handle_exit(sig, frame)
