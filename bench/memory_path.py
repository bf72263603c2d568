"""Memory-path benchmark (`ultramem bench memory-path`, issue "the memory path at GPU speed").

The memory path alone, as a GPU worker would drive it, with no dense compute: the real
`RemoteBackend` and `Client` against `ultramem shard serve` processes. Each training step of one
memory layer is a PooledGather, a PooledBackward and the optimizer update it queues (sync mode:
the next step's lookup waits for it to be applied). Two layers:
  * paper - H=2 heads x m=80 selections (160 per token), E=4, h=2 cores, d_v=384, P=65,536 rows;
  * small - the `small` preset's layer: H=2 x m=8 (16 per token), E=4, h=2, d_v=128, P=4,096.
Tokens per step 1 / 64 / 2048 (--quick: 1 / 64), 1, 2 and 4 shard processes (--quick: 1, 2).

Measured in one run, legs interleaved repeat by repeat (the machine may be loaded by others, so
ratios between legs of one run are the figures to read, medians of the repeats):
  * the floor: the same pooled lookup (same rows, same weights) in this process on one thread by
    the fastest plain library call: the better of numpy fancy indexing (gather + weighted sum)
    and torch `embedding_bag` (sum mode, per_sample_weights);
  * the shards' CPU-s per million selections for each call type: Gather (of a step's unique
    rows), PooledGather, PooledBackward (without the update it queues) and the optimizer step
    (the apply thread: duplicate sums + lazy AdamW; the shard's `apply_cpu_s` counter), read from
    /proc for the processes; their ratio to the floor;
  * the worker's CPU per token (this process: the client's encoding, routing and decoding);
  * memory-path tokens/s per shard count and tokens per step;
  * Gather's wire bytes/s against a raw loopback socket moving the same bytes.
Writes <out>/memory_path.json and prints the verdicts (target <= 3x the floor, aim 1.5x).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # bench/*.py, when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._shards import start_shards, stop_shards  # noqa: E402 (after the sys.path line)
from bench.lookup import socket_rate, tune_malloc  # noqa: E402
from model_workers.remote import RemoteBackend  # noqa: E402
from param_server.client import Client, ClientConfig  # noqa: E402
from param_server.server import DEFAULT_MAX_MESSAGE_BYTES  # noqa: E402
from storage.layout import TableSpec, init_partition_values  # noqa: E402
from storage.table_store import create_table  # noqa: E402

CALLS = ("gather", "pooled_gather", "pooled_backward", "optimizer_step")
TARGET, AIM = 3.0, 1.5  # shard CPU per selection over the floor's
_TICK = os.sysconf("SC_CLK_TCK")


class Layer(NamedTuple):  # not a dataclass: `ultramem bench` loads this file without sys.modules
    name: str
    rows: int  # P
    d_v: int
    heads: int  # H
    topk: int  # m
    expansion: int  # E
    cores: int  # h

    @property
    def per_token(self) -> int:
        return self.heads * self.topk


def layers(quick: bool) -> list[Layer]:
    return [Layer("paper", 16_384 if quick else 65_536, 384, 2, 80, 4, 2),
            Layer("small", 4_096, 128, 2, 8, 4, 2)]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def step_inputs(layer: Layer, tokens: int, seed: int) -> dict[str, np.ndarray]:
    """One step's selections, token-major as a worker sends them: rows [n], projector [n], token [n],
    scores float32 [n, h], grad_out float32 [T, E, d_v]."""
    rng = np.random.default_rng(seed)
    n = tokens * layer.per_token
    return {"rows": rng.integers(0, layer.rows, n, dtype=np.int64),
            "projector": rng.integers(0, layer.expansion, n, dtype=np.int64),
            "token": np.repeat(np.arange(tokens, dtype=np.int64), layer.per_token),
            "scores": rng.standard_normal((n, layer.cores), dtype=np.float32),
            "grad_out": rng.standard_normal((tokens, layer.expansion, layer.d_v), dtype=np.float32) * 1e-3}


def floor_cpu_s(table: np.ndarray, x: dict[str, np.ndarray], layer: Layer) -> dict[str, float]:
    """CPU seconds of the same pooled lookup by one plain library call, one thread: numpy fancy
    indexing (gather, then one weighted sum per token) and torch embedding_bag with weights."""
    n, tokens = x["rows"].shape[0], x["grad_out"].shape[0]
    w = x["scores"][:, 0].copy()
    t_table, t_rows, t_w = torch.from_numpy(table), torch.from_numpy(x["rows"]), torch.from_numpy(w)
    offsets = torch.arange(0, n, layer.per_token, dtype=torch.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        c0 = time.thread_time()
        torch.nn.functional.embedding_bag(t_rows, t_table, offsets, mode="sum", per_sample_weights=t_w)
        c1 = time.thread_time()
        g = table[x["rows"]].reshape(tokens, layer.per_token, layer.d_v)
        np.einsum("tkd,tk->td", g, w.reshape(tokens, layer.per_token))
        c2 = time.thread_time()
    finally:
        torch.set_num_threads(threads)
    return {"embedding_bag": c1 - c0, "numpy": c2 - c1}


class ShardCpu:
    """CPU seconds the shard processes spent between two reads, and their apply threads."""

    def __init__(self, procs, client: Client) -> None:
        self.pids = [p.pid for p in procs]
        self.client = client

    def read(self) -> tuple[float, float]:
        apply = sum(s["metrics"].get("apply_cpu_s", 0.0) for s in self.client.info())
        return sum(proc_cpu_s(pid) for pid in self.pids), apply


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_layer(layer: Layer, tokens: int, procs, client: Client, table: np.ndarray, repeats: int,
              step0: int) -> dict[str, Any]:
    """Interleaved legs for one layer and tokens per step; per-repeat figures, then medians."""
    spec_name = layer.name
    spec = TableSpec(name=spec_name, rows=layer.rows, dim=layer.d_v, num_partitions=16, optimizer="adamw")
    backend = RemoteBackend(client, [spec], consistency="sync")
    cpu = ShardCpu(procs, client)
    per: dict[str, list[float]] = {k: [] for k in (*CALLS, "floor", "floor_numpy", "floor_embedding_bag",
                                                   "worker_cpu_per_token", "tokens_per_s", "gather_bytes_per_s")}
    # legs are repeated within a repeat until ~`min_leg_s` of wall time, so /proc's 10 ms ticks count
    min_leg_s = 0.3
    step = step0
    for rep in range(repeats + 1):  # repeat 0 warms up (connections, first-touch pages)
        x = step_inputs(layer, tokens, seed=1000 * rep + tokens)
        n = x["rows"].shape[0]
        args = [torch.from_numpy(x[k]) for k in ("rows", "projector", "token", "scores")]
        unique = np.unique(x["rows"])
        # leg 1: the floor, in this process
        fl = floor_cpu_s(table, x, layer)
        # leg 2: PooledGather alone
        (c0, a0), k, t0 = cpu.read(), 0, time.perf_counter()
        while k == 0 or time.perf_counter() - t0 < min_leg_s:
            backend.pooled(spec_name, *args, tokens, layer.expansion)
            k += 1
        (c1, a1) = cpu.read()
        pooled_cpu = (c1 - c0 - (a1 - a0)) / (k * n)
        # leg 3: full training steps (lookup + backward + the update applied before the next lookup)
        (c0, a0), k, w0, t0 = cpu.read(), 0, time.process_time(), time.perf_counter()
        while k == 0 or time.perf_counter() - t0 < min_leg_s:
            backend.begin_step(step, 1e-3)
            backend.pooled(spec_name, *args, tokens, layer.expansion)
            backend.pooled_backward(spec_name, *args, torch.from_numpy(x["grad_out"]))
            step += 1
            k += 1
        backend.flush()
        client.gather(spec_name, unique[:1], min_step=step - 1)  # the last update applied
        wall, worker = time.perf_counter() - t0, time.process_time() - w0
        (c1, a1) = cpu.read()
        step_cpu, apply_cpu = (c1 - c0 - (a1 - a0)) / (k * n), (a1 - a0) / (k * n)
        # leg 4: Gather of the step's unique rows
        (c0, a0), j, t0 = cpu.read(), 0, time.perf_counter()
        while j == 0 or time.perf_counter() - t0 < min_leg_s:
            client.gather(spec_name, unique)
            j += 1
        g_wall = time.perf_counter() - t0
        (c1, a1) = cpu.read()
        if rep == 0:
            continue
        per["floor_embedding_bag"].append(fl["embedding_bag"] / n)
        per["floor_numpy"].append(fl["numpy"] / n)
        per["floor"].append(min(fl.values()) / n)
        per["pooled_gather"].append(pooled_cpu)
        per["pooled_backward"].append(max(0.0, step_cpu - pooled_cpu))
        per["optimizer_step"].append(apply_cpu)
        per["gather"].append((c1 - c0 - (a1 - a0)) / (j * unique.size))
        per["worker_cpu_per_token"].append(worker / (k * tokens))
        per["tokens_per_s"].append(k * tokens / wall)
        per["gather_bytes_per_s"].append(j * unique.size * layer.d_v * 4 / g_wall)
    out = {k: _median(v) * (1e6 if k in (*CALLS, "floor", "floor_numpy", "floor_embedding_bag") else 1)
           for k, v in per.items()}  # CPU-s per selection -> per million selections
    out["selections_per_step"] = tokens * layer.per_token
    out["unique_rows_per_step"] = int(np.unique(step_inputs(layer, tokens, 1000 + tokens)["rows"]).size)
    out["steps"] = step - step0
    return out


def run(out_dir: str | Path = "bench/results", quick: bool = False) -> dict[str, Any]:
    """Measure everything, print the table and verdicts, write <out_dir>/memory_path.json."""
    tune_malloc()
    token_counts = (1, 64) if quick else (1, 64, 2048)
    shard_counts = (1, 2) if quick else (1, 2, 4)
    repeats = 3 if quick else 5
    lays = layers(quick)
    results: dict[str, Any] = {"quick": quick, "repeats": repeats, "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg(),
                               "layers": {lay.name: lay._asdict() for lay in lays}, "runs": {}}
    config = ClientConfig(chunk_bytes=1 << 20, max_in_flight=8, channels_per_shard=4,
                          max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-") as tmp:
        paths, tables = [], {}
        for lay in lays:
            spec = TableSpec(name=lay.name, rows=lay.rows, dim=lay.d_v, num_partitions=16, optimizer="adamw")
            create_table(Path(tmp) / lay.name, spec)
            paths.append(Path(tmp) / lay.name)
            full = np.empty((lay.rows, lay.d_v), np.float32)  # the floor's copy of the same values
            r = np.arange(lay.rows)
            for p in range(16):
                full[r[r % 16 == p]] = init_partition_values(spec, p)[: (r % 16 == p).sum()]
            tables[lay.name] = full
        for num_shards in shard_counts:
            procs, addresses = start_shards(paths, num_shards)
            try:
                rss = [proc_rss_mb(p.pid) for p in procs]
                with Client(addresses, config=config) as client:
                    step0 = 0
                    for lay in lays:
                        for tokens in token_counts:
                            key = f"{lay.name}/{tokens}/{num_shards}"
                            results["runs"][key] = run_layer(lay, tokens, procs, client, tables[lay.name],
                                                             repeats, step0)
                            step0 += results["runs"][key]["steps"] + 1
                results.setdefault("shard_rss_mb_after_load", {})[str(num_shards)] = rss
            finally:
                stop_shards(procs)
    _summarise(results, lays, token_counts, shard_counts)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "memory_path.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'memory_path.json'}")
    return results


def _summarise(results: dict[str, Any], lays: list[Layer], token_counts, shard_counts) -> None:
    """The headline keys (one shard, the most tokens per step of each layer), a table and verdicts."""
    runs = results["runs"]
    big = token_counts[-1]
    results["shard_cpu_s_per_m_selections"] = {
        lay.name: {c: runs[f"{lay.name}/{big}/1"][c] for c in CALLS} for lay in lays}
    results["floor_cpu_s_per_m_selections"] = {lay.name: runs[f"{lay.name}/{big}/1"]["floor"] for lay in lays}
    results["ratio_to_floor"] = {
        lay.name: {c: results["shard_cpu_s_per_m_selections"][lay.name][c]
                   / results["floor_cpu_s_per_m_selections"][lay.name] for c in CALLS} for lay in lays}
    results["tokens_per_s"] = {lay.name: {f"{s} shards/{t} tokens": runs[f"{lay.name}/{t}/{s}"]["tokens_per_s"]
                                          for s in shard_counts for t in token_counts} for lay in lays}
    results["worker_cpu_s_per_token"] = {lay.name: runs[f"{lay.name}/{big}/1"]["worker_cpu_per_token"]
                                         for lay in lays}
    paper = runs[f"{lays[0].name}/{big}/1"]
    nbytes = int(np.unique(step_inputs(lays[0], big, 1000 + big)["rows"]).size) * lays[0].d_v * 4
    sock = socket_rate(nbytes, 5)
    results["socket_bytes_per_s"] = sock
    results["gather_vs_socket"] = paper["gather_bytes_per_s"] / sock
    print(f"memory-path bench: medians of {results['repeats']} interleaved repeats, "
          f"{results['cpus']} CPUs, load average {results['load_avg'][0]:.1f} at the start")
    print("  shard CPU-s per million selections (1 shard), ratio to the floor (target <= 3x, aim 1.5x):")
    for lay in lays:
        fl = results["floor_cpu_s_per_m_selections"][lay.name]
        r = runs[f"{lay.name}/{big}/1"]
        print(f"  {lay.name:6s} {big} tokens/step  floor {fl:.3f} (numpy {r['floor_numpy']:.3f}, "
              f"embedding_bag {r['floor_embedding_bag']:.3f})")
        for c in CALLS:
            ratio = results["ratio_to_floor"][lay.name][c]
            verdict = "aim met" if ratio <= AIM else "target met" if ratio <= TARGET else "MISSED"
            print(f"    {c:16s} {results['shard_cpu_s_per_m_selections'][lay.name][c]:8.3f}  "
                  f"{ratio:6.2f}x floor  {verdict}")
        print(f"    worker CPU per token {results['worker_cpu_s_per_token'][lay.name] * 1e6:.0f} us")
    print("  memory-path tokens/s (lookup + backward + update per step):")
    for lay in lays:
        cells = "  ".join(f"{s}sh/{t}tok {runs[f'{lay.name}/{t}/{s}']['tokens_per_s']:9.0f}"
                          for s in shard_counts for t in token_counts)
        print(f"    {lay.name:6s} {cells}")
    print(f"  Gather ({nbytes / 1e6:.1f} MB answers, 1 shard): {paper['gather_bytes_per_s'] / 1e9:.2f} GB/s = "
          f"{results['gather_vs_socket']:.2f}x the raw socket ({sock / 1e9:.2f} GB/s)")


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
