"""`ultramem serve` over real HTTP (DESIGN §6): completions, SSE streams, errors, metrics, shards.

A tiny checkpoint is built once (the `tiny` preset, two training steps, bf16 tables so bf16 on the
wire is lossless); read-only shards serve its table and the engine looks values up through them.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_workers import checkpoint_io
from model_workers.model import LanguageModel
from model_workers.tokenizer import Tokenizer
from model_workers.trainer import TrainConfig, make_optimizer, train_step
from orchestration import cli
from orchestration.cmd_serve import build_engine, start_local_shards, table_paths
from orchestration.config import load_config, to_dict
from orchestration.serve_http import CompletionService, HttpServer
from param_server.client import Client
from param_server.errors import PermissionDeniedError
from storage.table_store import open_table

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["the quick brown fox jumps over the lazy dog. " * 3, "memory layers look values up in tables. " * 3,
         "a sharded parameter server answers lookups over grpc. " * 3] * 4
PROMPT = "the quick brown"


def make_checkpoint(root: Path, value_dtype: str = "bfloat16", preset: str = "tiny") -> Path:
    """A tiny UltraMem checkpoint (2 training steps) with a tokenizer, as `ultramem train` writes."""
    cfg = load_config(preset=preset, overrides=[f"model.memory.value_dtype={value_dtype}"])
    torch.manual_seed(0)
    model = LanguageModel(cfg.model)
    train = TrainConfig(max_steps=2, warmup_steps=1, autocast="off")
    opt = make_optimizer(model, train)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=gen)
        train_step(model, opt, tokens[:, :-1], tokens[:, 1:], step=step, cfg=train, max_steps=2)
    tokenizer = Tokenizer.train(TEXTS, vocab_size=cfg.data.vocab_size)
    return checkpoint_io.save_checkpoint(root / "checkpoints", 2, model=model, backend=model.backend,
                                         optimizer=None, train_state={"step": 2}, config=to_dict(cfg),
                                         tokenizer_json=tokenizer.to_json())


class Served:
    """A checkpoint served over HTTP with two in-process read-only shards."""

    def __init__(self, checkpoint: Path, *, token: str | None = None, batch_wait_ms: float = 5.0) -> None:
        from model_workers.engine import EngineConfig

        self.checkpoint = checkpoint
        self.shards = start_local_shards(table_paths(checkpoint), 2, token=token, in_process=True)
        self.engine, tokenizer, self.client = build_engine(
            checkpoint, self.shards.addresses, token=token,
            engine_config=EngineConfig(max_batch=16, batch_wait_ms=batch_wait_ms))
        self.service = CompletionService(self.engine.start(), tokenizer, token=token)
        self.http = HttpServer(self.service, "127.0.0.1", 0).start()
        self.url = self.http.url

    def stop(self) -> None:
        self.http.stop()
        self.engine.stop()
        self.client.close()
        self.shards.stop()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(checkpoint: Path) -> Iterator[Served]:
    s = Served(checkpoint, batch_wait_ms=50.0)
    try:
        yield s
    finally:
        s.stop()


def post(url: str, body: object, *, token: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/completions", data=data, method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(url: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_greedy_completion_matches_ultramem_generate_local(served: Served, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["generate", "--checkpoint", str(served.checkpoint), "--local", "--temperature", "0",
                     "--max-tokens", "40", PROMPT]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    status, body = post(served.url, {"prompt": PROMPT, "max_tokens": 40, "temperature": 0})
    assert status == 200
    assert PROMPT + body["choices"][0]["text"] == expected
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 40


def test_a_v2_checkpoint_is_served_with_pre_values_scored_on_the_shards(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    # tiny_v2: every memory layer sends q_p with its pooled lookups; the read-only shards hold the
    # value and pre-value tables and weigh each selected row by <q_p, P_tab[row]> themselves
    sent: list[str | None] = []
    pooled_gather = Client.pooled_gather

    def spy(self, *args, **kw):
        sent.append(kw.get("pre_table"))
        return pooled_gather(self, *args, **kw)

    monkeypatch.setattr(Client, "pooled_gather", spy)
    checkpoint = make_checkpoint(tmp_path, preset="tiny_v2")
    assert "mem1.pre_values" in table_paths(checkpoint)
    assert cli.main(["generate", "--checkpoint", str(checkpoint), "--local", "--temperature", "0",
                     "--max-tokens", "24", PROMPT]) == 0
    expected = capsys.readouterr().out.rstrip("\n")
    served = Served(checkpoint)
    try:
        status, body = post(served.url, {"prompt": PROMPT, "max_tokens": 24, "temperature": 0})
    finally:
        served.stop()
    assert status == 200
    assert PROMPT + body["choices"][0]["text"] == expected
    assert sent and set(sent) == {"mem0.pre_values", "mem1.pre_values"}  # every lookup carried q_p


def test_concurrent_requests_are_decoded_together_and_match_sequential(served: Served) -> None:
    prompts = [f"{w} over the" for w in ("fox", "memory", "server", "dog", "tables", "grpc")]
    alone = [post(served.url, {"prompt": p, "max_tokens": 12, "temperature": 0})[1] for p in prompts]
    before = served.service.metrics.batch.collect()[0].samples
    results: dict[int, dict] = {}

    def run(i: int) -> None:
        results[i] = post(served.url, {"prompt": prompts[i], "max_tokens": 12, "temperature": 0})[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i]["choices"][0]["text"] for i in range(len(prompts))] == \
        [a["choices"][0]["text"] for a in alone]
    after = served.service.metrics.batch.collect()[0].samples
    grew = {s.labels.get("le"): s.value for s in after if s.name.endswith("_bucket")}
    was = {s.labels.get("le"): s.value for s in before if s.name.endswith("_bucket")}
    steps_over_one = (grew["+Inf"] - grew["1.0"]) - (was["+Inf"] - was["1.0"])
    assert steps_over_one > 0, "concurrent requests never shared a decode step"


def _stream_events(url: str, body: dict) -> list[bytes]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    data = resp.read()
    conn.close()
    return [line[len(b"data: "):] for line in data.split(b"\n\n") if line.startswith(b"data: ")]


def test_stream_sends_server_sent_events_ending_with_done(served: Served) -> None:
    whole = post(served.url, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})[1]["choices"][0]["text"]
    events = _stream_events(served.url, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stream": True})
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stop_string_ends_the_completion_before_it(served: Served) -> None:
    whole = post(served.url, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0})[1]["choices"][0]["text"]
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    assert stop, "the greedy completion is too short to pick a stop string from"
    status, body = post(served.url, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": [stop]})
    assert status == 200
    assert body["choices"][0]["text"] == whole[: whole.find(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"
    events = _stream_events(served.url, {"prompt": PROMPT, "max_tokens": 30, "temperature": 0, "stop": stop,
                                         "stream": True})
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == whole[: whole.find(stop)]


@pytest.mark.parametrize(("raw", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"prompt": ""}).encode(), "prompt"),
    (json.dumps({"max_tokens": 3}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": 2.5}).encode(), "max_tokens"),
    (json.dumps({"prompt": "hi", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"prompt": 42}).encode(), "prompt"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"prompt": "hi", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"prompt": "hi", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), "stream"),
    (json.dumps({"prompt": "hi", "stop": [1]}).encode(), "stop"),
    (json.dumps({"prompt": "hi", "n": 2}).encode(), "n"),
    (json.dumps({"prompt": "hi", "best_of": 2}).encode(), "best_of"),
])
def test_bad_request_is_400_with_a_json_error_naming_the_field(served: Served, raw: bytes, param: str | None) -> None:
    status, body = post(served.url, None, raw=raw)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    assert body["error"]["param"] == param


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=5), min_size=1))
def test_any_unknown_field_is_refused_with_400(served: Served, extra: dict) -> None:
    known = {"prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed", "model", "n", "user"}
    extra = {k: v for k, v in extra.items() if k not in known}
    if not extra:
        return
    status, body = post(served.url, {"prompt": "hi", "max_tokens": 1, **extra})
    assert status == 400 and "unknown field" in body["error"]["message"]


def test_client_gone_mid_stream_frees_its_batch_slot(served: Served, wait_until) -> None:
    conn = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 4000, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.fp.readline().startswith(b"data: ")  # streaming has begun: the request holds a row
    assert served.engine.active_count == 1
    resp.close()
    conn.close()
    wait_until(lambda: served.engine.active_count == 0, what="the server to notice the closed socket")


def test_health_and_prometheus_metrics(served: Served) -> None:
    post(served.url, {"prompt": PROMPT, "max_tokens": 3})
    status, body = get(served.url, "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, text = get(served.url, "/metrics")
    assert status == 200
    for name in ("ultramem_serve_requests_total", "ultramem_serve_generated_tokens_total",
                 "ultramem_serve_request_latency_seconds_bucket", "ultramem_serve_decode_step_seconds_bucket",
                 "ultramem_serve_batch_size_bucket", "ultramem_serve_time_to_first_token_seconds_bucket"):
        assert name.encode() in text, name
    assert get(served.url, "/nowhere")[0] == 404


def test_bearer_token_guards_completions_and_metrics_but_not_health(checkpoint: Path) -> None:
    s = Served(checkpoint, token="s3cret")
    try:
        assert post(s.url, {"prompt": PROMPT, "max_tokens": 2})[0] == 401
        assert post(s.url, {"prompt": PROMPT, "max_tokens": 2}, token="wrong")[0] == 401
        assert post(s.url, {"prompt": PROMPT, "max_tokens": 2}, token="s3cret")[0] == 200
        assert get(s.url, "/metrics")[0] == 401 and get(s.url, "/metrics", "s3cret")[0] == 200
        assert get(s.url, "/health")[0] == 200
    finally:
        s.stop()


def test_read_only_shards_refuse_pushes_with_permission_denied(served: Served) -> None:
    rows = np.arange(4, dtype=np.int64)
    before = served.client.gather("mem0.values", rows)
    with pytest.raises(PermissionDeniedError):
        served.client.push("mem0.values", rows, np.ones((4, before.shape[1]), np.float32), lr=1.0, step=0)
    np.testing.assert_array_equal(served.client.gather("mem0.values", rows), before)


def test_two_read_replicas_of_one_table_serve_the_same_rows(checkpoint: Path) -> None:
    tables = table_paths(checkpoint)
    replicas = [start_local_shards(tables, 1, in_process=True) for _ in range(2)]  # each holds every partition
    try:
        store = open_table(tables["mem0.values"])
        rows = np.arange(store.spec.rows, dtype=np.int64)
        want = np.concatenate([store.read_partition(p)["values"] for p in range(store.spec.num_partitions)])
        want = want.reshape(store.spec.num_partitions, -1, store.spec.dim).transpose(1, 0, 2)
        want = want.reshape(-1, store.spec.dim)
        for replica in replicas:
            client = Client(replica.addresses)
            try:
                got = client.gather("mem0.values", rows)
                np.testing.assert_array_equal(got, want[: store.spec.rows].astype(np.float32))
            finally:
                client.close()
    finally:
        for replica in replicas:
            replica.stop()


@pytest.mark.slow
def test_ultramem_serve_cli_starts_shard_processes_serves_and_stops_on_sigterm(checkpoint: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", "--local-shards", "2"], stdout=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[-1]
        status, body = post(url, {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 5
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], check=False, capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 2  # the two `ultramem shard serve --read-only` processes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _hostile_requests(seed: int, count: int) -> Iterator[tuple[str, str, str, bytes, dict[str, str]]]:
    """(class, method, path, body, headers) of requests that are wrong by construction, seeded."""
    import random

    rnd = random.Random(seed)
    good = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    junk = [None, True, -1, 0, 2**70, -(2**70), 1e308, -1e308, "", "x" * 300, [], [1, "a"], {}, {"a": 1}]
    bad_values = {
        "prompt": [None, 3, 3.5, True, "", [], {}, [None]],
        "max_tokens": [-1, 0, 10**9, 2.5, "8", True, None, [], 2**64],
        "temperature": [-0.5, "hot", 1e9, [], {}, True, None],
        "top_p": [0, -1, 1.5, "1", [], True],
        "stop": [3, [1, 2], {"a": "b"}, ["x"] * 100, True],
        "stream": ["yes", 2, [], {}],
        "n": [2, 0, -1, "1"],
        "seed": ["s", 1.5, [], -(2**70)],
    }
    classes = ["random_bytes", "not_json", "json_not_object", "bad_field", "unknown_field", "bad_utf8",
               "wrong_path", "wrong_method", "oversize_claim", "truncated_json"]
    for _ in range(count):
        kind = rnd.choice(classes)
        headers = {"Content-Type": "application/json"}
        method, path, body = "POST", "/v1/completions", b""
        if kind == "random_bytes":
            body = bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 200)))
            if body.lstrip()[:1] in (b"{", b"["):
                body = b"\x00" + body
        elif kind == "not_json":
            body = rnd.choice([b"prompt=hi", b"{prompt: 'hi'}", b"{'prompt': 'x'}", b"NaN-ish", b"{,}", b"[1,]"])
        elif kind == "json_not_object":
            body = json.dumps(rnd.choice(junk[:13])).encode()
        elif kind == "bad_field":
            field = rnd.choice(sorted(bad_values))
            body = json.dumps({**good, field: rnd.choice(bad_values[field])}).encode()
        elif kind == "unknown_field":
            name = "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rnd.randint(1, 12)))
            name = name if name not in {*good, *bad_values, "model", "user"} else name + "_x"
            body = json.dumps({**good, name: rnd.choice(junk)}).encode()
        elif kind == "bad_utf8":
            body = b'{"prompt": "\xff\xfe\xfa", "max_tokens": 2}'
        elif kind == "wrong_path":
            path = rnd.choice(["/", "/v1", "/v1/completion", "/v2/completions", "/../etc/passwd", "/v1/completions/x",
                               "/%00", "/" + "a" * 500])
            body = json.dumps(good).encode()
        elif kind == "wrong_method":
            method = rnd.choice(["PUT", "DELETE", "PATCH"])
            body = json.dumps(good).encode()
        elif kind == "oversize_claim":
            headers["Content-Length"] = str(rnd.choice([2**21, 2**40, 2**63]))
            body = b"{}"
        else:  # truncated_json
            full = json.dumps(good).encode()
            body = full[: rnd.randint(1, len(full) - 1)]
        yield kind, method, path, body, headers


@pytest.mark.slow
def test_ten_thousand_hostile_http_requests_get_4xx_and_change_nothing(served: Served) -> None:
    """Fuzz of the HTTP API (issue 8): every hostile request gets a 4xx with a JSON error, none a 5xx
    or a hang; afterwards the server answers a valid request exactly as before."""
    host, port = served.url.removeprefix("http://").split(":")
    _, before = post(served.url, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    answered: dict[str, dict[int, int]] = {}
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    for kind, method, path, body, headers in _hostile_requests(seed=7, count=10_000):
        send_headers = {"Content-Length": str(len(body)), **headers}
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in send_headers.items():
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            payload = resp.read()
            status = resp.status
        except (http.client.HTTPException, ConnectionError):  # the server may close after a bad request
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            continue_status = -1
            status, payload = continue_status, b""
        if resp.getheader("Connection", "").lower() == "close" or status == -1:
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
        answered.setdefault(kind, {}).setdefault(status, 0)
        answered[kind][status] += 1
        assert status == -1 or 400 <= status < 500, (kind, method, path, body[:80], status, payload[:200])
        if status != -1 and method == "POST" and path == "/v1/completions":
            assert "error" in json.loads(payload), payload[:200]
    conn.close()
    total = sum(sum(v.values()) for v in answered.values())
    dropped = sum(v.get(-1, 0) for v in answered.values())
    assert total == 10_000 and dropped < 0.01 * total, answered
    print("http fuzz:", json.dumps(answered, sort_keys=True))
    status, after = post(served.url, {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert served.engine.active_count == 0
