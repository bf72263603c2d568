"""`ultramem serve --replicas 2` on Ray Serve over real HTTP (DESIGN §6, §7.1, §8).

The server runs as a child process in its own session (an embedded loopback-only Ray, one read-only
shard subprocess, two Serve replicas); the test talks to it over HTTP and then checks that SIGTERM
leaves none of its processes behind.
"""

from __future__ import annotations

import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestration import cli
from orchestration.serve_ray import free_port
from tests.e2e.test_serve import PROMPT, get, make_checkpoint, post

REPO = Path(__file__).resolve().parents[2]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def _stream_text(url: str, body: dict) -> tuple[list[str], list[bytes]]:
    """(text pieces, raw events) of an SSE completion."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
        events = [e for e in resp.read().split(b"\n\n") if e]
    finally:
        conn.close()
    pieces = [json.loads(e.removeprefix(b"data: "))["choices"][0]["text"] for e in events[:-1]]
    return pieces, events


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _group(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and _alive(p.pid):
                out.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_ray_serve_replicas_answer_like_ultramem_serve_and_sigterm_stops_everything(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = make_checkpoint(tmp_path)
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--local", "--temperature", "0",
                     "--max-tokens", "24", PROMPT]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    port = free_port("127.0.0.1")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--checkpoint", str(checkpoint),
                             "--replicas", "2", "--port", str(port), "--local-shards", "1"],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=REPO, start_new_session=True)
    seen: set[int] = set()
    try:
        line = _read_line(proc, timeout=100)
        url = f"http://127.0.0.1:{port}"
        assert line.strip() == f"listening on {url}", (line, proc.poll())
        seen = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | set(_group(proc.pid))

        status, body = post(url, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
        assert status == 200, body
        assert PROMPT + body["choices"][0]["text"] == expected
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 24

        pieces, events = _stream_text(url, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
        assert events[-1] == b"data: [DONE]" and PROMPT + "".join(pieces) == expected

        status, err = post(url, None, raw=json.dumps({"prompt": PROMPT, "max_tokens": 0}).encode())
        assert status == 400 and err["error"]["param"] == "max_tokens"
        status, err = post(url, None, raw=b"{not json")
        assert status == 400 and err["error"]["type"] == "invalid_request_error"

        replicas: set[str] = set()
        deadline = time.monotonic() + 60
        while len(replicas) < 2 and time.monotonic() < deadline:
            code, raw = get(url, "/health")
            assert code == 200
            replicas.add(json.loads(raw)["replica"])
        assert len(replicas) == 2, replicas  # two distinct replicas answer behind one port
        code, metrics = get(url, "/metrics")
        assert code == 200 and b"ultramem_serve_requests_total" in metrics

        seen |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} | set(_group(proc.pid))
        assert len(seen) >= 4  # the shard, Ray's own processes, the replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 60
        while (left := [p for p in seen if _alive(p)] + _group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, [psutil.Process(p).cmdline()[:3] for p in left if _alive(p)]
    finally:
        for pid in [proc.pid, *seen]:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("replicas", ["0", "-3"])
def test_replica_count_below_one_is_a_usage_error(tmp_path: Path, replicas: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["serve", "--checkpoint", str(tmp_path), "--replicas", replicas]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
