"""`mlx-mixtral chat`: a streaming chat in the terminal.

Answers go to stdout; the prompt, notices and statistics go to stderr. Ctrl-C during an answer
stops that answer (the part already written stays in the conversation); at the prompt it only
reminds how to leave. Commands: /reset, /system [TEXT], /save FILE, /load FILE, /help, /quit.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from mlx_mixtral.chat import ChatSession
from mlx_mixtral.cli.options import (
    add_sampling_args,
    check_chat_template,
    format_stats,
    load_draft,
    load_for_cli,
    one_line,
    options_from_args,
)
from mlx_mixtral.cli.parser import command_parser
from mlx_mixtral.errors import DistributedError, MixtralError, OptionError
from mlx_mixtral.language_model import LanguageModel
from mlx_mixtral.tokenizer.core import Tokenizer

HELP = """commands:
  /reset         forget the conversation
  /system TEXT   start over with this system prompt (/system alone shows the current one)
  /save FILE     save the conversation and its KV cache
  /load FILE     continue a saved conversation
  /help          this list
  /quit          leave (Ctrl-D does too)
Ctrl-C stops the current answer."""


def _parser() -> argparse.ArgumentParser:
    p = command_parser("mlx-mixtral chat", __doc__.splitlines()[0])
    add_sampling_args(p, max_tokens=1024)
    p.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="keep only the newest N tokens (sliding window) instead of stopping at the context limit",
    )
    p.add_argument("--stats", action="store_true", help="print speed and memory after each answer (stderr)")
    return p


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class PromptInterrupts:
    """Make Ctrl-C at the prompt interrupt `input()` at once.

    A process-wide SIGINT goes to whichever thread does not block it. When one of MLX's worker
    threads takes it, Python notes the signal, but the main thread sleeps on in readline's
    select() until the next key press. Python also writes every signal's number to a wakeup
    fd; a helper thread reads it and, while the main thread waits at the prompt, pokes it with
    SIGUSR1 (whose handler does nothing) so select() returns EINTR and readline runs the
    pending SIGINT handler, i.e. raises KeyboardInterrupt.

    The flags are plain attributes, not threading.Event: a KeyboardInterrupt raised inside an
    Event method can leave its lock held, and the next prompt would then hang."""

    def __init__(self):
        self.reading = False  # the main thread is (about to be) inside input()
        self.pending = False  # a SIGINT arrived that input() has not raised yet
        self._main = threading.main_thread().ident
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        signal.signal(signal.SIGUSR1, lambda *_: None)
        signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_end,), daemon=True, name="prompt-interrupts").start()

    def _watch(self, fd: int) -> None:
        while True:
            if signal.SIGINT not in os.read(fd, 512):
                continue
            self.pending = True
            while self.pending and self.reading:
                signal.pthread_kill(self._main, signal.SIGUSR1)
                time.sleep(0.05)

    def read_line(self) -> str:
        self.pending, self.reading = False, True
        try:
            return input()
        finally:
            self.reading = self.pending = False


class Repl:
    def __init__(
        self, args: argparse.Namespace, model: LanguageModel, tokenizer: Tokenizer, dm: Any, options: dict[str, Any]
    ):
        self.args, self.model, self.tokenizer, self.dm = args, model, tokenizer, dm
        session_args = dict(system=args.system, max_kv_size=args.max_kv_size, chat_template=args.chat_template)
        if dm is not None:
            self.session = dm.chat(**session_args, **options)
        else:
            self.session = ChatSession(model, tokenizer, **session_args, **options)
        self.options = options
        self.interrupted = False  # set by the SIGINT handler during an answer (a bool: no lock to leak)
        self.prompt = PromptInterrupts()

    def run(self) -> int:
        _say(f"Chatting with {self.args.model}. /help for commands, Ctrl-C stops an answer, /quit leaves.")
        while True:
            # Outside an answer Ctrl-C raises KeyboardInterrupt as usual (at the prompt, or while
            # a command runs); it never ends the program.
            try:
                sys.stderr.write("> ")
                sys.stderr.flush()
                text = self.prompt.read_line().strip()
                if text.startswith("/"):
                    if self.command(text) == "quit":
                        return 0
                elif text:
                    self.answer(text)
            except EOFError:
                _say("")
                return 0
            except KeyboardInterrupt:
                _say("\n(/quit or Ctrl-D to leave)")

    def command(self, text: str) -> str | None:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit"):
            return "quit"
        if name == "/help":
            _say(HELP)
        elif name == "/reset":
            self.session.reset()
            _say("(conversation cleared)")
        elif name == "/system":
            if not arg:
                _say(f"(system prompt: {self.session.system!r})")
            else:
                self.session.reset(system=arg)
                _say("(new system prompt; conversation cleared)")
        elif name in ("/save", "/load"):
            if not arg:
                _say(f"usage: {name} FILE")
            else:
                self._save_or_load(name, arg)
        else:
            _say(f"unknown command {name}; /help lists them")
        return None

    def _save_or_load(self, name: str, path: str) -> None:
        try:
            if name == "/save":
                self.session.save(path)
                _say(f"(saved {len(self.session.messages)} messages to {path})")
            elif self.dm is not None:
                _say("/load is not supported with --distributed (each rank holds part of the KV cache)")
            else:
                self.session = ChatSession.load(
                    path, self.model, self.tokenizer, chat_template=self.args.chat_template, **self.options
                )
                _say(f"(loaded {len(self.session.messages)} messages from {path})")
        except (MixtralError, OSError) as e:
            if isinstance(e, DistributedError):
                raise
            _say(f"{name}: {one_line(e)}")

    def answer(self, text: str) -> None:
        """Stream one answer; SIGINT only raises a flag here, so the stream is closed between
        tokens and the session stays consistent."""
        self.interrupted = False
        previous = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True))
        last = None
        try:
            stream = self.session.stream(text)
            for last in stream:
                sys.stdout.write(last.text)
                sys.stdout.flush()
                if self.interrupted:
                    break
            stream.close()
        except MixtralError as e:  # ContextLimitError and the like: the turn did not happen
            if isinstance(e, DistributedError):  # the group broke: that ends the chat
                raise
            _say(f"\n{one_line(e)}")
            return
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n")
        sys.stdout.flush()
        if self.interrupted:
            _say("(stopped)")
        elif last is not None and last.finish_reason == "length":
            _say("(answer cut at the token limit)")
        if self.args.stats and last is not None:
            _say(format_stats(last, self.model))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from_args(args)
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise OptionError(f"--max-kv-size must be >= 1, got {args.max_kv_size}")
    model, tokenizer, dm = load_for_cli(args)
    if dm is not None and not dm.is_leader:
        return dm.follow()
    if dm is None:
        options["draft_model"] = load_draft(args, model)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    try:
        check_chat_template(tokenizer, args.chat_template)
        return Repl(args, model, tokenizer, dm, options).run()
    finally:
        if dm is not None:
            dm.close()


if __name__ == "__main__":
    sys.exit(main())
