"""Starting distributed groups for the tests: `mlx.launch` commands and their ring ports.

The ring backend listens on base + rank, and only the ranks themselves can bind those ports, so a
port cannot be reserved for them; finding free ones by binding and closing them first is a
check-then-use race. Instead ports come from a counter in a range the kernel never hands out to
other programs' connections (below Linux's ephemeral range, 32768-60999), a different stretch for
every test process, and a launch whose ranks could not bind anyway (another program took a port
on purpose) is run again on the next ports.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

LAUNCHER = Path(sys.executable).with_name("mlx.launch")
# The ring backend's words when a rank cannot take its port.
BIND_FAILURES = ("Couldn't bind socket", "Couldn't listen")
ATTEMPTS = 4
_FIRST, _LAST = 20000, 32000
_STRIDE = 8  # ports per launch (at most 8 ranks)
_START = (os.getpid() * 64) % (_LAST - _FIRST)
_launches = itertools.count()


def ring_ports(n: int) -> int:
    """A base port for n ranks, never handed out twice by this process (until 1500 launches wrap)."""
    assert n <= _STRIDE
    return _FIRST + (_START + next(_launches) * _STRIDE) % (_LAST - _FIRST - _STRIDE)


def lost_port(output: str) -> bool:
    """Whether a launch failed only because a rank could not bind its port."""
    return any(words in output for words in BIND_FAILURES)


def launch_cmd(n: int, *argv: str) -> list[str]:
    """`mlx.launch` running `argv` (a script and its arguments, or `--`, `-m`, a module, ...) as n
    ranks of the ring backend over 127.0.0.1, on ports of their own."""
    return [str(LAUNCHER), "-n", str(n), "--backend", "ring", "-p", str(ring_ports(n)), "--python", sys.executable,
            *argv]  # fmt: skip


def run_launched(n: int, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run of `launch_cmd(n, *argv)` (text output captured), run again on other ports
    when a rank could not bind its own."""
    for _ in range(ATTEMPTS):
        result = subprocess.run(launch_cmd(n, *argv), capture_output=True, text=True, **kwargs)
        if not lost_port(result.stdout + result.stderr):
            return result
    return result
