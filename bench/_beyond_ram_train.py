"""Training leg of the beyond-RAM benchmark (bench/beyond_ram.py; DESIGN §1, §5): training tokens/s
with the shards' tables 4x their RAM budget against fully resident shards.

The real distributed training path: for each model config (the `small` preset, and the same with
more memory rows) two `DistributedTrainer`s run at once in one embedded Ray, each with 2
`ShardActor`s and 1 `ModelWorker` (dense compute + RemoteBackend lookups + async pushes, the
config's consistency mode), on the same State of the Union batches from the same seed:
  * resident: no RAM budget, every partition in the shards' RAM;
  * cached:   `shard_budget_bytes` = table bytes (values + optimizer state) / (4 x shards), so the
              table is 4x the shards' RAM budget together; the rest is served through the hot-row
              and chunk caches over the Zarr work table (created by the planner,
              `work_table_options`: chunks sized from the cache share, every array raw, so the
              chunk cache reads and writes chunk files in place; the engines are in the result).
The driver calls the workers' `run(until)`, the call `DistributedTrainer.run` makes per training
chunk (without its evaluation and checkpoints, which are not training throughput). Warm-up steps
come first and are not timed (actor start-up, first batches, caches filling; for a "warm" config,
enough training that the model's reads have concentrated as a trained model's do); both legs run
them at once, which changes nothing measured. Then the legs take turns, `steps_per_round` steps
each, the order flipped every round, so load changes hit both.
Per round: the wall time of the call (steps + the flush of their pushes at the end), the worker's
own time inside `train_step`, and the shards' counter deltas (cache hits, bytes loaded and written
back, chunk I/O seconds). Results: medians over rounds, and the ratio cached / resident.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

SHARDS = 2
WORKERS = 1
_COUNTERS = ("cache_hits", "cache_misses", "cache_row_hits", "cache_row_misses", "cache_bytes_loaded",
             "cache_bytes_written_back", "cache_io_read_s", "cache_io_write_s", "rows_looked_up")
_ENGINES = ("cache_io_raw_arrays", "cache_io_tensorstore_arrays", "cache_io_zarr_arrays")  # arrays per engine
SKEWED_TOP25_SHARE = 0.75  # the skewed regime: the hottest 25% of rows take at least this share of lookups


def judge(top25_rows_share: float, cached_over_resident: float, cached_over_floor: float | None,
          target_skewed: float, target_floor: float) -> tuple[str, bool]:
    """The issue's rule: ("skewed", met) where the hottest 25% of rows take >= 75% of lookups (cached
    >= target_skewed x resident), else ("floor", met) (cached step time <= target_floor x the floor)."""
    if top25_rows_share >= SKEWED_TOP25_SHARE:
        return "skewed", cached_over_resident >= target_skewed
    return "floor", cached_over_floor is not None and cached_over_floor <= target_floor


def run_config(name: str, overrides: list[str], oversubscription: int, warmup: int, rounds: int,
               steps_per_round: int, tmp: Path) -> dict[str, Any]:
    """Resident vs cached trainers of one config, interleaved; returns the per-leg medians and the ratio."""
    import ray

    from model_workers.model import LanguageModel
    from orchestration.config import load_config
    from orchestration.distributed import DistributedTrainer
    from param_server.partitions import partition_nbytes
    from storage.table_store import open_table

    cfg = load_config(preset="small", overrides=["train.device=cpu", *overrides])
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, shards=SHARDS, workers=WORKERS))
    (spec,) = LanguageModel(cfg.model).memory_tables()
    table_bytes = partition_nbytes(spec) * spec.num_partitions
    budget = table_bytes // (oversubscription * SHARDS)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * WORKERS
    trainers: dict[str, Any] = {}
    rounds_out: dict[str, list[dict[str, float]]] = {"resident": [], "cached": []}
    try:
        trainers["resident"] = DistributedTrainer(cfg, tmp / f"{name}-resident", progress=False)
        trainers["cached"] = DistributedTrainer(cfg, tmp / f"{name}-cached", progress=False,
                                                shard_budget_bytes=budget)
        step = warmup
        t0 = time.perf_counter()  # not timed: both legs at once (submit all, wait once)
        warm = ray.get([w.run.remote(warmup) for leg in trainers.values() for w in leg.workers])
        warmup_s = time.perf_counter() - t0
        for r in range(rounds):
            order = ("resident", "cached") if r % 2 == 0 else ("cached", "resident")
            for leg in order:
                rounds_out[leg].append(_timed_chunk(trainers[leg], step, step + steps_per_round))
            step += steps_per_round
        cached_metrics = _summed(trainers["cached"].shard_metrics())
        chunk_rows = open_table(trainers["cached"].work_paths[spec.name]).chunk_shape("values")[1]
    finally:
        for leg in trainers.values():
            leg.close()
    legs = {leg: _summary(p, tokens_per_step, steps_per_round) for leg, p in rounds_out.items()}
    per_round = [c["seconds"] and r["seconds"] / c["seconds"]
                 for r, c in zip(rounds_out["resident"], rounds_out["cached"], strict=True)]
    return {
        "overrides": overrides, "table": {"rows": spec.rows, "dim": spec.dim, "optimizer": spec.optimizer,
                                          "partitions": spec.num_partitions, "bytes_with_state": table_bytes,
                                          "chunk_rows": chunk_rows, "chunk_bytes": chunk_rows * spec.dim * 4},
        "shards": SHARDS, "workers": WORKERS, "consistency": cfg.cluster.consistency,
        "staleness": cfg.cluster.staleness, "autocast": cfg.train.autocast, "shard_budget_bytes": budget,
        "shard_cache_share": _cache_share(), "cached_partitions_total": cached_metrics["cached_partitions"],
        "chunk_io_arrays": {k.removeprefix("cache_io_").removesuffix("_arrays"): cached_metrics[k] for k in _ENGINES},
        "tokens_per_step": tokens_per_step, "warmup_steps": warmup, "warmup_s": warmup_s,
        "warmup_loss": [float(r["loss"]) for r in warm],  # mean over the warm-up, per leg (resident, cached)
        "timed_steps": [warmup, warmup + rounds * steps_per_round], "rounds": rounds,
        "steps_per_round": steps_per_round, **legs,
        # the headline: median of the per-round ratios (the legs of a round ran back to back)
        "cached_over_resident": statistics.median(per_round),
        "cached_over_resident_per_round": per_round,
        "cached_over_resident_worker_time": legs["resident"]["worker_s_per_step"] / legs["cached"]["worker_s_per_step"]}


def _cache_share() -> float:
    from param_server.shard import ShardConfig

    return ShardConfig().cache_share


def _summed(metrics: list[dict[str, float]]) -> dict[str, float]:
    """Sum every shard's counters (and the cached partition count)."""
    keys = (*_COUNTERS, "cached_partitions", "resident_partitions", *_ENGINES)
    return {k: float(sum(m.get(k, 0.0) for m in metrics)) for k in keys}


def _timed_chunk(trainer: Any, start: int, until: int) -> dict[str, float]:
    """Train steps [start, until) on every worker; wall and worker time, shard counter deltas."""
    m0 = _summed(trainer.shard_metrics())
    w0 = sum(r["train_time"] for r in trainer.call_workers("run", start))  # a no-op: the worker is at `start`
    t0 = time.perf_counter()
    res = trainer.call_workers("run", until)
    wall = time.perf_counter() - t0
    m1 = _summed(trainer.shard_metrics())
    return {"seconds": wall, "worker_s": sum(r["train_time"] for r in res) - w0, "steps": float(until - start),
            "loss": float(statistics.mean(r["loss"] for r in res)), **{k: m1[k] - m0[k] for k in _COUNTERS}}


def _summary(rounds: list[dict[str, float]], tokens_per_step: int, steps: int) -> dict[str, Any]:
    sec = statistics.median(r["seconds"] for r in rounds)

    def rate(hit: str, miss: str) -> float | None:
        h, m = sum(r[hit] for r in rounds), sum(r[miss] for r in rounds)
        return h / (h + m) if h + m else None

    per_step = {f"{k}_per_step": statistics.median(r[k] for r in rounds) / steps for k in
                ("cache_bytes_loaded", "cache_bytes_written_back", "cache_io_read_s", "cache_io_write_s",
                 "rows_looked_up")}
    return {"median_round_s": sec, "s_per_step": sec / steps, "tokens_per_s": tokens_per_step * steps / sec,
            "worker_s_per_step": statistics.median(r["worker_s"] for r in rounds) / steps,
            "round_seconds": [r["seconds"] for r in rounds], "last_loss": rounds[-1]["loss"],
            "cache_hit_rate": rate("cache_hits", "cache_misses"),
            "cache_row_hit_rate": rate("cache_row_hits", "cache_row_misses"), **per_step}


def verdict(res: dict[str, Any], skew: dict[str, float], floor: dict[str, Any], target_skewed: float,
            target_floor: float) -> None:
    """Add the disk-floor step time and the verdict of the target that applies to one config's result.

    The floor for a training step: the resident step time plus the bytes the cached shards moved per
    step at the disk's random-read / random-write rate for one chunk (the miss path at disk speed,
    not overlapped with compute: the most lenient floor)."""
    res["skew"] = skew
    f = floor[str(res["table"]["chunk_bytes"])]
    c = res["cached"]
    io = (c["cache_bytes_loaded_per_step"] / f["read_bytes_per_s"]
          + c["cache_bytes_written_back_per_step"] / f["write_bytes_per_s"])
    res["disk_io_floor_s_per_step"] = io
    res["floor_s_per_step"] = res["resident"]["s_per_step"] + io
    res["cached_over_floor_time"] = c["s_per_step"] / res["floor_s_per_step"]
    kind, met = judge(skew["top25_rows_share"], res["cached_over_resident"], res["cached_over_floor_time"],
                      target_skewed, target_floor)
    res["target_kind"], res["target_met"] = kind, met
    res["target"] = (f"cached >= {target_skewed}x resident tokens/s (skewed: hottest 25% of rows take >= "
                     f"{SKEWED_TOP25_SHARE:.0%} of the timed steps' lookups)" if kind == "skewed"
                     else f"cached step time <= {target_floor}x (resident step + disk time for the bytes moved)")


def print_result(name: str, r: dict[str, Any]) -> None:
    """One block per config: both legs, the ratio, the skew, hit rates, the floor and the verdict."""
    t, s = r["table"], r["skew"]
    engines = ", ".join(f"{e} {n:.0f}" for e, n in r["chunk_io_arrays"].items() if n)
    print(f"  [train {name}] P={t['rows']} ({t['bytes_with_state'] / 2**20:.1f} MiB with state, chunks of "
          f"{t['chunk_rows']} rows; arrays per chunk I/O engine, all shards: {engines or 'none'}), "
          f"{r['shards']} shards x {r['shard_budget_bytes'] / 2**20:.2f} MiB budget, "
          f"{r['consistency']} (staleness {r['staleness']}), {r['rounds']} rounds x {r['steps_per_round']} steps "
          f"after {r['warmup_steps']} untimed ({r['warmup_s']:.0f} s, both legs at once)")
    a, b = r["timed_steps"]
    print(f"    access over the timed steps {a}-{b} ({s['recorded_from']}): hottest 10% / 25% of rows take "
          f"{100 * s['top10_rows_share']:.0f}% / {100 * s['top25_rows_share']:.0f}% of lookups (uniform draws: "
          f"{100 * s['top25_rows_share_uniform']:.0f}%), {s['unique_rows_per_step']:.0f} unique rows/step, "
          f"{100 * s['rows_touched_share']:.0f}% of rows touched in the window")
    for leg in ("resident", "cached"):
        x = r[leg]
        hit = (f"; row hit rate {x['cache_row_hit_rate']:.2f}, chunk hit rate {x['cache_hit_rate']:.2f}, "
               f"{x['cache_bytes_loaded_per_step'] / 1e6:.1f} + {x['cache_bytes_written_back_per_step'] / 1e6:.1f} "
               f"MB/step read + written" if x["cache_hit_rate"] is not None else "")
        print(f"    {leg:8s} {x['tokens_per_s']:8,.0f} training tokens/s  {x['s_per_step']:6.2f} s/step "
              f"(worker {x['worker_s_per_step']:.2f} s){hit}")
    print(f"    cached / resident = {r['cached_over_resident']:.3f}x (rounds: "
          f"{', '.join(f'{v:.2f}' for v in r['cached_over_resident_per_round'])}); cached = "
          f"{r['cached_over_floor_time']:.2f}x the floor ({r['floor_s_per_step']:.2f} s/step); "
          f"target applied: {r['target_kind']}, {r['target']}: {'met' if r['target_met'] else 'MISSED'}")


def run_configs(configs: dict[str, tuple[list[str], int]], oversubscription: int, rounds: int,
                steps_per_round: int, tmp: Path) -> dict[str, Any]:
    """`run_config` for each {name: (--set overrides of the small preset, warm-up steps)}, in one embedded Ray."""
    from orchestration.cluster import Cluster, ClusterConfig

    # room for both trainers of a config at once: (shards + workers) logical CPUs each
    cluster = Cluster(ClusterConfig(num_cpus=2 * (SHARDS + WORKERS)))
    cluster.connect()
    try:
        return {name: run_config(name, overrides, oversubscription, warmup, rounds, steps_per_round, tmp)
                for name, (overrides, warmup) in configs.items()}
    finally:
        if cluster.started_here:
            cluster.close()
