"""Memory-path benchmark (`ultramem bench memory-path`): the memory path at GPU speed.

The memory path alone, as a GPU worker would drive it, with no dense compute: the real
`RemoteBackend` and `Client` against `ultramem shard serve` processes. Each training step of one
memory layer is a PooledGather, a PooledBackward and the optimizer update it queues (sync mode:
the next step's lookup waits for it to be applied). Two layers:
  * paper - H=2 heads x m=80 selections (160 per token), E=4, h=2 cores, d_v=384, P=65,536 rows;
  * small - the `small` preset's layer: H=2 x m=8 (16 per token), E=4, h=2, d_v=128, P=4,096.
and the same two shapes as UltraMemV2 layers (DESIGN §3.3; `MemoryConfig.ultramem_v2`, as in
bench/wire.py's V2 leg): one shared projector (a token's pooled answer is one [d_v] sum) and a
pre-value table P_tab [P, d_p], d_p = d_v // 3, beside the value table (same rows and partitions).
The worker sends q_p [T, d_p] with the entries; the shard weighs entry j by <q_p[t_j], P_tab[row_j]>
* s_j, and the backward returns dL/ds and dL/dq_p and updates V and P_tab (lazy AdamW on both):
  * paper_v2 - the paper layer with d_p=128;  * small_v2 - the small layer with d_p=42.
Their Gather leg fetches the step's unique rows of both tables (rows mode's lookup). Every Gather leg goes
through `RemoteBackend.fetch_rows`, as a worker's rows-mode lookup does.
Tokens per step 1 / 64 / 2048 (--quick: 1 / 64), 1, 2 and 4 shard processes (--quick: 1, 2); the
shard processes serve all six tables at once.

Measured in one run, legs interleaved repeat by repeat (the machine may be loaded by others, so
ratios between legs of one run are the figures to read, medians of the repeats; the floors' library
calls are in bench/_floors.py):
  * the floor: the same pooled lookup (same rows, same weights) in this process on one thread by
    the fastest plain library call: the better of numpy fancy indexing (gather + weighted sum)
    and torch `embedding_bag` (sum mode, per_sample_weights). For V2 the floor does V2's lookup:
    gather the V and P_tab rows, the dot products with q_p, the h-slice weighted sum (MCS);
  * the floors of the other call types' own work, beside the lookup floor (a backward and an
    optimizer step touch more bytes per selection than a lookup), each timed on its second call,
    warm like the shard's repeated calls: a backward floor (dL/ds, for V2 dL/dq_p too, and the
    duplicate-summed row gradients of V, and of P_tab for V2; v1: the better of torch
    index_select / elementwise ops / index_add_ and embedding_bag's autograd backward, V2: the
    former) and an optimizer floor (the shard's lazy AdamW with per-row step counts on the step's
    unique rows of every table, by torch ops on index_select-ed rows written back with index_copy_);
  * Gather's floor: its own work, a gather of the step's unique rows (of both tables for V2) in this
    process on one thread, the better of numpy `take` and torch `index_select`, per row;
  * the shards' CPU-s per million selections for each call type: Gather (of a step's unique
    rows, per row, against its own floor), PooledGather, PooledBackward (without the update it
    queues) and the optimizer step (the apply thread: duplicate sums + lazy AdamW; the shard's
    `apply_cpu_s` counter), read from
    /proc for the processes; their ratio to the floor;
  * the worker's CPU per token (this process: the client's encoding, routing and decoding);
  * memory-path tokens/s per shard count and tokens per step;
  * Gather's wire bytes/s against a raw loopback socket moving the same bytes.
Writes <out>/memory_path.json (V2 under "v2", with v1's keys) and prints the verdicts (target <= 3x
the floor, aim 1.5x), v1's and V2's: each call type against the lookup floor, PooledBackward and
the optimizer step also against the floor of their own work, Gather against a gather of its rows.
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

from bench._floors import bag_layout, floor_cpu_s, gather_floor_cpu_s, v2_floor_cpu_s, work_floors_cpu_s  # noqa: E402
from bench._shards import start_shards, stop_shards  # noqa: E402 (after the sys.path line)
from bench.lookup import socket_rate, tune_malloc  # noqa: E402
from model_workers.remote import RemoteBackend  # noqa: E402
from param_server.client import Client, ClientConfig  # noqa: E402
from param_server.server import DEFAULT_MAX_MESSAGE_BYTES  # noqa: E402
from storage.layout import TableSpec, init_table_values  # noqa: E402
from storage.table_store import create_table  # noqa: E402

CALLS = ("gather", "pooled_gather", "pooled_backward", "optimizer_step")
FLOORS = ("floor", "floor_numpy", "floor_embedding_bag", "floor_gather", "floor_backward", "floor_optimizer")
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
    d_p: int = 0  # UltraMemV2 pre-value width (DESIGN §3.3 item 3); 0 = v1, no pre-values
    shared_projector: bool = False  # UltraMemV2: one pooled [d_v] sum per token (DESIGN §3.3 item 2)

    @property
    def per_token(self) -> int:
        return self.heads * self.topk

    @property
    def pooled_e(self) -> int:
        """E of the pooled calls: 1 with the shared projector."""
        return 1 if self.shared_projector else self.expansion

    @property
    def pre_table(self) -> str | None:
        return f"{self.name}.pre_values" if self.d_p else None


def layers(quick: bool) -> list[Layer]:
    return [Layer("paper", 16_384 if quick else 65_536, 384, 2, 80, 4, 2),
            Layer("small", 4_096, 128, 2, 8, 4, 2)]


def layers_v2(quick: bool) -> list[Layer]:
    """v1's shapes as UltraMemV2 layers (MemoryConfig.ultramem_v2: shared projector, d_p = d_v // 3)."""
    return [lay._replace(name=f"{lay.name}_v2", d_p=lay.d_v // 3, shared_projector=True) for lay in layers(quick)]


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
    scores float32 [n, h], grad_out float32 [T, E, d_v] (E = 1 with the shared projector) and, with
    pre-values, q_p float32 [T, d_p]."""
    rng = np.random.default_rng(seed)
    n = tokens * layer.per_token
    x = {"rows": rng.integers(0, layer.rows, n, dtype=np.int64),
         "projector": rng.integers(0, layer.pooled_e, n, dtype=np.int64),
         "token": np.repeat(np.arange(tokens, dtype=np.int64), layer.per_token),
         "scores": rng.standard_normal((n, layer.cores), dtype=np.float32),
         "grad_out": rng.standard_normal((tokens, layer.pooled_e, layer.d_v), dtype=np.float32) * 1e-3}
    if layer.d_p:
        x["q_p"] = rng.standard_normal((tokens, layer.d_p), dtype=np.float32)
    return x


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


def table_specs(layer: Layer) -> list[TableSpec]:
    """The layer's value table and, with pre-values, P_tab beside it (same rows and partitions)."""
    specs = [TableSpec(name=layer.name, rows=layer.rows, dim=layer.d_v, num_partitions=16, optimizer="adamw")]
    if layer.pre_table is not None:
        specs.append(TableSpec(name=layer.pre_table, rows=layer.rows, dim=layer.d_p, num_partitions=16,
                               optimizer="adamw", init_std=layer.d_p**-0.5, seed=1))
    return specs


def run_layer(layer: Layer, tokens: int, procs, client: Client, tables: list[np.ndarray], repeats: int,
              step0: int) -> dict[str, Any]:
    """Interleaved legs for one layer and tokens per step; per-repeat figures, then medians.
    tables: the floor's copies of the layer's tables (V, and P_tab with pre-values)."""
    spec_name, pre_name = layer.name, layer.pre_table
    backend = RemoteBackend(client, table_specs(layer), consistency="sync")
    cpu = ShardCpu(procs, client)
    per: dict[str, list[float]] = {k: [] for k in (*CALLS, *FLOORS, "worker_cpu_per_token", "tokens_per_s",
                                                   "gather_bytes_per_s")}
    states = [(np.zeros_like(t), np.zeros_like(t), np.zeros(t.shape[0], np.int32)) for t in tables]  # AdamW's
    # legs are repeated within a repeat until ~`min_leg_s` of wall time, so /proc's 10 ms ticks count
    min_leg_s = 0.3
    step = step0
    for rep in range(repeats + 1):  # repeat 0 warms up (connections, first-touch pages)
        x = step_inputs(layer, tokens, seed=1000 * rep + tokens)
        n = x["rows"].shape[0]
        args = [torch.from_numpy(x[k]) for k in ("rows", "projector", "token", "scores")]
        unique = np.unique(x["rows"])
        pre = {} if pre_name is None else {"pre_table": pre_name, "q_p": torch.from_numpy(x["q_p"])}
        # leg 1: the floor, in this process
        if pre_name is None:
            fl = floor_cpu_s(tables[0], x, layer)
        else:
            bag_layout(x, layer)
            fl = v2_floor_cpu_s(tables[0], tables[1], x, layer)
        work = work_floors_cpu_s(tables, x, layer, states)
        # leg 2: PooledGather alone
        (c0, a0), k, t0 = cpu.read(), 0, time.perf_counter()
        while k == 0 or time.perf_counter() - t0 < min_leg_s:
            backend.pooled(spec_name, *args, tokens, layer.pooled_e, **pre)
            k += 1
        (c1, a1) = cpu.read()
        pooled_cpu = (c1 - c0 - (a1 - a0)) / (k * n)
        # leg 3: full training steps (lookup + backward + the update applied before the next lookup)
        (c0, a0), k, w0, t0 = cpu.read(), 0, time.process_time(), time.perf_counter()
        while k == 0 or time.perf_counter() - t0 < min_leg_s:
            backend.begin_step(step, 1e-3)
            backend.pooled(spec_name, *args, tokens, layer.pooled_e, **pre)
            if pre_name is None:
                backend.pooled_backward(spec_name, *args, torch.from_numpy(x["grad_out"]))
            else:
                backend.pooled_backward_pre(spec_name, pre_name, *args, pre["q_p"], torch.from_numpy(x["grad_out"]))
            step += 1
            k += 1
        backend.flush()
        client.gather(spec_name, unique[:1], min_step=step - 1)  # the last update applied
        wall, worker = time.perf_counter() - t0, time.process_time() - w0
        (c1, a1) = cpu.read()
        step_cpu, apply_cpu = (c1 - c0 - (a1 - a0)) / (k * n), (a1 - a0) / (k * n)
        # leg 4: Gather of the step's unique rows (rows mode: of both tables with pre-values), as a
        # worker's rows-mode lookup makes it (RemoteBackend.fetch_rows; each answer dropped at once)
        unique_t = torch.from_numpy(unique)
        (c0, a0), j, t0 = cpu.read(), 0, time.perf_counter()
        while j == 0 or time.perf_counter() - t0 < min_leg_s:
            backend.fetch_rows(spec_name, unique_t)
            if pre_name is not None:
                backend.fetch_rows(pre_name, unique_t)
            j += 1
        g_wall = time.perf_counter() - t0
        (c1, a1) = cpu.read()
        if rep == 0:
            continue
        per["floor_embedding_bag"].append(fl["embedding_bag"] / n)
        per["floor_numpy"].append(fl["numpy"] / n)
        per["floor_gather"].append(gather_floor_cpu_s(tables, unique) / unique.size)
        per["floor"].append(min(fl.values()) / n)
        per["floor_backward"].append(work["backward"] / n)
        per["floor_optimizer"].append(work["optimizer"] / n)
        per["pooled_gather"].append(pooled_cpu)
        per["pooled_backward"].append(max(0.0, step_cpu - pooled_cpu))
        per["optimizer_step"].append(apply_cpu)
        per["gather"].append((c1 - c0 - (a1 - a0)) / (j * unique.size))
        per["worker_cpu_per_token"].append(worker / (k * tokens))
        per["tokens_per_s"].append(k * tokens / wall)
        per["gather_bytes_per_s"].append(j * unique.size * (layer.d_v + layer.d_p) * 4 / g_wall)
    out = {k: _median(v) * (1e6 if k in (*CALLS, *FLOORS) else 1)
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
    lays, lays_v2 = layers(quick), layers_v2(quick)
    results: dict[str, Any] = {"quick": quick, "repeats": repeats, "cpus": os.cpu_count(),
                               "load_avg": os.getloadavg(),
                               "layers": {lay.name: lay._asdict() for lay in lays}, "runs": {}}
    results["v2"] = {"layers": {lay.name: lay._asdict() for lay in lays_v2}, "runs": {}}
    config = ClientConfig(chunk_bytes=1 << 20, max_in_flight=8, channels_per_shard=4,
                          max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES)
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-") as tmp:
        paths, tables = [], {}
        for lay in lays + lays_v2:
            tables[lay.name] = []
            for spec in table_specs(lay):
                create_table(Path(tmp) / spec.name, spec)
                paths.append(Path(tmp) / spec.name)
                tables[lay.name].append(init_table_values(spec).astype(np.float32, copy=False))  # the floor's copy
        for num_shards in shard_counts:
            procs, addresses = start_shards(paths, num_shards)
            try:
                rss = [proc_rss_mb(p.pid) for p in procs]
                with Client(addresses, config=config) as client:
                    step0 = 0
                    for lay in lays + lays_v2:
                        runs = results["v2"]["runs"] if lay.d_p else results["runs"]
                        for tokens in token_counts:
                            key = f"{lay.name}/{tokens}/{num_shards}"
                            runs[key] = run_layer(lay, tokens, procs, client, tables[lay.name], repeats, step0)
                            step0 += runs[key]["steps"] + 1
                results.setdefault("shard_rss_mb_after_load", {})[str(num_shards)] = rss
            finally:
                stop_shards(procs)
    _summarise(results, lays, token_counts, shard_counts)
    _summarise(results["v2"], lays_v2, token_counts, shard_counts)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "memory_path.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'memory_path.json'}")
    return results


def _verdict(ratio: float) -> str:
    return "aim met" if ratio <= AIM else "target met" if ratio <= TARGET else "MISSED"


def _summarise(results: dict[str, Any], lays: list[Layer], token_counts, shard_counts) -> None:
    """The headline keys (one shard, the most tokens per step of each layer), a table and verdicts.
    results: the whole result (v1) or its "v2" section (the same keys)."""
    runs = results["runs"]
    big = token_counts[-1]
    head = {lay.name: runs[f"{lay.name}/{big}/1"] for lay in lays}
    results["shard_cpu_s_per_m_selections"] = {name: {c: r[c] for c in CALLS} for name, r in head.items()}
    results["floor_cpu_s_per_m_selections"] = {name: r["floor"] for name, r in head.items()}
    results["ratio_to_floor"] = {
        name: {c: results["shard_cpu_s_per_m_selections"][name][c] / results["floor_cpu_s_per_m_selections"][name]
               for c in CALLS} for name in head}
    # Gather's own work is a gather of rows (no weights, no sum): its floor is that, per row
    results["floor_gather_cpu_s_per_m_rows"] = {name: r["floor_gather"] for name, r in head.items()}
    for name, r in head.items():
        results["ratio_to_floor"][name]["gather_to_lookup_floor"] = results["ratio_to_floor"][name]["gather"]
        results["ratio_to_floor"][name]["gather"] = r["gather"] / r["floor_gather"]
    v2 = lays[0].d_p > 0
    # PooledBackward and the optimizer step against the floors of their own work too (ratio_to_floor: the lookup's)
    results["floor_backward_cpu_s_per_m_selections"] = {name: r["floor_backward"] for name, r in head.items()}
    results["pooled_backward_ratio_to_backward_floor"] = {
        name: r["pooled_backward"] / r["floor_backward"] for name, r in head.items()}
    results["floor_optimizer_cpu_s_per_m_selections"] = {name: r["floor_optimizer"] for name, r in head.items()}
    results["optimizer_step_ratio_to_optimizer_floor"] = {
        name: r["optimizer_step"] / r["floor_optimizer"] for name, r in head.items()}
    results["tokens_per_s"] = {lay.name: {f"{s} shards/{t} tokens": runs[f"{lay.name}/{t}/{s}"]["tokens_per_s"]
                                          for s in shard_counts for t in token_counts} for lay in lays}
    results["worker_cpu_s_per_token"] = {name: r["worker_cpu_per_token"] for name, r in head.items()}
    paper = head[lays[0].name]
    nbytes = paper["unique_rows_per_step"] * (lays[0].d_v + lays[0].d_p) * 4
    sock = socket_rate(nbytes, 5)
    results["socket_bytes_per_s"] = sock
    results["gather_vs_socket"] = paper["gather_bytes_per_s"] / sock
    if v2:
        print("  UltraMemV2 layers (shared projector, pre-values scored on the shards):")
    else:
        print(f"memory-path bench: medians of {results['repeats']} interleaved repeats, "
              f"{results['cpus']} CPUs, load average {results['load_avg'][0]:.1f} at the start")
    print("  shard CPU-s per million selections (1 shard), ratio to the floor (target <= 3x, aim 1.5x):")
    for lay in lays:
        fl, r = results["floor_cpu_s_per_m_selections"][lay.name], head[lay.name]
        d_p = f", d_p {lay.d_p}" if v2 else ""
        print(f"  {lay.name:8s} {big} tokens/step{d_p}  floor {fl:.3f} (numpy {r['floor_numpy']:.3f}, "
              f"embedding_bag {r['floor_embedding_bag']:.3f}), backward floor {r['floor_backward']:.3f}, "
              f"optimizer floor {r['floor_optimizer']:.3f}")
        own = {"pooled_backward": ("pooled_backward_ratio_to_backward_floor", "backward"),
               "optimizer_step": ("optimizer_step_ratio_to_optimizer_floor", "optimizer")}
        for c in CALLS:
            ratio = results["ratio_to_floor"][lay.name][c]
            extra = ""
            if c in own:
                b = results[own[c][0]][lay.name]
                extra = f"; {b:.2f}x the {own[c][1]} floor, {_verdict(b)}"
            if c == "gather":
                extra = (f" (per row; its floor, a one-thread gather of the rows, {r['floor_gather']:.3f}; "
                         f"{results['ratio_to_floor'][lay.name]['gather_to_lookup_floor']:.1f}x the lookup floor)")
            print(f"    {c:16s} {results['shard_cpu_s_per_m_selections'][lay.name][c]:8.3f}  "
                  f"{ratio:6.2f}x floor  {_verdict(ratio)}{extra}")
        print(f"    worker CPU per token {results['worker_cpu_s_per_token'][lay.name] * 1e6:.0f} us")
    print("  memory-path tokens/s (lookup + backward + update per step):")
    for lay in lays:
        cells = "  ".join(f"{s}sh/{t}tok {runs[f'{lay.name}/{t}/{s}']['tokens_per_s']:9.0f}"
                          for s in shard_counts for t in token_counts)
        print(f"    {lay.name:8s} {cells}")
    print(f"  Gather ({nbytes / 1e6:.1f} MB answers, 1 shard, {lays[0].name}): "
          f"{paper['gather_bytes_per_s'] / 1e9:.2f} GB/s = {results['gather_vs_socket']:.2f}x the raw socket "
          f"({sock / 1e9:.2f} GB/s)")

if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
