"""Load: 16 concurrent clients x 500 mixed lookups and pushes each against 2 shards on loopback.

docs/reliability.md, "load". Each client (its own worker id) sends tiny gathers (with min_step =
its own last pushed step, so read-your-writes waits are exercised) and tiny SGD pushes, in a fixed
random mix; the shards' apply queues hold at most `MAX_PENDING` pushes, so backpressure
(RESOURCE_EXHAUSTED) really happens and the client retries it. Values and gradients are small
integers and lr is 0.5, so every float32 update is exact and the final table must equal the
initial one minus lr * (sum of all pushed gradients) exactly, whatever the order of application.
Also asserted: no error reaches a caller, queue depth stays <= MAX_PENDING, RSS growth is bounded,
the run stops by itself (count and time bounds). p50 / p99 latencies are printed (-s) and kept in
docs/reliability.md, measured with ULTRAMEM_TEST_LOAD_REQUESTS=2000 (calls per client; the suite
makes 500, 8,000 in all).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import pytest

from param_server.client import Client, ClientConfig
from param_server.server import create_server
from param_server.shard import Shard, ShardConfig
from storage.layout import TableSpec

SPEC = TableSpec(name="mem", rows=512, dim=4, num_partitions=8, optimizer="sgd")
CLIENTS, REQUESTS = 16, int(os.environ.get("ULTRAMEM_TEST_LOAD_REQUESTS", "500"))
MAX_PENDING = 2  # tiny on purpose: backpressure must happen
LR = 0.5
TIME_LIMIT_S = 240.0  # the run gives up (and fails) after this, whatever happens
RSS_GROWTH_LIMIT = 200 << 20
RETRYING = ClientConfig(timeout_s=30.0, max_attempts=60, backoff_s=0.001, max_backoff_s=0.05)


@dataclass
class Worker:
    """One client's plan and what it measured."""

    worker_id: int
    gather_s: list[float] = field(default_factory=list)
    push_s: list[float] = field(default_factory=list)
    pushed: np.ndarray = field(default_factory=lambda: np.zeros((SPEC.rows, SPEC.dim), np.float64))
    error: BaseException | None = None


def _initial_table() -> np.ndarray:
    """Small integers [P, d_v] as float32 (exact under every update of this test)."""
    return (np.arange(SPEC.rows * SPEC.dim).reshape(SPEC.rows, SPEC.dim) % 17 - 8).astype(np.float32)


def _partitions(table: np.ndarray, owned: range) -> dict[int, dict[str, np.ndarray]]:
    r, np_ = SPEC.rows_per_partition, SPEC.num_partitions
    out = {}
    for p in owned:
        part = np.zeros((r, SPEC.dim), np.float32)
        local = table[p::np_]
        part[: local.shape[0]] = local
        out[p] = {"values": part}
    return out


def _drive(w: Worker, addresses: list[str], stop_at: float) -> None:
    """REQUESTS calls, half gathers half pushes in a seeded random order; stops at `stop_at`."""
    rng = np.random.default_rng(w.worker_id)
    step = -1
    try:
        with Client(addresses, worker_id=w.worker_id, config=RETRYING) as client:
            for is_push in rng.random(REQUESTS) < 0.5:
                if time.monotonic() > stop_at:
                    raise TimeoutError(f"worker {w.worker_id} ran past {TIME_LIMIT_S} s")
                rows = rng.integers(0, SPEC.rows, size=3)
                start = time.perf_counter()
                if is_push:
                    grads = rng.integers(-1, 2, size=(3, SPEC.dim)).astype(np.float32)
                    step += 1
                    client.push("mem", rows, grads, lr=LR, step=step)
                    w.push_s.append(time.perf_counter() - start)
                    np.add.at(w.pushed, rows, grads)
                else:
                    client.gather("mem", rows, min_step=step if step >= 0 else None)
                    w.gather_s.append(time.perf_counter() - start)
    except Exception as err:  # noqa: BLE001 -- handed to the main thread, which fails the test with it
        w.error = err


def _ms(samples: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(samples), q) * 1e3)


@pytest.mark.slow
def test_sixteen_clients_under_backpressure_end_with_the_exact_sum_of_all_pushes() -> None:
    table = _initial_table()
    shards = [Shard(ShardConfig(max_pending=MAX_PENDING), shard_id=s) for s in range(2)]
    servers = []
    for s, shard in enumerate(shards):
        shard.add_table(SPEC, _partitions(table, range(s, SPEC.num_partitions, 2)))
        servers.append(create_server(shard)[0].start())
    addresses = [server.address for server in servers]
    process = psutil.Process()
    done = threading.Event()
    peaks = {"depth": 0.0, "rss": 0}

    def watch() -> None:
        while not done.wait(0.005):
            peaks["depth"] = max([peaks["depth"], *(s.metrics()["queue_depth"] for s in shards)])
            peaks["rss"] = max(peaks["rss"], process.memory_info().rss)

    try:
        workers = [Worker(i) for i in range(CLIENTS)]
        rss_before = process.memory_info().rss
        stop_at = time.monotonic() + TIME_LIMIT_S
        threads = [threading.Thread(target=_drive, args=(w, addresses, stop_at)) for w in workers]
        watcher = threading.Thread(target=watch)
        start = time.monotonic()
        for t in [watcher, *threads]:
            t.start()
        for t in threads:
            t.join(TIME_LIMIT_S + 60)
        elapsed = time.monotonic() - start
        done.set()
        watcher.join()
        assert not any(t.is_alive() for t in threads), "a client is still running"
        errors = [w.error for w in workers if w.error is not None]
        assert not errors, errors[:3]

        with Client(addresses, config=RETRYING) as reader:
            for shard in shards:
                shard.drain(timeout=60)
            final = reader.gather("mem", np.arange(SPEC.rows))
        want = table - LR * sum(w.pushed for w in workers)
        np.testing.assert_array_equal(final, want.astype(np.float32))

        rejected = sum(s.metrics()["queue_full_rejections"] for s in shards)
        pushes = sum(len(w.push_s) for w in workers)
        gathers = sum(len(w.gather_s) for w in workers)
        assert pushes + gathers == CLIENTS * REQUESTS
        assert rejected > 0  # backpressure happened, and every rejected push was retried to success
        assert peaks["depth"] <= MAX_PENDING
        assert peaks["rss"] - rss_before < RSS_GROWTH_LIMIT
        all_gather = [x for w in workers for x in w.gather_s]
        all_push = [x for w in workers for x in w.push_s]
        print(f"\nload: {CLIENTS} clients x {REQUESTS} requests in {elapsed:.1f} s "
              f"({CLIENTS * REQUESTS / elapsed:.0f} calls/s); {gathers} gathers, {pushes} pushes "
              f"({2 * pushes} push RPCs), {rejected:.0f} RESOURCE_EXHAUSTED answers retried\n"
              f"  gather p50 {_ms(all_gather, 0.5):.2f} ms  p99 {_ms(all_gather, 0.99):.2f} ms\n"
              f"  push   p50 {_ms(all_push, 0.5):.2f} ms  p99 {_ms(all_push, 0.99):.2f} ms\n"
              f"  max queue depth {peaks['depth']:.0f} (limit {MAX_PENDING}); "
              f"RSS growth {(peaks['rss'] - rss_before) / 2**20:.1f} MiB")
    finally:
        for server, shard in zip(servers, shards):
            server.stop(0)
            shard.close()
