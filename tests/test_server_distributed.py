"""`mlx-mixtral serve --distributed` under `mlx.launch -n 2` (ring backend over loopback): rank 0
serves HTTP and drives rank 1, answers equal transformers' on the unsharded checkpoint, the prefix
cache and cancellation work across ranks, and Ctrl-C to the process group ends both ranks."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers.launch import ATTEMPTS, LAUNCHER, launch_cmd, lost_port
from helpers.server_harness import EOS, leave_mid_stream, shared, wait_for_health, wait_idle

pytestmark = pytest.mark.skipif(not LAUNCHER.exists(), reason="mlx.launch is not installed")


def _start_serving() -> tuple[subprocess.Popen, str | None, list[str]]:
    """Launch `serve --distributed` on two ranks; (process, its URL or None if it did not start, log)."""
    args = ("--", "-m", "mlx_mixtral", "serve", "--distributed", "--model", str(shared("model_dir")))
    cmd = launch_cmd(2, *args, "--port", "0", "--log-level", "warning")
    # A session of its own, so the test can Ctrl-C the whole group as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log: list[str] = []
    for line in proc.stdout:
        log.append(line)
        if "serving " in line:
            return proc, line.split(" at ", 1)[1].split("/ ", 1)[0], log
    proc.wait()
    return proc, None, log


@pytest.fixture(scope="module")
def launched():
    for _ in range(ATTEMPTS):  # again on other ports when a rank could not bind its own
        proc, url, log = _start_serving()
        if url is not None or not lost_port("".join(log)):
            break
    if url is None:
        pytest.fail("serve --distributed did not start:\n" + "".join(log))
    threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True).start()
    try:
        wait_for_health(url, log)
        yield proc, url, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _chat(url, messages, max_tokens=12, **extra):
    r = httpx.post(
        url + "/v1/chat/completions",
        timeout=120,
        json={"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_two_ranks_answer_like_transformers(launched):
    _, url, _ = launched
    ref = shared("reference")
    turn1 = [{"role": "user", "content": "Hello, who are you?"}]
    first = _chat(url, turn1)
    assert first["choices"][0]["message"]["content"] == ref.greedy(ref.chat_ids(turn1), 12)[1]
    turn2 = turn1 + [
        {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
        {"role": "user", "content": "Tell me more about it."},
    ]
    second = _chat(url, turn2)
    assert second["choices"][0]["message"]["content"] == ref.greedy(ref.chat_ids(turn2), 12)[1]
    assert second["usage"]["prompt_tokens"] == len(ref.chat_ids(turn2))
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(ref.chat_ids(turn1))


def test_dropped_stream_stops_every_rank(launched):
    _, url, _ = launched
    before = httpx.get(url + "/health").json()
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(EOS): -100},
    }
    leave_mid_stream(url, "/v1/completions", body)
    h = wait_idle(url, before["cancelled"] + 1)
    assert h["generated_tokens"] - before["generated_tokens"] < 1000
    # Both ranks are still in step: the next request is answered.
    assert _chat(url, [{"role": "user", "content": "Still there?"}], max_tokens=3)["usage"]["completion_tokens"] == 3


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_ctrl_c_ends_both_ranks(launched):
    proc, _, log = launched
    ranks = _children(proc.pid)
    assert len(ranks) == 2
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: every process of the group gets it
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks):
        assert time.monotonic() < deadline, "a rank is still running:\n" + "".join(log)
        time.sleep(0.05)
    text = "".join(log)
    assert not re.search(r'File ".*/mlx_mixtral/', text), text  # (mlx.launch prints its own KeyboardInterrupt)
    assert "rank 1 exited with code" not in text, text  # the follower was released, not killed
