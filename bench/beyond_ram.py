"""Beyond-RAM benchmark (`ultramem bench beyond-ram`, DESIGN §5, §8): a table 4x its shards' RAM budget.

The row stream is the real model's: the `small` preset (one UltraMem layer, P = 4,096 rows, d_v 128,
AdamW state on the shard) runs on real State of the Union batches and every step's selected
physical rows are recorded (a short training run; with --quick, forward passes of the untrained
model). A second, synthetic stream with the same entries per step draws rows from a Zipf(1) law
over randomly scattered rows, so the hottest 25% of rows take >= 75% of lookups (the skewed
regime of the target). Each step of a stream is replayed as training issues it: Gather the
step's unique rows, push a gradient for each, wait until it is applied (sync, staleness 0).

Measured side by side in one run (legs take turns round by round, so machine noise hits all):
  * in-process `Shard`, table fully resident vs `ShardConfig.ram_budget_bytes` = table / 4 (the
    rest through the write-back chunk cache over Zarr): memory-path steps/s and tokens/s, the
    ratio, the cache hit rate (`Shard.metrics()`), seconds and bytes spent in Zarr reads/writes;
  * access skew: share of lookups on the hottest 10% / 25% of rows, and of chunk accesses on the
    hottest 25% of chunks (what a chunk-granular cache can exploit);
  * the disk floor: random reads and writes of 4 KiB and of one chunk of a scratch file opened
    with O_DIRECT (page cache bypassed; buffered + fadvise(DONTNEED) if O_DIRECT is refused),
    turned into the floor time per step for the bytes the cache actually moved;
  * 1, 2 and 4 `ultramem shard serve --ram-budget-mb` processes (total budget table / 4) over
    gRPC, plus 1 resident process: rows/s and CPU-seconds per million rows per shard (psutil).
  * training tokens/s (bench/_beyond_ram_train.py, the issue's headline figure): real distributed
    training (`DistributedTrainer`: 2 shard actors, 1 model worker, async) of the `small` preset and
    of the same with 16x the memory rows, shards resident vs `shard_budget_bytes` = table / (4 x
    shards), rounds interleaved after a warm-up; the shards' hit rates, the stream's skew (recorded
    in-process from the same steps, seed and batches), the floor set by the disk (`train` in the JSON).
Targets: cached >= 0.5x resident where the hottest 25% of rows take >= 75% of lookups; elsewhere
cached step time within 2x of the disk floor. Writes <out>/beyond_ram.json. `--quick` runs fewer
steps and only the `small` training config; `--quick --train-large` adds the 16x-rows one.
Cached tables are created as the planner creates work tables beyond RAM
(`param_server.partitions.work_table_options`: chunks from the cache share, every array raw, so
the chunk cache reads and writes in place; `cache_io_*_arrays` in the JSON says which engine served).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import _beyond_ram_train as train_leg  # noqa: E402 (after the sys.path line)
from bench._shards import start_shards, stop_shards  # noqa: E402 (after the sys.path line)
from param_server.client import Client  # noqa: E402 (after the sys.path line)
from param_server.partitions import ROW_SHARE, partition_nbytes, work_table_options  # noqa: E402 (after the sys.path line)
from param_server.shard import Shard, ShardConfig  # noqa: E402 (after the sys.path line)
from storage.layout import TableSpec  # noqa: E402 (after the sys.path line)
from storage.table_store import create_table, open_table  # noqa: E402 (after the sys.path line)

OVERSUBSCRIPTION = 4  # table bytes / shards' RAM budget
TARGET_SKEWED = 0.5  # cached >= 0.5x resident where the hottest 25% of rows take >= 75% of lookups
TARGET_FLOOR = 2.0  # elsewhere: cached step time <= 2x the disk floor for the bytes it moved
LR = 1e-3
LARGE = 16  # the large-table leg: 16x the rows at the same selections per step (a step touches a small share)
CACHE_SHARE = 1.0  # in-process cached legs give the whole budget to the caches (rows + chunks), no resident partitions
# the training leg's configs: --set overrides of the small preset (num_keys 256: P = 65,536 rows, 16x)
TRAIN_CONFIGS = {"small": [], "small-x16": [f"model.memory.num_keys={64 * 4}"]}


# -- the streams ---------------------------------------------------------------------------------
def record_model_stream(steps: int, train: bool, overrides: tuple[str, ...] = ()) -> tuple[TableSpec, list[np.ndarray],
                                                                                          int]:
    """Selected physical rows of the small preset's (with `overrides`) memory layer on real batches.

    Returns (the layer's table spec, per step int64 [B*T*H*m] rows with repeats, tokens per step).
    train=True records a short training run (rows of step s come from the model after s updates).
    """
    import torch

    import model_workers.ultramem as ultramem_module
    from model_workers.data import get_batch, prepare_corpus
    from model_workers.model import LanguageModel
    from model_workers.trainer import autocast_dtype, make_optimizer, resolve_device, train_step
    from orchestration.config import load_config

    cfg = load_config(preset="small", overrides=["train.device=cpu", *overrides])
    corpus = prepare_corpus(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = LanguageModel(cfg.model)  # LocalBackend: the values live in this process
    entries: list[np.ndarray] = []
    split = ultramem_module.split_virtual

    def recording_split(*args: Any, **kw: Any) -> Any:  # IVE step 4: every selected physical row, repeats kept
        rows, projector = split(*args, **kw)
        entries.append(rows.detach().cpu().numpy().reshape(-1).astype(np.int64))
        return rows, projector

    ultramem_module.split_virtual = recording_split  # type: ignore[assignment]
    opt = make_optimizer(model, cfg.train)
    amp = autocast_dtype(cfg.train, resolve_device(cfg.train))
    for step in range(steps):
        x, y = get_batch(corpus.train, step, seed=cfg.train.seed, batch_size=cfg.data.batch_size,
                         seq_len=cfg.data.seq_len)
        if train:
            train_step(model, opt, x, y, step=step, cfg=cfg.train, max_steps=cfg.train.max_steps, amp_dtype=amp)
        else:
            with torch.no_grad():
                model.eval()(x)
    ultramem_module.split_virtual = split
    assert len(model.memory_tables()) == 1, "the small preset has one memory layer"
    return model.memory_tables()[0], entries, cfg.data.batch_size * cfg.data.seq_len


def zipf_stream(rows: int, entries_per_step: int, steps: int, exponent: float = 1.0,
                seed: int = 0) -> list[np.ndarray]:
    """Synthetic skewed stream: rank k drawn with weight 1/(k+1)^exponent, ranks scattered over rows."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, rows + 1) ** exponent
    row_of_rank = rng.permutation(rows)  # hot rows land anywhere, as IVE's permutation puts them
    return [row_of_rank[rng.choice(rows, size=entries_per_step, p=weights / weights.sum())] for _ in range(steps)]


def skew(stream: list[np.ndarray], spec: TableSpec, chunk_rows: int) -> dict[str, float]:
    """Share of lookups on the hottest 10% / 25% of rows, and of chunk accesses on the hottest 25% of chunks."""
    counts = np.sort(np.bincount(np.concatenate(stream), minlength=spec.rows))[::-1]
    total = counts.sum()
    per_partition = -(-spec.rows_per_partition // chunk_rows)
    chunk_hits = np.zeros(spec.num_partitions * per_partition, dtype=np.int64)
    for entries in stream:  # a chunk is touched once per step in which any of its rows is
        u = np.unique(entries)
        np.add.at(chunk_hits, np.unique(u % spec.num_partitions * per_partition + u // spec.num_partitions
                                        // chunk_rows), 1)
    chunk_hits = np.sort(chunk_hits)[::-1]
    uniq = [np.unique(e).size for e in stream]
    return {"top10_rows_share": float(counts[: max(1, spec.rows // 10)].sum() / total),
            "top25_rows_share": float(counts[: max(1, spec.rows // 4)].sum() / total),
            "top25_chunks_share": float(chunk_hits[: max(1, chunk_hits.size // 4)].sum() / chunk_hits.sum()),
            "rows_touched_share": float((counts > 0).mean()),
            "entries_per_step": float(statistics.median(e.size for e in stream)),
            "unique_rows_per_step": float(statistics.median(uniq)),
            "unique_share_of_table_per_step": float(statistics.median(uniq) / spec.rows)}


# -- the disk floor ------------------------------------------------------------------------------
def disk_floor(directory: Path, file_bytes: int, block_sizes: tuple[int, ...], per_size_s: float) -> dict[str, Any]:
    """Random reads/writes of each block size on a scratch file: {"mode", "<size>": {read/write MB/s, IOPS}}."""
    path = directory / "floor.bin"
    block = 8 << 20
    data = np.random.default_rng(0).bytes(block)
    with open(path, "wb") as f:
        for _ in range(file_bytes // block):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    buf = mmap.mmap(-1, max(block_sizes))  # page-aligned, as O_DIRECT needs
    buf.write(data[: max(block_sizes)])
    out: dict[str, Any] = {"file_bytes": file_bytes}
    try:
        fd_r = os.open(path, os.O_RDONLY | os.O_DIRECT)
        fd_w = os.open(path, os.O_WRONLY | os.O_DIRECT)
        os.preadv(fd_r, [memoryview(buf)[:4096]], 0)
        out["mode"] = "O_DIRECT (page cache bypassed)"
    except OSError:
        fd_r, fd_w = os.open(path, os.O_RDONLY), os.open(path, os.O_WRONLY)
        out["mode"] = "buffered after posix_fadvise(DONTNEED) (O_DIRECT refused here): an upper bound"
    rng = np.random.default_rng(1)
    try:
        for size in block_sizes:
            view = memoryview(buf)[:size]
            offsets = rng.integers(0, file_bytes // size, size=1 << 16) * size
            res = {}
            for op, fn in (("read", lambda o, v=view: os.preadv(fd_r, [v], o)),
                           ("write", lambda o, v=view: os.pwritev(fd_w, [v], o))):
                if not out["mode"].startswith("O_DIRECT"):
                    os.posix_fadvise(fd_r, 0, 0, os.POSIX_FADV_DONTNEED)
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < per_size_s and n < offsets.size:
                    fn(int(offsets[n]))
                    n += 1
                if op == "write":
                    os.fsync(fd_w)
                dt = time.perf_counter() - t0
                res[f"{op}_bytes_per_s"], res[f"{op}_iops"] = n * size / dt, n / dt
            out[str(size)] = res
    finally:
        os.close(fd_r)
        os.close(fd_w)
        path.unlink()
    return out


# -- in-process replay: resident vs beyond RAM ----------------------------------------------------
class _Leg:
    """One in-process shard replaying streams; times each pass and reads the cached tier's counters."""

    def __init__(self, spec: TableSpec, path: Path, budget: int | None, dim: int) -> None:
        store = open_table(path, "r+" if budget else "r")
        self.shard = Shard(ShardConfig(ram_budget_bytes=budget, cache_share=CACHE_SHARE, max_pending=4), shard_id=0)
        self.shard.load_table(store, range(spec.num_partitions))
        self.name, self.seq, self.step = spec.name, 0, 0
        self.grads = np.random.default_rng(3).standard_normal((spec.rows, dim)).astype(np.float32) * 1e-3
        self.passes: dict[str, list[dict[str, float]]] = {}

    def tier_metrics(self) -> dict[str, float]:
        """The shard's tier counters (chunk and row cache, chunk I/O seconds and bytes)."""
        return self.shard.metrics()

    def replay(self, label: str, steps: list[np.ndarray], timed: bool) -> None:
        m0, c0, t0 = self.tier_metrics(), time.process_time(), time.perf_counter()
        for u in steps:
            self.shard.gather(self.name, u)
            self.seq += 1
            self.shard.push(self.name, 0, self.seq, self.step, LR, u, self.grads[: u.size])
            self.shard.drain()
            self.step += 1
        wall, cpu, m1 = time.perf_counter() - t0, time.process_time() - c0, self.tier_metrics()
        if timed:
            d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in (
                "cache_hits", "cache_misses", "cache_row_hits", "cache_row_misses", "cache_io_read_s",
                "cache_io_write_s", "cache_bytes_loaded", "cache_bytes_written_back")}
            self.passes.setdefault(label, []).append(
                {"seconds": wall, "cpu_s": cpu, "rows": float(sum(u.size for u in steps)), **d})

    def summary(self, label: str, tokens_per_step: int, n_steps: int) -> dict[str, float | None]:
        p = self.passes[label]
        sec = statistics.median(x["seconds"] for x in p)

        def rate(hit: str, miss: str) -> float | None:
            h, m = sum(x[hit] for x in p), sum(x[miss] for x in p)
            return h / (h + m) if h + m else None

        out: dict[str, float | None] = {
            "median_pass_s": sec, "steps_per_s": n_steps / sec, "tokens_per_s": n_steps * tokens_per_step / sec,
            "rows_per_s": p[0]["rows"] / sec, "cache_hit_rate": rate("cache_hits", "cache_misses"),
            "row_hit_rate": rate("cache_row_hits", "cache_row_misses"),
            "cpu_s_per_million_rows": statistics.median(x["cpu_s"] / x["rows"] * 1e6 for x in p)}
        for k, name in (("cache_io_read_s", "io_read_s"), ("cache_io_write_s", "io_write_s"),
                        ("cache_bytes_loaded", "io_read_bytes"), ("cache_bytes_written_back", "io_write_bytes")):
            out[f"{name}_per_step"] = statistics.median(x[k] for x in p) / n_steps
        return out

    def close(self) -> None:
        self.shard.close()


# -- shard processes over gRPC ----------------------------------------------------------------------
def shard_scaling(spec: TableSpec, path: Path, stream: list[np.ndarray], num_shards: int, budget: int | None,
                  rounds: int) -> dict[str, float]:
    """Replay `stream` through `num_shards` shard processes: rows/s and CPU-s per million rows per shard."""
    extra = ["--ram-budget-mb", f"{budget / num_shards / (1 << 20):.6f}"] if budget else []
    procs, addresses = start_shards([path], num_shards, extra_args=extra)
    grads = np.random.default_rng(3).standard_normal((spec.rows, spec.dim)).astype(np.float32) * 1e-3
    try:
        with Client(addresses) as client:
            step, times, cpu = 0, [], []
            for r in range(rounds + 1):  # round 0 warms the cache and the channels
                c0 = [p.cpu_times() for p in map(psutil.Process, (q.pid for q in procs))]
                t0 = time.perf_counter()
                for u in stream:
                    client.gather(spec.name, u, min_step=step - 1 if step else None)
                    client.push(spec.name, u, grads[: u.size], lr=LR, step=step)
                    step += 1
                client.gather(spec.name, stream[0][:1], min_step=step - 1)  # the last push applied
                dt = time.perf_counter() - t0
                c1 = [p.cpu_times() for p in map(psutil.Process, (q.pid for q in procs))]
                if r:
                    times.append(dt)
                    cpu.append([(b.user + b.system) - (a.user + a.system) for a, b in zip(c0, c1, strict=True)])
    finally:
        stop_shards(procs)
    rows = sum(u.size for u in stream)
    sec = statistics.median(times)
    shard_of = np.concatenate(stream) % spec.num_partitions % num_shards
    per_shard_rows = np.bincount(shard_of, minlength=num_shards)
    cpu_per_m = [statistics.median(c[s] for c in cpu) / per_shard_rows[s] * 1e6 for s in range(num_shards)]
    return {"shards": num_shards, "budget_mb_per_shard": budget / num_shards / (1 << 20) if budget else None,
            "median_pass_s": sec, "rows_per_s": rows / sec, "cpu_s_per_million_rows_per_shard": cpu_per_m,
            "cpu_s_per_million_rows_per_shard_mean": float(np.mean(cpu_per_m))}


# -- the run ----------------------------------------------------------------------------------------
def _replay_legs(spec: TableSpec, tmp: Path, streams: dict[str, list[np.ndarray]], budget: int, rounds: int,
                 tokens_per_step: int, n_steps: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Resident vs cached (budget) in-process shards over fresh copies of one table, rounds interleaved."""
    # the planner's table for a shard that cannot hold it (chunk size from the cache share, all arrays raw)
    layout = work_table_options(spec, budget, 1, cache_share=CACHE_SHARE)
    paths = {leg: create_table(tmp / f"{spec.name}-{leg}" / spec.name, spec, **layout).path
             for leg in ("resident", "cached")}
    unique = {k: [np.unique(e) for e in s] for k, s in streams.items()}
    legs = {"resident": _Leg(spec, paths["resident"], None, spec.dim),
            "cached": _Leg(spec, paths["cached"], budget, spec.dim)}
    out: dict[str, Any] = {}
    try:
        for r in range(rounds + 1):  # round 0 warms up; interleaved, so load changes hit every leg alike
            for label, stream in unique.items():
                for leg in legs.values():
                    leg.replay(label, stream, timed=r > 0)
        for label in streams:
            res = {name: leg.summary(label, tokens_per_step, n_steps) for name, leg in legs.items()}
            res["cached_over_resident"] = res["cached"]["steps_per_s"] / res["resident"]["steps_per_s"]
            out[label] = res
        tier = legs["cached"].tier_metrics()
    finally:
        for leg in legs.values():
            leg.close()
    return out, tier


def _verdicts(res: dict[str, Any], floor: dict[str, Any], chunk_bytes: int) -> None:
    """Disk floor per step for the bytes the cached leg moved, and the verdict of the target that applies."""
    c, f = res["cached"], floor[str(chunk_bytes)]
    floor_s = (c["io_read_bytes_per_step"] / f["read_bytes_per_s"]
               + c["io_write_bytes_per_step"] / f["write_bytes_per_s"])
    res["floor_s_per_step"] = floor_s
    res["cached_over_floor_time"] = (1 / c["steps_per_s"]) / floor_s if floor_s else None
    skewed = res["skew"]["top25_rows_share"] >= 0.75
    res["target"] = (f"cached >= {TARGET_SKEWED}x resident (skewed)" if skewed
                     else f"cached step time <= {TARGET_FLOOR}x disk floor")
    res["target_met"] = bool(res["cached_over_resident"] >= TARGET_SKEWED if skewed
                             else res["cached_over_floor_time"] is not None
                             and res["cached_over_floor_time"] <= TARGET_FLOOR)


def run(out_dir: str | Path = "bench/results", quick: bool = False, train_large: bool = False) -> dict[str, Any]:
    """Measure everything, print the ratios, write <out_dir>/beyond_ram.json; returns the results dict.

    quick: fewer steps and rounds, and only the `small` training config unless `train_large`
    (then the 16x-rows training config runs too, as in the full run)."""
    steps, rounds, grpc_rounds, large_steps = (4, 2, 1, 2) if quick else (16, 4, 2, 8)
    # training leg: warm-up steps, rounds, steps per round (warm-up + rounds x steps = the recorded steps)
    t_warmup, t_rounds, t_per_round = (1, 2, 1) if quick else (4, 3, 4)
    train_configs = {"small": TRAIN_CONFIGS["small"]} if quick and not train_large else TRAIN_CONFIGS
    spec, model_entries, tokens_per_step = record_model_stream(steps, train=not quick)
    train_streams = {name: record_model_stream(steps, train=not quick, overrides=tuple(o))[:2] if o else
                     (spec, model_entries) for name, o in train_configs.items()}
    entries = int(np.median([e.size for e in model_entries]))
    streams = {"model": model_entries, "zipf": zipf_stream(spec.rows, entries, steps)}
    large = dataclasses.replace(spec, name=f"{spec.name}-x{LARGE}", rows=spec.rows * LARGE)
    large_streams = {"zipf": zipf_stream(large.rows, entries, large_steps, seed=1)}
    table_bytes = partition_nbytes(spec) * spec.num_partitions
    budget = table_bytes // OVERSUBSCRIPTION
    large_budget = partition_nbytes(large) * large.num_partitions // OVERSUBSCRIPTION
    results: dict[str, Any] = {
        "preset": "small", "table": {"rows": spec.rows, "dim": spec.dim, "optimizer": spec.optimizer,
                                     "partitions": spec.num_partitions, "bytes_with_state": table_bytes},
        "large_table": {"rows": large.rows, "bytes_with_state": partition_nbytes(large) * large.num_partitions,
                        "budget_bytes": large_budget, "steps": large_steps},
        "budget_bytes": budget, "oversubscription": OVERSUBSCRIPTION, "steps_per_stream": steps,
        "cache_share_in_process": CACHE_SHARE, "row_share": ROW_SHARE, "tokens_per_step": tokens_per_step,
        "recorded_from": "forward passes (untrained)" if quick else f"a {steps}-step training run",
        "rounds": rounds, "quick": quick, "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
        "streams": {}, "large_streams": {}, "shards": {}}
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-beyond-") as tmp_name:
        tmp = Path(tmp_name)
        results["train"] = train_leg.run_configs(train_configs, OVERSUBSCRIPTION, t_warmup, t_rounds, t_per_round,
                                                 tmp / "train")
        results["load_avg_after_train"] = os.getloadavg()
        small_res, results["cached_metrics"] = _replay_legs(spec, tmp, streams, budget, rounds, tokens_per_step, steps)
        large_res, results["large_cached_metrics"] = _replay_legs(large, tmp, large_streams, large_budget, rounds,
                                                                  tokens_per_step, large_steps)
        chunk_rows = open_table(tmp / f"{spec.name}-cached" / spec.name).chunk_shape("values")[1]
        large_chunk_rows = open_table(tmp / f"{large.name}-cached" / large.name).chunk_shape("values")[1]
        results["table"].update(chunk_rows=chunk_rows, chunk_bytes=chunk_rows * spec.dim * 4)
        results["large_table"].update(chunk_rows=large_chunk_rows, chunk_bytes=large_chunk_rows * spec.dim * 4)
        for label, stream in streams.items():
            results["streams"][label] = {"skew": skew(stream, spec, chunk_rows), **small_res[label]}
        for label, stream in large_streams.items():
            results["large_streams"][label] = {"skew": skew(stream, large, large_chunk_rows), **large_res[label]}
        sizes = sorted({4096, results["table"]["chunk_bytes"], results["large_table"]["chunk_bytes"],
                        *(r["table"]["chunk_bytes"] for r in results["train"].values())})
        floor = disk_floor(tmp, (64 if quick else 512) << 20, tuple(sizes), 0.5 if quick else 2.0)
        results["disk_floor"] = floor
        for res in results["streams"].values():
            _verdicts(res, floor, results["table"]["chunk_bytes"])
        for res in results["large_streams"].values():
            _verdicts(res, floor, results["large_table"]["chunk_bytes"])
        for name, res in results["train"].items():
            t_spec, t_stream = train_streams[name]
            train_leg.verdict(res, skew(t_stream, t_spec, res["table"]["chunk_rows"]), floor, TARGET_SKEWED,
                              TARGET_FLOOR)
        scale_path = create_table(tmp / "grpc" / spec.name, spec, **work_table_options(spec, budget, 1)).path
        unique_model = [np.unique(e) for e in model_entries]
        for s in (1, 2, 4):
            results["shards"][f"cached/{s}"] = shard_scaling(spec, scale_path, unique_model, s, budget, grpc_rounds)
        results["shards"]["resident/1"] = shard_scaling(spec, scale_path, unique_model, 1, None, grpc_rounds)
    one = results["shards"]["cached/1"]["rows_per_s"]
    for r in results["shards"].values():
        r["rows_per_s_over_1_cached_shard"] = r["rows_per_s"] / one
    _print(results)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "beyond_ram.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'beyond_ram.json'}")
    return results


def _print_stream(label: str, r: dict[str, Any]) -> None:
    s = r["skew"]
    print(f"  [{label}] {s['unique_rows_per_step']:.0f} unique rows/step "
          f"({100 * s['unique_share_of_table_per_step']:.0f}% of the table); hottest 10% / 25% of rows take "
          f"{100 * s['top10_rows_share']:.0f}% / {100 * s['top25_rows_share']:.0f}% of lookups; hottest 25% of "
          f"chunks {100 * s['top25_chunks_share']:.0f}% of chunk accesses")
    for leg in ("resident", "cached"):
        x = r[leg]
        hit = (f", row hit rate {x['row_hit_rate']:.2f}, chunk hit rate {x['cache_hit_rate']:.2f}"
               if x["cache_hit_rate"] is not None else "")
        print(f"    {leg:8s} {x['tokens_per_s']:10,.0f} tokens/s (memory path)  {x['steps_per_s']:6.2f} steps/s  "
              f"{x['cpu_s_per_million_rows']:.2f} CPU-s/M rows{hit}; chunk I/O {x['io_read_s_per_step'] * 1e3:.1f} ms "
              f"read + {x['io_write_s_per_step'] * 1e3:.1f} ms write per step")
    print(f"    cached / resident = {r['cached_over_resident']:.3f}x; disk floor for the bytes moved "
          f"{r['floor_s_per_step'] * 1e3:.2f} ms/step, cached = {r['cached_over_floor_time']:.1f}x floor; "
          f"target {r['target']}: {'met' if r['target_met'] else 'MISSED'}")


def _print(results: dict[str, Any]) -> None:
    t, lt = results["table"], results["large_table"]
    print(f"beyond-ram bench: `small` preset table P={t['rows']} d_v={t['dim']} {t['optimizer']} "
          f"({t['bytes_with_state'] / 2**20:.1f} MiB with state, chunks of {t['chunk_rows']} rows), RAM budget "
          f"1/{results['oversubscription']} of it; stream from {results['recorded_from']}, "
          f"{results['steps_per_stream']} steps x {results['tokens_per_step']} tokens, median of {results['rounds']}")
    for name, r in results["train"].items():
        train_leg.print_result(name, r)
    m = results["cached_metrics"]
    print("  memory path only (in-process shard, no dense compute); arrays per chunk I/O engine: "
          + ", ".join(f"{e} {m.get(f'cache_io_{e}_arrays', 0):.0f}" for e in ("raw", "tensorstore", "zarr")))
    for label, r in results["streams"].items():
        _print_stream(label, r)
    print(f"  large table: P={lt['rows']} ({lt['bytes_with_state'] / 2**20:.0f} MiB with state, chunks of "
          f"{lt['chunk_rows']} rows), budget 1/{results['oversubscription']}, {lt['steps']} steps")
    for label, r in results["large_streams"].items():
        _print_stream(f"large {label}", r)
    f = results["disk_floor"]
    for size in (k for k in f if k.isdigit()):
        print(f"  disk ({f['mode']}) random {int(size) // 1024} KiB: read {f[size]['read_bytes_per_s'] / 1e6:.0f} MB/s "
              f"({f[size]['read_iops']:,.0f} IOPS), write {f[size]['write_bytes_per_s'] / 1e6:.0f} MB/s")
    for name, r in results["shards"].items():
        print(f"  gRPC {name:11s} {r['rows_per_s'] / 1e6:6.3f} M rows/s "
              f"({r['rows_per_s_over_1_cached_shard']:.2f}x 1 cached shard), "
              f"{r['cpu_s_per_million_rows_per_shard_mean']:.2f} CPU-s per M rows per shard")


if __name__ == "__main__":
    run(REPO / "bench" / "results", quick="--quick" in sys.argv, train_large="--train-large" in sys.argv)
