"""Lookup benchmark (`ultramem bench lookup`, DESIGN §4.2, §8): remote Gather vs its limits.

Side by side, in one run, on this machine:
  * numpy   - an in-process gather of the same rows from a numpy table (np.take into a reused buffer);
  * socket  - the same bytes over a plain TCP socket on loopback (recv_into a reused buffer): the
              transport limit;
  * echo    - a bare gRPC server process answering the same bytes in ~1 MB answers with the
              client's channel settings (bench/_echo.py), as unary calls and as server streams:
              what gRPC itself reaches, with no shard work;
  * grpc    - `Client.gather` over loopback gRPC to 1 and 2 shard processes (`ultramem shard serve`),
              fp32 and bf16 wire, d_v = 256, 65,536 unique rows per request; and PooledGather of
              the same rows as decode-shaped lookups.
Every process is started first; then the legs take turns, round after round (after a warm-up
round), so a change in the machine's load hits them alike. Rates are medians over the rounds;
ratios (to the socket and the echo in bytes/s, to numpy in rows/s) are medians of the ratios
within each round. Everything is written to <out>/lookup.json. The shard processes set their own
glibc malloc settings (param_server/allocator.py, as every shard does), the echo server gets a
shard's through its environment, and this process sets a worker's with mallopt. A breakdown says
where a gRPC lookup's time goes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # bench/_shards.py, when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._echo import METHOD as ECHO_METHOD  # noqa: E402 (after the sys.path line)
from bench._echo import STREAM_METHOD as ECHO_STREAM_METHOD  # noqa: E402
from bench._shards import start_shards, stop_shards  # noqa: E402
from param_server import allocator, fanout
from param_server.checks import repeats_of
from param_server.client import Client, ClientConfig
from param_server.fanout import split
from param_server.server import DEFAULT_MAX_MESSAGE_BYTES, grpc_options
from storage.layout import TableSpec
from storage.table_store import create_table

REPO = Path(__file__).resolve().parent.parent


def tune_malloc() -> bool:
    """This process (the worker's side) gets a model worker's malloc settings, as a launched worker does."""
    return bool(allocator.apply(allocator.worker_settings()))


def _median_rate(fn, amount: float, repeats: int) -> tuple[float, list[float]]:
    """Run fn() `repeats` times after one warm-up; median of amount / seconds."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return amount / statistics.median(times), times


# -- the raw socket limit -------------------------------------------------------------------------
def _socket_server(listener: socket.socket, payload: memoryview) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            head = conn.recv(8)
            if len(head) < 8:
                return
            conn.sendall(payload[: int.from_bytes(head, "little")])


@contextlib.contextmanager
def socket_transfer(nbytes: int) -> Iterator[Callable[[], None]]:
    """A function that moves `nbytes` once, request-response over loopback TCP, into a reused buffer."""
    payload = memoryview(np.random.default_rng(0).bytes(nbytes))
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=_socket_server, args=(listener, payload), daemon=True)
    thread.start()
    view = memoryview(bytearray(nbytes))
    try:
        with socket.create_connection(listener.getsockname()) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def once() -> None:
                conn.sendall(nbytes.to_bytes(8, "little"))
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:])

            yield once
    finally:
        thread.join(timeout=5)
        listener.close()


def socket_rate(nbytes: int, repeats: int) -> float:
    """Bytes/s of request-response transfers of `nbytes` over loopback TCP, into a reused buffer."""
    with socket_transfer(nbytes) as once:
        return _median_rate(once, nbytes, repeats)[0]


@contextlib.contextmanager
def echo_calls(nbytes: int, config: ClientConfig) -> Iterator[dict[str, Callable[[], None]]]:
    """gRPC alone: functions that fetch `nbytes` in ~1 MB answers from a bare server process
    (bench/_echo.py) with the client's channels, as unary calls ("unary": max_in_flight in flight, as
    a lookup of one answer per shard sends them) and as server streams ("stream": stream_answers
    answers a call, one call a channel at a time, as Client.gather streams a larger lookup)."""
    chunk = config.chunk_bytes
    env = {**os.environ, **allocator.shard_settings(budgeted=False), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "_echo.py"), str(chunk)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO)
    channels: list[grpc.Channel] = []
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip().removeprefix("listening on ")
        options = grpc_options(config.max_message_bytes) + [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(address, options=options) for _ in range(config.channels_per_shard)]
        calls = [ch.unary_unary(ECHO_METHOD) for ch in channels]
        streams = [ch.unary_stream(ECHO_STREAM_METHOD) for ch in channels]
        calls[0](b"", timeout=60)
        rpcs = -(-nbytes // chunk)

        def unary() -> None:
            pending: list[grpc.Future] = []
            for i in range(rpcs):
                pending.append(calls[i % len(calls)].future(b"", timeout=60))
                if len(pending) >= config.max_in_flight:
                    pending.pop(0).result()
            for f in pending:
                f.result()

        sizes = [b - a for a, b in split(rpcs, config.stream_answers)]
        lanes = [(streams[i], sizes[i::len(streams)]) for i in range(min(len(streams), len(sizes)))]

        def lane(stream: Any, counts: list[int]) -> None:
            for count in counts:
                for _ in stream(count.to_bytes(8, "little"), timeout=60):
                    pass

        def streamed() -> None:
            threads = [threading.Thread(target=lane, args=one) for one in lanes[:-1]]
            for t in threads:
                t.start()
            lane(*lanes[-1])
            for t in threads:
                t.join()

        yield {"unary": unary, "stream": streamed}
    finally:
        for ch in channels:
            ch.close()
        stop_shards([proc])


def _breakdown(client: Client, rows: np.ndarray, out: np.ndarray, d_v: int) -> dict[str, float]:
    """Seconds per lookup spent in dedupe/route (client CPU), in one ~1 MB RPC, and in total."""
    t0 = time.perf_counter()
    repeats_of(rows, client.table("bench").rows)  # what Client.gather does before sending
    fanout.by_shard(client.partition_map, rows)
    t_route = time.perf_counter() - t0
    one = rows[: max(1, (1 << 20) // (d_v * 4))]
    client.gather("bench", one)
    t0 = time.perf_counter()
    for _ in range(10):
        client.gather("bench", one)
    t_rpc = (time.perf_counter() - t0) / 10
    t0 = time.perf_counter()
    client.gather("bench", rows, out=out)
    t_total = time.perf_counter() - t0
    n_chunks = -(-rows.size // one.size)
    return {"route_s": t_route, "one_1mb_rpc_s": t_rpc, "chunks": n_chunks,
            "sequential_chunks_s": t_rpc * n_chunks, "total_s": t_total}


class Leg(NamedTuple):
    """One timed thing: fn() does `amount` units (rows or bytes) and moves `wire` bytes."""

    fn: Callable[[], Any]
    amount: int
    wire: int


def _pooled_leg(client: Client, rows: np.ndarray, num_shards: int, d_v: int, wire_dtype: str, itemsize: int) -> Leg:
    """PooledGather of the same rows as decode-shaped lookups: 160 selections per token (H=2, m=80),
    E = 4, h = 2. Bytes on the wire, by counting: per selection 3 int32 ids + 2 fp32 scores up,
    per token and shard touched E*d_v sums down (random rows: every token touches every shard)."""
    per_token, e, h = 160, 4, 2
    tokens = rows.size // per_token
    n = tokens * per_token
    sel, token = rows[:n], np.repeat(np.arange(tokens, dtype=np.int64), per_token)
    projector = np.random.default_rng(3).integers(0, e, n).astype(np.int64)
    scores = np.random.default_rng(4).random((n, h), dtype=np.float32)
    wire = n * (3 * 4 + h * 4) + num_shards * tokens * e * d_v * itemsize  # bytes per lookup
    return Leg(lambda: client.pooled_gather("bench", sel, projector, token, scores, tokens, e, wire_dtype=wire_dtype),
               n, wire)


def interleaved(legs: dict[str, Leg], rounds: int) -> dict[str, list[float]]:
    """Seconds of each leg, `rounds` times, the legs taking turns within a round (after one warm-up
    round), so that a change in the machine's load hits every leg alike."""
    times: dict[str, list[float]] = {name: [] for name in legs}
    for r in range(rounds + 1):
        for name, leg in legs.items():
            t0 = time.perf_counter()
            leg.fn()
            if r:
                times[name].append(time.perf_counter() - t0)
    return times


def run(out_dir: str | Path = "bench/results", quick: bool = False) -> dict[str, Any]:
    """Measure everything, print a table, write <out_dir>/lookup.json; returns the results dict."""
    tuned = tune_malloc()
    d_v = 256
    n_rows = 16_384 if quick else 65_536
    table_rows = 4 * n_rows
    repeats = 3 if quick else 5
    rows = np.random.default_rng(1).choice(table_rows, size=n_rows, replace=False).astype(np.int64)
    results: dict[str, Any] = {"d_v": d_v, "rows_per_request": n_rows, "table_rows": table_rows,
                               "repeats": repeats, "interleaved": True, "malloc_tuned": tuned,
                               "malloc_for_shards": allocator.shard_settings(budgeted=False), "cpus": os.cpu_count(),
                               "load_avg_at_start": os.getloadavg(), "grpc": {}}
    local = np.random.default_rng(2).standard_normal((table_rows, d_v)).astype(np.float32)
    buf = np.empty((n_rows, d_v), np.float32)
    fp32_bytes = n_rows * d_v * 4
    config = ClientConfig(chunk_bytes=1 << 20, max_in_flight=8, channels_per_shard=4,
                          max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    legs: dict[str, Leg] = {"numpy": Leg(lambda: np.take(local, rows, axis=0, out=buf), n_rows, 0)}
    with contextlib.ExitStack() as stack:
        legs["socket"] = Leg(stack.enter_context(socket_transfer(fp32_bytes)), fp32_bytes, fp32_bytes)
        echo = stack.enter_context(echo_calls(fp32_bytes, config))
        legs["echo_unary"] = Leg(echo["unary"], fp32_bytes, fp32_bytes)
        legs["echo_stream"] = Leg(echo["stream"], fp32_bytes, fp32_bytes)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ultramem-bench-")))
        spec = TableSpec(name="bench", rows=table_rows, dim=d_v, num_partitions=16, optimizer="sgd")
        create_table(tmp / "bench", spec)
        clients = {}
        for num_shards in (1, 2):  # both sets of shard processes up, so that every leg takes turns
            procs, addresses = start_shards([tmp / "bench"], num_shards)
            stack.callback(stop_shards, procs)
            clients[num_shards] = stack.enter_context(Client(addresses, config=config))
        for num_shards, client in clients.items():
            for wire_dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
                legs[f"{wire_dtype}/{num_shards}"] = Leg(
                    lambda c=client, w=wire_dtype: c.gather("bench", rows, wire_dtype=w, out=buf),
                    n_rows, n_rows * d_v * itemsize)
            for wire_dtype, itemsize in (("float32", 4), ("bfloat16", 2)):
                legs[f"pooled-{wire_dtype}/{num_shards}"] = _pooled_leg(client, rows, num_shards, d_v, wire_dtype,
                                                                        itemsize)
        times = interleaved(legs, repeats)
        for num_shards, client in clients.items():
            results["grpc"][f"breakdown/{num_shards}"] = _breakdown(client, rows, buf, d_v)

    def rate(name: str, unit: str = "amount") -> float:
        return getattr(legs[name], unit) / statistics.median(times[name])

    def ratio(name: str, to: str, unit: str = "wire") -> float:
        """Median over rounds of the two legs' rates in the same round."""
        return statistics.median(getattr(legs[name], unit) / a / (getattr(legs[to], unit) / b)
                                 for a, b in zip(times[name], times[to]))

    results["numpy_rows_per_s"] = rate("numpy")
    results["socket_bytes_per_s"] = rate("socket")
    results["grpc_echo_unary_bytes_per_s"] = rate("echo_unary")
    results["grpc_echo_bytes_per_s"] = rate("echo_stream")  # how Client.gather calls at this size
    results["grpc_echo_ratio_to_socket_bytes"] = ratio("echo_stream", "socket")
    results["grpc_echo_unary_ratio_to_socket_bytes"] = ratio("echo_unary", "socket")
    for name, leg in legs.items():
        if "/" not in name:
            continue
        entry = {"rows_per_s": rate(name), "wire_bytes_per_s": rate(name, "wire"), "times_s": times[name],
                 "ratio_to_socket_bytes": ratio(name, "socket"), "ratio_to_echo_bytes": ratio(name, "echo_stream"),
                 "ratio_to_numpy_rows": statistics.median(
                     (leg.amount / a) / (legs["numpy"].amount / b) for a, b in zip(times[name], times["numpy"]))}
        if name.startswith("pooled"):
            entry["bytes_per_lookup"] = leg.wire
        results["grpc"][name] = entry

    sock = results["socket_bytes_per_s"]
    print(f"lookup bench: {n_rows} unique rows x d_v={d_v} per request, {repeats} rounds, legs taking turns; "
          "ratios are medians of same-round ratios")
    print(f"  numpy in-process gather    {results['numpy_rows_per_s'] / 1e6:8.2f} M rows/s")
    print(f"  raw TCP socket (loopback)  {sock / 1e9:8.2f} GB/s  = {sock / (d_v * 4) / 1e6:.2f} M fp32 rows/s")
    echo, unary = results["grpc_echo_bytes_per_s"], results["grpc_echo_unary_bytes_per_s"]
    print(f"  gRPC alone, unary calls    {unary / 1e9:8.2f} GB/s  = "
          f"{results['grpc_echo_unary_ratio_to_socket_bytes']:.2f}x socket")
    print(f"  gRPC alone, streamed       {echo / 1e9:8.2f} GB/s  = {results['grpc_echo_ratio_to_socket_bytes']:.2f}x "
          "socket: gRPC's own ceiling, as Client.gather calls (\"echo\" below)")
    for key, r in results["grpc"].items():
        if key.startswith("breakdown"):
            continue
        wire_dtype, shards = key.split("/")
        print(f"  gRPC {wire_dtype:15s} {shards} shard(s)  {r['rows_per_s'] / 1e6:8.2f} M rows/s  "
              f"{r['wire_bytes_per_s'] / 1e9:6.2f} GB/s wire  = {r['ratio_to_socket_bytes']:.2f}x socket, "
              f"{r['ratio_to_numpy_rows']:.3f}x numpy, {r['ratio_to_echo_bytes']:.2f}x echo")
    for shards in (1, 2):
        b = results["grpc"][f"breakdown/{shards}"]
        print(f"  where the time goes ({shards} shard(s), fp32): total {b['total_s'] * 1e3:.1f} ms = "
              f"{b['chunks']} chunks; one 1 MB RPC alone {b['one_1mb_rpc_s'] * 1e3:.2f} ms "
              f"(sequential would be {b['sequential_chunks_s'] * 1e3:.1f} ms); "
              f"dedupe+route {b['route_s'] * 1e3:.1f} ms")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "lookup.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'lookup.json'}")
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
