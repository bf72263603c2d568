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
    shards), rounds interleaved after a warm-up; the shards' hit rates, the skew of the timed steps
    (recorded in-process by a training run from the same seed and batches), the floor set by the disk
    (`train` in the JSON). The 16x table runs twice: cold (timed from step 4, where a fresh model's
    reads are spread) and warm (`small-x16-warm`: timed after WARM_STEPS untimed training steps,
    where the trained model's reads have concentrated); the warm timed steps' recorded rows are
    also replayed on the memory path (`large_streams["model-warm"]`).
Targets: cached >= 0.5x resident where the hottest 25% of rows take >= 75% of lookups (of the
steps measured); elsewhere cached step time within 2x of the disk floor (`target_kind` in the JSON
says which applied). Writes <out>/beyond_ram.json. `--quick` runs fewer steps and only the `small`
training config; `--quick --train-large` adds both 16x-rows ones (the warm one after WARM_STEPS_QUICK).
`python bench/beyond_ram.py --train-only --configs small-x16-warm --out DIR` runs only the named
training configs (with their recordings and the disk floor), not the memory path or gRPC legs;
`--memory-path-only` runs only the in-process memory-path legs and the disk floor (the model-warm
stream only when `--configs small-x16-warm` is given: its recording trains WARM_STEPS steps).
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
TRAIN_CONFIGS = {"small": [], "small-x16": [f"model.memory.num_keys={64 * 4}"],
                 "small-x16-warm": [f"model.memory.num_keys={64 * 4}"]}
# Untimed training steps before the warm config's timed rounds. Recorded in-process (16-step windows),
# the 16x table's hottest 25% of rows take 51% of lookups at steps 0-16, 73% at 40-56, 97% at 80-96
# and 99% from step 120 on: from 96 the timed steps (96-108) sit past the turn, near the plateau.
WARM_STEPS, WARM_STEPS_QUICK = 96, 8  # quick: only exercises the path, not the trained regime
TRAIN_WARMUP = {"small-x16-warm": (WARM_STEPS, WARM_STEPS_QUICK)}  # name -> (full, quick); others: the run's
WARM_CONFIG = "small-x16-warm"  # its timed steps' rows also go through the memory path (large table)


# -- the streams ---------------------------------------------------------------------------------
def record_model_stream(steps: int, train: bool, overrides: tuple[str, ...] = (),
                        losses: list[float] | None = None) -> tuple[TableSpec, list[np.ndarray], int]:
    """Selected physical rows of the small preset's (with `overrides`) memory layer on real batches.

    Returns (the layer's table spec, per step int64 [B*T*H*m] rows with repeats, tokens per step).
    train=True records a training run (rows of step s come from the model after s updates), and
    appends each step's loss to `losses` if given.
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
            res = train_step(model, opt, x, y, step=step, cfg=cfg.train, max_steps=cfg.train.max_steps,
                             amp_dtype=amp)
            if losses is not None:
                losses.append(res.loss)
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
    """Share of lookups on the hottest 10% / 25% of rows, and of chunk accesses on the hottest 25% of chunks.

    `top25_rows_share_uniform`: the same for as many lookups drawn uniformly over the rows, the share a
    window this short shows with no skew at all (a few lookups per row leave rows untouched)."""
    counts = np.sort(np.bincount(np.concatenate(stream), minlength=spec.rows))[::-1]
    total = counts.sum()
    uniform = np.sort(np.bincount(np.random.default_rng(0).integers(0, spec.rows, int(total)), minlength=spec.rows))
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
            "top25_rows_share_uniform": float(uniform[::-1][: max(1, spec.rows // 4)].sum() / total),
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
                "cache_io_write_s", "cache_io_read_bytes", "cache_io_write_bytes")}
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
        for k, name in (("cache_io_read_s", "io_read_s"), ("cache_io_write_s", "io_write_s"),  # chunks and rows
                        ("cache_io_read_bytes", "io_read_bytes"), ("cache_io_write_bytes", "io_write_bytes")):
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
                 tokens_per_step: int, n_steps: int) -> tuple[dict[str, Any], dict[str, float], int]:
    """Resident vs cached (budget) in-process shards, rounds interleaved, for each stream in turn ->
    (results per stream, the last cached shard's tier metrics, the cached table's value chunk rows).

    Each stream gets its own pair of shards over fresh copies of the table, as a deployment runs one
    workload: replayed on one cached shard, one stream's rows would evict another's between passes,
    and every timed pass of a skewed stream would start cold."""
    # the planner's table for a shard that cannot hold it (chunk size from the cache share, all arrays raw)
    layout = work_table_options(spec, budget, 1, cache_share=CACHE_SHARE)
    out: dict[str, Any] = {}
    tier: dict[str, float] = {}
    chunk_rows = 0
    for label, stream in streams.items():
        stores = {leg: create_table(tmp / f"{spec.name}-{label}-{leg}" / spec.name, spec, **layout)
                  for leg in ("resident", "cached")}
        paths = {leg: store.path for leg, store in stores.items()}
        chunk_rows = stores["cached"].chunk_shape("values")[1]
        unique = [np.unique(e) for e in stream]
        legs = {"resident": _Leg(spec, paths["resident"], None, spec.dim),
                "cached": _Leg(spec, paths["cached"], budget, spec.dim)}
        try:
            for r in range(rounds + 1):  # round 0 warms up; interleaved, so load changes hit both legs alike
                for leg in legs.values():
                    leg.replay(label, unique, timed=r > 0)
            res = {name: leg.summary(label, tokens_per_step, n_steps) for name, leg in legs.items()}
            res["cached_over_resident"] = res["cached"]["steps_per_s"] / res["resident"]["steps_per_s"]
            out[label] = res
            tier = legs["cached"].tier_metrics()
        finally:
            for leg in legs.values():
                leg.close()
    return out, tier, chunk_rows


def _verdicts(res: dict[str, Any], floor: dict[str, Any], chunk_bytes: int) -> None:
    """Disk floor per step for the bytes the cached leg moved, and the verdict of the target that applies."""
    c, f = res["cached"], floor[str(chunk_bytes)]
    floor_s = (c["io_read_bytes_per_step"] / f["read_bytes_per_s"]
               + c["io_write_bytes_per_step"] / f["write_bytes_per_s"])
    res["floor_s_per_step"] = floor_s
    res["cached_over_floor_time"] = (1 / c["steps_per_s"]) / floor_s if floor_s else None
    kind, met = train_leg.judge(res["skew"]["top25_rows_share"], res["cached_over_resident"],
                                res["cached_over_floor_time"], TARGET_SKEWED, TARGET_FLOOR)
    res["target_kind"], res["target_met"] = kind, met
    res["target"] = (f"cached >= {TARGET_SKEWED}x resident (skewed)" if kind == "skewed"
                     else f"cached step time <= {TARGET_FLOOR}x disk floor")


def _train_plan(names: list[str], quick: bool, warmup: int) -> dict[str, tuple[list[str], int]]:
    """{name: (overrides, untimed steps)} for the named training configs; a warm config's own warm-up."""
    unknown = [n for n in names if n not in TRAIN_CONFIGS]
    if unknown:
        raise ValueError(f"unknown training config(s) {unknown}; known: {list(TRAIN_CONFIGS)}")
    return {n: (TRAIN_CONFIGS[n], TRAIN_WARMUP[n][quick] if n in TRAIN_WARMUP else warmup) for n in names}


def run(out_dir: str | Path = "bench/results", quick: bool = False, train_large: bool = False,
        train_configs: list[str] | None = None, train_only: bool = False,
        memory_path_only: bool = False) -> dict[str, Any]:
    """Measure everything, print the ratios, write <out_dir>/beyond_ram.json; returns the results dict.

    quick: fewer steps and rounds, and only the `small` training config unless `train_large`
    (then both 16x-rows training configs run too, the warm one after WARM_STEPS_QUICK).
    train_configs: the training configs to run (default as above); train_only: only those, their
    recordings and the disk floor (no memory path, no gRPC legs); memory_path_only: only the in-process
    memory-path legs and the disk floor (no training leg, so no model-warm stream unless train_configs
    names the warm config, no gRPC legs)."""
    steps, rounds, grpc_rounds, large_steps = (4, 2, 1, 2) if quick else (16, 4, 2, 8)
    # training leg: warm-up steps, rounds, steps per round (timed steps: [warm-up, warm-up + rounds x steps))
    t_warmup, t_rounds, t_per_round = (1, 2, 1) if quick else (4, 3, 4)
    names = train_configs or (["small"] if quick and not train_large else list(TRAIN_CONFIGS))
    if memory_path_only:
        names = [n for n in (train_configs or []) if n == WARM_CONFIG]  # its recording only: never trained here
    plan = _train_plan(names, quick, t_warmup)
    load_at_start, t_start = os.getloadavg(), time.perf_counter()

    # One in-process recording per (overrides, trained) covers every config's timed steps and the memory
    # path's model stream (the 16x cold config's steps are the first of the warm one's recording).
    # --quick records forward passes of the untrained model, except for a warm config (a trained one is its point).
    def trained(name: str) -> bool:
        return not quick or name in TRAIN_WARMUP

    needs: dict[tuple[tuple[str, ...], bool], int] = {} if train_only else {((), not quick): steps}
    for name, (overrides, warmup) in plan.items():
        key = (tuple(overrides), trained(name))
        needs[key] = max(needs.get(key, 0), warmup + t_rounds * t_per_round)
    recordings, recorded_losses = {}, {}
    for key, n in needs.items():
        recorded_losses[key] = []
        recordings[key] = record_model_stream(n, train=key[1], overrides=key[0], losses=recorded_losses[key])
    recording_s = time.perf_counter() - t_start
    tokens_per_step = next(iter(recordings.values()))[2]
    results: dict[str, Any] = {
        "preset": "small", "oversubscription": OVERSUBSCRIPTION, "tokens_per_step": tokens_per_step,
        "quick": quick, "train_only": train_only, "memory_path_only": memory_path_only, "cpus": os.cpu_count(),
        "load_avg_at_start": load_at_start,
        "recording_s": recording_s,  # steps recorded in-process, per (overrides, trained or forward passes)
        "recordings": {f"{' '.join(k[0]) or 'small'} ({'trained' if k[1] else 'forward'})": n
                       for k, n in needs.items()}}
    windows: dict[str, list[np.ndarray]] = {}
    for name, (overrides, warmup) in plan.items():
        _, entries, _ = recordings[(tuple(overrides), trained(name))]
        windows[name] = entries[warmup: warmup + t_rounds * t_per_round]

    with tempfile.TemporaryDirectory(prefix="ultramem-bench-beyond-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        results["train"] = ({} if memory_path_only else
                            train_leg.run_configs(plan, OVERSUBSCRIPTION, t_rounds, t_per_round, tmp / "train"))
        results["train_s"] = time.perf_counter() - t0
        results["load_avg_after_train"] = os.getloadavg()
        sizes = {4096, *(r["table"]["chunk_bytes"] for r in results["train"].values())}
        if not train_only:
            spec, budget, chunk_sizes = _memory_path(results, recordings[((), not quick)], recordings, plan, windows,
                                                     tmp, quick, steps, rounds, large_steps)
            sizes |= chunk_sizes
        floor = disk_floor(tmp, (64 if quick else 512) << 20, tuple(sorted(sizes)), 0.5 if quick else 2.0)
        results["disk_floor"] = floor
        for res in results.get("streams", {}).values():
            _verdicts(res, floor, results["table"]["chunk_bytes"])
        for res in results.get("large_streams", {}).values():
            _verdicts(res, floor, results["large_table"]["chunk_bytes"])
        for name, res in results["train"].items():
            overrides, warmup = plan[name]
            key = (tuple(overrides), trained(name))
            t_spec = recordings[key][0]
            a, b = res["timed_steps"]
            t_skew = {**skew(windows[name], t_spec, res["table"]["chunk_rows"]), "window": [a, b],
                      "recorded_from": (f"in-process training run, steps {a}-{b} of {needs[key]}" if key[1]
                                        else f"forward passes of the untrained model, steps {a}-{b}")}
            train_leg.verdict(res, t_skew, floor, TARGET_SKEWED, TARGET_FLOOR)
            if recorded_losses[key]:  # the recorded model against the trainers: same loss, same regime
                res["recorded_loss_last_round"] = float(np.mean(recorded_losses[key][b - t_per_round: b]))
        if not train_only and not memory_path_only:
            scale_path = create_table(tmp / "grpc" / spec.name, spec, **work_table_options(spec, budget, 1)).path
            unique_model = [np.unique(e) for e in recordings[((), not quick)][1][:steps]]
            for s in (1, 2, 4):
                results["shards"][f"cached/{s}"] = shard_scaling(spec, scale_path, unique_model, s, budget,
                                                                 grpc_rounds)
            results["shards"]["resident/1"] = shard_scaling(spec, scale_path, unique_model, 1, None, grpc_rounds)
    if not train_only and not memory_path_only:
        one = results["shards"]["cached/1"]["rows_per_s"]
        for r in results["shards"].values():
            r["rows_per_s_over_1_cached_shard"] = r["rows_per_s"] / one
    results["wall_s"], results["load_avg_at_end"] = time.perf_counter() - t_start, os.getloadavg()
    _print(results)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "beyond_ram.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'beyond_ram.json'}")
    return results


def _memory_path(results: dict[str, Any], model_rec: tuple[TableSpec, list[np.ndarray], int],
                 recordings: dict[Any, tuple[TableSpec, list[np.ndarray], int]],
                 plan: dict[str, tuple[list[str], int]], windows: dict[str, list[np.ndarray]], tmp: Path,
                 quick: bool, steps: int, rounds: int, large_steps: int) -> tuple[TableSpec, int, set[int]]:
    """The in-process resident vs cached replays (table and 16x table) into `results`.

    Returns the table's spec and RAM budget (for the gRPC legs) and the chunk sizes (for the disk floor)."""
    spec, model_all, tokens_per_step = model_rec
    model_entries = model_all[:steps]
    entries = int(np.median([e.size for e in model_entries]))
    streams = {"model": model_entries, "zipf": zipf_stream(spec.rows, entries, steps)}
    large = dataclasses.replace(spec, name=f"{spec.name}-x{LARGE}", rows=spec.rows * LARGE)
    large_streams = {"zipf": zipf_stream(large.rows, entries, large_steps, seed=1)}
    if WARM_CONFIG in plan:  # the warm config's timed steps, as recorded: the trained model's reads
        warm_spec = recordings[(tuple(plan[WARM_CONFIG][0]), True)][0]
        assert warm_spec.rows == large.rows and warm_spec.num_partitions == large.num_partitions
        large_streams["model-warm"] = windows[WARM_CONFIG][:large_steps]
    table_bytes = partition_nbytes(spec) * spec.num_partitions
    budget = table_bytes // OVERSUBSCRIPTION
    large_budget = partition_nbytes(large) * large.num_partitions // OVERSUBSCRIPTION
    results.update({
        "table": {"rows": spec.rows, "dim": spec.dim, "optimizer": spec.optimizer,
                  "partitions": spec.num_partitions, "bytes_with_state": table_bytes},
        "large_table": {"rows": large.rows, "bytes_with_state": partition_nbytes(large) * large.num_partitions,
                        "budget_bytes": large_budget, "steps": large_steps},
        "budget_bytes": budget, "steps_per_stream": steps, "cache_share_in_process": CACHE_SHARE,
        "row_share": ROW_SHARE, "rounds": rounds, "streams": {}, "large_streams": {}, "shards": {},
        "recorded_from": "forward passes (untrained)" if quick else f"a {steps}-step training run",
        "large_model_warm_from": (f"`{WARM_CONFIG}` timed steps {plan[WARM_CONFIG][1]}-"
                                  f"{plan[WARM_CONFIG][1] + large_steps}" if WARM_CONFIG in plan else None)})
    small_res, results["cached_metrics"], chunk_rows = _replay_legs(spec, tmp, streams, budget, rounds,
                                                                    tokens_per_step, steps)
    large_res, results["large_cached_metrics"], large_chunk_rows = _replay_legs(
        large, tmp, large_streams, large_budget, rounds, tokens_per_step, large_steps)
    results["table"].update(chunk_rows=chunk_rows, chunk_bytes=chunk_rows * spec.dim * 4)
    results["large_table"].update(chunk_rows=large_chunk_rows, chunk_bytes=large_chunk_rows * spec.dim * 4)
    for label, stream in streams.items():
        results["streams"][label] = {"skew": skew(stream, spec, chunk_rows), **small_res[label]}
    for label, stream in large_streams.items():
        results["large_streams"][label] = {"skew": skew(stream, large, large_chunk_rows), **large_res[label]}
    return spec, budget, {results["table"]["chunk_bytes"], results["large_table"]["chunk_bytes"]}


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
    over = r["cached_over_floor_time"]  # None when the cache moved no bytes at all
    print(f"    cached / resident = {r['cached_over_resident']:.3f}x; disk floor for the bytes moved "
          f"{r['floor_s_per_step'] * 1e3:.2f} ms/step, cached = {'-' if over is None else f'{over:.1f}'}x floor; "
          f"target {r['target']}: {'met' if r['target_met'] else 'MISSED'}")


def _print(results: dict[str, Any]) -> None:
    print(f"beyond-ram run: {results['wall_s']:.0f} s (recordings {results['recording_s']:.0f} s, training leg "
          f"{results['train_s']:.0f} s); load average {results['load_avg_at_start'][0]:.1f} at the start, "
          f"{results['load_avg_after_train'][0]:.1f} after training, {results['load_avg_at_end'][0]:.1f} at the end")
    if results["train_only"]:
        for name, r in results["train"].items():
            train_leg.print_result(name, r)
        _print_floor(results["disk_floor"])
        return
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
    _print_floor(results["disk_floor"])
    for name, r in results["shards"].items():
        print(f"  gRPC {name:11s} {r['rows_per_s'] / 1e6:6.3f} M rows/s "
              f"({r['rows_per_s_over_1_cached_shard']:.2f}x 1 cached shard), "
              f"{r['cpu_s_per_million_rows_per_shard_mean']:.2f} CPU-s per M rows per shard")


def _print_floor(f: dict[str, Any]) -> None:
    for size in (k for k in f if k.isdigit()):
        print(f"  disk ({f['mode']}) random {int(size) // 1024} KiB: read {f[size]['read_bytes_per_s'] / 1e6:.0f} MB/s "
              f"({f[size]['read_iops']:,.0f} IOPS), write {f[size]['write_bytes_per_s'] / 1e6:.0f} MB/s")


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-large", action="store_true", help="with --quick: the 16x-rows training configs too")
    ap.add_argument("--configs", nargs="+", choices=list(TRAIN_CONFIGS), help="training configs to run")
    ap.add_argument("--train-only", action="store_true", help="only the training configs and the disk floor")
    ap.add_argument("--memory-path-only", action="store_true",
                    help="only the in-process memory-path legs and the disk floor (with --configs small-x16-warm: "
                         "its recorded stream too)")
    args = ap.parse_args(argv)
    run(args.out, quick=args.quick, train_large=args.train_large, train_configs=args.configs,
        train_only=args.train_only, memory_path_only=args.memory_path_only)


if __name__ == "__main__":
    _main(sys.argv[1:])
