"""Overlap timeline (`ultramem bench overlap`, issue 7): do the memory lookups travel while the dense
blocks compute?

The `small` preset model (its memory reads at block 1 and adds after block 2) trains a few steps
with a RemoteBackend over 2 `ultramem shard serve` processes. Every dense block's forward and every
lookup (on its lookup thread) is recorded as a span; the spans of the last steps are written as a
Chrome trace (`<out>/overlap_trace.json`, open in chrome://tracing or ui.perfetto.dev) and summed
into one figure: the share of lookup time during which a dense block was computing. For contrast
the same run with the memory added right after its read block (`1:1`, nothing to overlap) is timed
side by side: steps alternate between the two models.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_workers.model import LanguageModel
from model_workers.remote import RemoteBackend
from model_workers.trainer import autocast_dtype, make_optimizer, resolve_device, train_step
from orchestration.config import load_config
from param_server import allocator
from param_server.client import Client
from storage.table_store import create_table


def _train_bench() -> Any:
    """bench/train.py as a module (its shard-process helpers)."""
    spec = importlib.util.spec_from_file_location("ultramem_bench_train", REPO / "bench" / "train.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Spans:
    """Thread-safe span log: (name, thread, start, end) in seconds since the log began."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.items: list[tuple[str, str, float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                with self._lock:
                    self.items.append((name, threading.current_thread().name, start - self.t0,
                                       time.perf_counter() - self.t0))
        return call

    def chrome_trace(self) -> dict[str, Any]:
        threads = sorted({t for _, t, _, _ in self.items})
        return {"traceEvents": [
            {"name": n, "ph": "X", "pid": 1, "tid": threads.index(t), "ts": s * 1e6, "dur": (e - s) * 1e6,
             "args": {"thread": t}} for n, t, s, e in self.items]}

    def overlap_share(self) -> float:
        """Share of lookup time during which some dense block was computing."""
        blocks = [(s, e) for n, _, s, e in self.items if n.startswith("block")]
        total = covered = 0.0
        for n, _, s, e in self.items:
            if n.startswith("lookup"):
                total += e - s
                covered += sum(max(0.0, min(e, be) - max(s, bs)) for bs, be in blocks)
        return covered / total if total else 0.0


def run(out_dir: str | Path = "bench/results", quick: bool = False) -> dict[str, Any]:
    """Train both placements side by side, write the trace and <out>/overlap.json."""
    train_bench = _train_bench()
    allocator.apply(allocator.worker_settings())  # this process is the model worker
    steps = 4 if quick else 12
    cfg = load_config(preset="small")
    train = replace(cfg.train, max_steps=steps + 4)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"preset": "small", "steps": steps, "shards": 2}
    procs: list[Any] = []
    clients: list[Client] = []
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-overlap-") as tmp:
        try:
            legs: dict[str, dict[str, Any]] = {}
            for placement in ("1:2", "1:1"):
                mc = replace(cfg.model, memory=replace(cfg.model.memory, placement=placement))
                specs = LanguageModel(mc).memory_tables()
                tables = [create_table(Path(tmp) / placement.replace(":", "_") / s.name, s).path for s in specs]
                started, addresses = train_bench._start_shards(tables)
                procs += started
                clients.append(Client(addresses))
                torch.manual_seed(0)
                backend = RemoteBackend(clients[-1], specs, consistency="async", staleness=2)
                model = LanguageModel(mc, backend=backend)
                spans = Spans()
                for i, block in enumerate(model.blocks):
                    block.forward = spans.wrap(f"block {i}", block.forward)
                backend.fetch_rows = spans.wrap("lookup", backend.fetch_rows)  # runs on the lookup thread
                device = resolve_device(train)
                legs[placement] = {"model": model.to(device), "opt": make_optimizer(model, train), "spans": spans,
                                   "times": [], "amp": autocast_dtype(train, device), "device": device}
            for step in range(steps + 2):  # the two models take turns, step by step
                tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1),
                                       generator=torch.Generator().manual_seed(step))
                for leg in legs.values():
                    if step == 2:
                        leg["spans"].items.clear()  # keep the steady state only
                    t0 = time.perf_counter()
                    train_step(leg["model"], leg["opt"], tokens[:, :-1], tokens[:, 1:], step=step, cfg=train,
                               max_steps=train.max_steps, amp_dtype=leg["amp"])
                    if step >= 2:
                        leg["times"].append(time.perf_counter() - t0)
            for placement, leg in legs.items():
                spans = leg["spans"]
                results[placement] = {"median_step_s": statistics.median(leg["times"]),
                                      "lookup_time_overlapped_by_dense_blocks": spans.overlap_share(),
                                      "lookups": sum(1 for n, *_ in spans.items if n == "lookup")}
            trace = out / "overlap_trace.json"
            trace.write_text(json.dumps(legs["1:2"]["spans"].chrome_trace()))
            results["trace"] = str(trace)
            results["step_time_ratio_1_2_over_1_1"] = results["1:2"]["median_step_s"] / results["1:1"]["median_step_s"]
        finally:
            for client in clients:
                client.close()
            train_bench._stop(procs)
    (out / "overlap.json").write_text(json.dumps(results, indent=2))
    print(f"overlap: read at block 1, add after block 2: {results['1:2']['lookup_time_overlapped_by_dense_blocks']:.0%}"
          f" of lookup time overlapped dense compute; read and add at block 1: "
          f"{results['1:1']['lookup_time_overlapped_by_dense_blocks']:.0%}; step time 1:2 / 1:1 = "
          f"{results['step_time_ratio_1_2_over_1_1']:.2f}; trace: {results['trace']}")
    return results


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
