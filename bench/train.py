"""Training-throughput benchmark (`ultramem bench train`, DESIGN §4, §8): where the memory path costs.

The `small` preset, one single-process trainer (no Ray, so the figure isolates the memory path),
three legs in one run on the same batches:
  * local        - LocalBackend (tables in this process), the ceiling;
  * remote rows  - RemoteBackend (async, staleness 2) over 2 `ultramem shard serve` processes:
                   Gather the rows, push row gradients;
  * remote pooled - 2 more shard processes, pooled mode: PooledGather partial sums, PooledBackward.
Each leg runs `warmup` steps, then `steps` timed steps in rounds of 5, the legs taking turns (so
a change in machine load hits all three alike); the figure is the median step time as tokens/s,
and the ratio to local is printed beside it, with the time per step spent inside the backend's
calls (fetch_rows/push_grads or pooled/pooled_backward: the memory path as the trainer sees it).
Batches are random token ids (the memory path does not care what the tokens mean; no corpus to
prepare). If remote pooled misses the target (>= 0.7x local), a few pooled steps are profiled with
cProfile and the top entries by cumulative time go into the JSON. Results: <out>/train.json.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # bench/_shards.py, when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._shards import start_shards, stop_shards  # noqa: E402 (after the sys.path line)
from model_workers.model import LanguageModel, ModelConfig
from model_workers.remote import RemoteBackend
from model_workers.trainer import TrainConfig, autocast_dtype, make_optimizer, resolve_device, train_step
from orchestration.config import load_config
from param_server import allocator
from param_server.client import Client
from storage.layout import TableSpec
from storage.table_store import create_table

REPO = Path(__file__).resolve().parent.parent
NUM_SHARDS = 2
TARGET = 0.7  # remote pooled tokens/s >= 0.7x local (issue 7)
ROUND = 5  # timed steps a leg runs before the next leg takes its turn


def _start_shards(tables: list[Path]) -> tuple[list[subprocess.Popen], list[str]]:
    """NUM_SHARDS shard processes serving `tables` (bench/overlap.py starts its shards through this too)."""
    return start_shards(tables, NUM_SHARDS)


_stop = stop_shards


def _batch(step: int, vocab: int, batch: int, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=torch.Generator().manual_seed(step))
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)


class _Leg:
    """One trainer (model + AdamW) that runs training steps on demand and times them."""

    def __init__(self, model: LanguageModel, train: TrainConfig, cfg: Any) -> None:
        self.device = resolve_device(train)
        self.model, self.train, self.cfg = model.to(self.device), train, cfg
        self.amp = autocast_dtype(train, self.device)
        self.opt = make_optimizer(model, train)
        self.step = 0
        self.times: list[float] = []
        self.losses: list[float] = []
        self.memory_s: dict[str, float] = defaultdict(float)  # seconds inside each backend call, timed steps
        self._timing = False
        backend = model.backend
        for name in ("fetch_rows", "push_grads", "pooled", "pooled_backward"):
            if backend is not None:
                setattr(backend, name, self._timed(name, getattr(backend, name)))

    def _timed(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if self._timing:
                    self.memory_s[name] += time.perf_counter() - t0
        return call

    def run(self, n: int, *, timed: bool) -> None:
        """n more training steps (batches are a function of the step, so every leg sees the same)."""
        cfg = self.cfg
        for _ in range(n):
            x, y = _batch(self.step, cfg.model.vocab_size, cfg.data.batch_size, cfg.data.seq_len, self.device)
            self._timing = timed
            t0 = time.perf_counter()
            res = train_step(self.model, self.opt, x, y, step=self.step, cfg=self.train,
                             max_steps=self.train.max_steps, amp_dtype=self.amp)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            if timed:
                self.times.append(time.perf_counter() - t0)
            self.losses.append(res.loss)
            self.step += 1

    def summary(self) -> dict[str, Any]:
        if self.model.backend is not None:
            self.model.backend.flush()
        median = statistics.median(self.times)
        tokens = self.cfg.data.batch_size * self.cfg.data.seq_len
        n = len(self.times)
        return {"tokens_per_s": tokens / median, "step_s": self.times, "median_step_s": median,
                "first_loss": self.losses[0], "last_loss": self.losses[-1],
                "memory_calls_s_per_step": {k: v / n for k, v in self.memory_s.items()}}


def _specs(model_cfg: ModelConfig) -> list[TableSpec]:
    """The value tables of the model (their initial values are what create_table writes)."""
    return LanguageModel(model_cfg).memory_tables()


def _profile_text(profile: cProfile.Profile, top: int = 25) -> list[str]:
    buf = io.StringIO()
    pstats.Stats(profile, stream=buf).sort_stats("cumulative").print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def run(out_dir: str | Path = "bench/results", quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """Run the three legs, print tokens/s side by side, write <out_dir>/train.json."""
    warmup, steps = (2, 8) if quick else (5, 30)
    allocator.apply(allocator.worker_settings())  # this process is the model worker
    cfg = load_config(preset="small")
    steps = -(-steps // ROUND) * ROUND
    train = replace(cfg.train, max_steps=warmup + steps + 3, **({"device": device} if device else {}))
    results: dict[str, Any] = {"preset": "small", "num_shards": NUM_SHARDS, "workers": 1, "warmup": warmup,
                               "steps": steps, "batch": [cfg.data.batch_size, cfg.data.seq_len],
                               "device": str(resolve_device(train)), "cpus": os.cpu_count(),
                               "torch_threads": torch.get_num_threads(), "consistency": "async (staleness 2)",
                               "load_avg_at_start": os.getloadavg(),
                               "legs": {}}
    results["autocast"] = str(autocast_dtype(train, resolve_device(train)))

    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-train-") as tmp:
        specs = _specs(cfg.model)
        tables = [create_table(Path(tmp) / spec.name, spec).path for spec in specs]
        clients = []
        try:
            torch.manual_seed(0)
            legs = {"local": _Leg(LanguageModel(cfg.model), train, cfg)}
            for lookup in ("rows", "pooled"):
                started, addresses = _start_shards(tables)  # own shards per leg: same initial tables
                procs += started
                clients.append(Client(addresses))
                mc = replace(cfg.model, memory=replace(cfg.model.memory, lookup=lookup))
                torch.manual_seed(0)
                legs[f"remote_{lookup}"] = _Leg(LanguageModel(mc, backend=RemoteBackend(clients[-1], specs)),
                                                train, cfg)
            for leg in legs.values():
                leg.run(warmup, timed=False)
            # interleaved rounds: a change in machine load (2 shared cores here) hits every leg alike
            for _ in range(-(-steps // ROUND)):
                for leg in legs.values():
                    leg.run(ROUND, timed=True)
            results["legs"] = {name: leg.summary() for name, leg in legs.items()}
            local = results["legs"]["local"]["tokens_per_s"]
            if results["legs"]["remote_pooled"]["tokens_per_s"] < TARGET * local:
                profile = cProfile.Profile()
                profile.enable()
                legs["remote_pooled"].run(3, timed=False)
                profile.disable()
                results["pooled_profile_top"] = _profile_text(profile)
        finally:
            for client in clients:
                client.close()
            _stop(procs)

    local = results["legs"]["local"]["tokens_per_s"]
    for leg in results["legs"].values():
        leg["ratio_to_local"] = leg["tokens_per_s"] / local
    pooled = results["legs"]["remote_pooled"]["ratio_to_local"]
    results["target_pooled_over_local"] = TARGET
    results["target_met"] = pooled >= TARGET
    print(f"train bench: `small` preset, batch {cfg.data.batch_size}x{cfg.data.seq_len}, {NUM_SHARDS} shard "
          f"processes per remote leg, 1 trainer, {results['device']} ({results['autocast']}), "
          f"median of {steps} steps after {warmup}")
    for name, leg in results["legs"].items():
        print(f"  {name:14s} {leg['tokens_per_s']:9,.0f} tokens/s  {leg['median_step_s'] * 1e3:8.1f} ms/step  "
              f"{leg['ratio_to_local']:5.2f}x local  (loss {leg['first_loss']:.3f} -> {leg['last_loss']:.3f}); "
              "in backend calls: " + ", ".join(f"{k} {v * 1e3:.0f} ms"
                                               for k, v in leg["memory_calls_s_per_step"].items()))
    print(f"  target remote pooled >= {TARGET}x local: {pooled:.2f}x ({'met' if results['target_met'] else 'MISSED'})")
    for line in results.get("pooled_profile_top", [])[:40]:
        print(f"    {line}")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "train.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'train.json'}")
    return results


if __name__ == "__main__":
    dev = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--device=")), None)
    run(quick="--quick" in sys.argv, device=dev)
