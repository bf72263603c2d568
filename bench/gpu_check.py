"""GPU check (`make gpu-check`): the `tiny` preset trained on a device with the real RemoteBackend
against CPU shard processes, step by step against the same run on the CPU.

    python bench/gpu_check.py [--device cuda|cpu] [--steps 20]     # make gpu-check [DEVICE=cpu]

For each lookup mode (rows, pooled) it trains twice from the same initial dense weights and tables,
on the same batches (random token ids seeded by the step; no corpus needed), in sync consistency
(staleness 0, so the runs are deterministic up to floating point): once on the CPU in fp32 (the
reference) and once on `--device` in fp32, plus once in bf16 autocast when the device is CUDA.
Each run gets 2 fresh shards on the CPU over the same initial Zarr tables: Ray `ShardActor`s in an
embedded Ray when Ray is importable (`--shards auto`, the default), else plain `ultramem shard serve`
processes started and stopped by PID (`--shards processes`; a GPU machine without Ray). It asserts
that every step's loss, and at the end every dense parameter and every value table (read back from
the shards), match the reference within the tolerances of the run's precision (`TOLERANCES`), and
prints the step and memory-path tokens/s (tokens per step / seconds per step spent inside the
backend's lookup and update calls).
`--device cpu` runs the whole check with the "device" run on the CPU too (it then matches exactly).

Exit status: 0 all runs match, 1 a run does not, 2 this machine cannot run the check (no CUDA
device, or a package the shards need is missing or does not import: the message names it).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # bench/_shards.py and the project, when run as a script
    sys.path.insert(0, str(REPO))

# per precision: max |loss - reference loss| at any step, and max distance of any dense parameter
# or value table at the end from the reference's, relative to how far training moved it:
# ||x - ref|| / ||ref - init|| (AdamW moves small weights far: 20 steps at lr 3e-3 move a weight by up
# to 0.06, several times its init std, so a distance relative to ||ref|| would mostly measure that)
FLOOR = 0.1  # the smallest change a tensor's distance is measured against, as a share of its size
# bf16, measured with bf16 autocast on the CPU against the fp32 reference: |dloss| up to 0.020, distance
# up to 0.38 (`--device cpu --precision bf16`); a wrong or stale copy is off by about 1 or more
TOLERANCES = {"fp32": {"loss": 2e-3, "param": 2e-2}, "bf16": {"loss": 5e-2, "param": 0.75}}
NUM_SHARDS = 2
WARMUP = 2  # steps left out of the timing (allocations, first lookups)
# what the shard processes and this script import beyond torch and numpy (Ray is not needed)
NEEDED = ("grpc", "google.protobuf", "grpc_health", "grpc_reflection", "zarr", "ml_dtypes")


@dataclass
class RunResult:
    """What one training run left: losses per step, final weights, timings."""

    name: str
    losses: list[float]
    dense: dict[str, Any]  # name -> float32 CPU tensor
    tables: dict[str, Any]  # table name -> float32 [P, d_v] numpy, read back from the shards
    start: dict[str, Any] = field(default_factory=dict)  # "dense/<name>", "table/<name>" before step 0
    step_s: list[float] = field(default_factory=list)  # per timed step
    memory_s: list[float] = field(default_factory=list)  # per timed step, inside backend calls
    tokens_per_step: int = 0

    def tokens_per_s(self) -> tuple[float, float]:
        """(step tokens/s, memory-path tokens/s), medians over the timed steps."""
        step = statistics.median(self.step_s) if self.step_s else math.nan
        memory = statistics.median(self.memory_s) if self.memory_s else math.nan
        return self.tokens_per_step / step, self.tokens_per_step / memory


def _distance(a: Any, b: Any, start: Any = None) -> float:
    """||a - b|| / max(||b - start||, FLOOR * ||b||): how far `a` is from the reference `b`, relative to
    how far training moved `b` from `start`, or to a tenth of its size for a tensor that training
    barely moves (the TDQKR filter vectors, derived from the cores); the plain distance when both are 0."""
    import numpy as np

    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.shape != b64.shape:
        return math.inf
    moved = float(np.linalg.norm(b64 - np.asarray(start, dtype=np.float64))) if start is not None else 0.0
    scale = max(moved, FLOOR * float(np.linalg.norm(b64)))
    diff = float(np.linalg.norm(a64 - b64))
    return diff / scale if scale > 0 else diff


def worst_distance(run: RunResult, reference: RunResult) -> float:
    """The largest `_distance` of any dense parameter or table of `run` from the reference's."""
    dense = [_distance(run.dense[k], v, reference.start.get(f"dense/{k}"))
             for k, v in reference.dense.items() if k in run.dense]
    tables = [_distance(run.tables[k], v, reference.start.get(f"table/{k}"))
              for k, v in reference.tables.items() if k in run.tables]
    return max(dense + tables, default=0.0)


def compare(run: RunResult, reference: RunResult, precision: str) -> list[str]:
    """The ways `run` differs from `reference` beyond the tolerances of `precision` (empty: it matches)."""
    tol = TOLERANCES[precision]
    problems = []
    if len(run.losses) != len(reference.losses):
        problems.append(f"{run.name}: {len(run.losses)} steps, reference {len(reference.losses)}")
    for step, (got, want) in enumerate(zip(run.losses, reference.losses, strict=False)):
        if not (math.isfinite(got) and abs(got - want) <= tol["loss"]):
            problems.append(f"{run.name}: step {step} loss {got:.6f} vs reference {want:.6f} "
                            f"(tolerance {tol['loss']})")
    for kind, mine, theirs in (("dense", run.dense, reference.dense), ("table", run.tables, reference.tables)):
        if sorted(mine) != sorted(theirs):
            problems.append(f"{run.name}: {kind} names differ: {sorted(set(mine) ^ set(theirs))}")
            continue
        for name in sorted(mine):
            d = _distance(mine[name], theirs[name], reference.start.get(f"{kind}/{name}"))
            if not d <= tol["param"]:
                problems.append(f"{run.name}: {kind} {name} is {d:.2e} away from the reference "
                                f"(L2, relative to the reference's change in training; tolerance {tol['param']})")
    return problems


def _environment_problems() -> list[str]:
    """Why this machine cannot run the check (empty: it can): missing packages, failing imports."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        return [f"missing Python packages: {', '.join(missing)} (the project's lock pins their versions)"]
    problems = []
    for module in ("protos.ultramem.v1.memory_pb2", "param_server.server", "storage.table_store",
                   "model_workers.remote", "model_workers.trainer", "orchestration.config"):
        try:
            importlib.import_module(module)
        except Exception as err:  # e.g. a protobuf runtime older than the generated code
            problems.append(f"importing {module}: {type(err).__name__}: {err}")
    return problems


class ProcessShards:
    """`ultramem shard serve` processes (bench/_shards.py), stopped by PID."""

    name = "shard-serve processes"

    def __init__(self) -> None:
        self._procs: list[Any] = []

    def start(self, tables: list[Path]) -> list[str]:
        from bench._shards import start_shards

        self._procs, addresses = start_shards(tables, NUM_SHARDS)
        return addresses

    def stop(self) -> None:
        from bench._shards import stop_shards

        stop_shards(self._procs)
        self._procs = []

    def close(self) -> None:
        self.stop()


class RayShards:
    """`ShardActor`s in an embedded, loopback-only Ray (orchestration/cluster.py), killed after each run."""

    name = "Ray shard actors"

    def __init__(self) -> None:
        import os

        from orchestration.cluster import Cluster, ClusterConfig

        self._cluster = Cluster(ClusterConfig(num_cpus=max(os.cpu_count() or 1, 2 * NUM_SHARDS)))
        self._cluster.connect()
        self._actors: list[Any] = []

    def start(self, tables: list[Path]) -> list[str]:
        import ray

        from orchestration.placement import shard_options
        from param_server.actor import ShardActor, ShardActorConfig
        from storage.table_store import open_table

        paths = {open_table(t, "r").spec.name: str(t) for t in tables}
        num_partitions = open_table(tables[0], "r").spec.num_partitions
        options = shard_options(self._cluster.resources(), max_restarts=0)
        self._actors = [ray.remote(ShardActor).options(**options).remote(
            ShardActorConfig(shard_id=s, table_paths=paths, partitions=tuple(range(s, num_partitions, NUM_SHARDS))))
            for s in range(NUM_SHARDS)]
        return ray.get([actor.address.remote() for actor in self._actors], timeout=120)

    def stop(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def close(self) -> None:
        self.stop()
        self._cluster.close()


def _train(device_name: str, lookup: str, precision: str, tables: list[Path], steps: int,
           shards: ProcessShards | RayShards) -> RunResult:
    """One run: fresh shards over the initial `tables`, `steps` sync training steps."""
    import torch

    from model_workers.model import LanguageModel
    from model_workers.remote import RemoteBackend
    from model_workers.trainer import make_optimizer, train_step
    from orchestration.config import load_config
    from param_server.client import Client

    cfg = load_config(preset="tiny", overrides=[f'model.memory.lookup="{lookup}"'])
    device = torch.device(device_name)
    train = replace(cfg.train, max_steps=steps, device=device.type,
                    autocast="bf16" if precision == "bf16" else "off")
    amp = torch.bfloat16 if precision == "bf16" else None
    batch, seq = cfg.data.batch_size, cfg.data.seq_len
    client = Client(shards.start(tables))
    try:
        torch.manual_seed(0)
        specs = LanguageModel(cfg.model).memory_tables()
        backend = RemoteBackend(client, specs, consistency="sync")
        torch.manual_seed(0)
        model = LanguageModel(cfg.model, backend=backend).to(device)
        optimizer = make_optimizer(model, train)
        in_backend = [0.0]

        def timed(fn: Any) -> Any:
            def call(*args: Any, **kw: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kw)
                finally:
                    in_backend[0] += time.perf_counter() - t0
            return call

        for name in ("fetch_rows", "push_grads", "pooled", "pooled_backward"):
            setattr(backend, name, timed(getattr(backend, name)))
        result = RunResult(f"{lookup}/{device.type}/{precision}", [], {}, {}, tokens_per_step=batch * seq)
        result.start = {f"dense/{k}": v.detach().float().cpu().clone() for k, v in model.state_dict().items()}
        result.start.update({f"table/{spec.name}": backend.fetch_rows(spec.name, torch.arange(spec.rows)).numpy()
                             for spec in specs})
        for step in range(steps):
            tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq + 1),
                                   generator=torch.Generator().manual_seed(1000 + step))
            x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
            in_backend[0] = 0.0
            t0 = time.perf_counter()
            res = train_step(model, optimizer, x, y, step=step, cfg=train, max_steps=steps, amp_dtype=amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= WARMUP:
                result.step_s.append(time.perf_counter() - t0)
                result.memory_s.append(in_backend[0])
            result.losses.append(res.loss)
        backend.flush()
        result.dense = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        for spec in specs:  # sync: the lookup waits until every push of the run is applied
            result.tables[spec.name] = backend.fetch_rows(spec.name, torch.arange(spec.rows)).numpy()
        return result
    finally:
        client.close()
        shards.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="where the worker runs: cuda (default) or cpu")
    parser.add_argument("--steps", type=int, default=20, help="sync training steps per run (default 20)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "both"), default="auto",
                        help="the device runs: fp32, bf16 autocast or both (auto: both on CUDA, fp32 on the CPU)")
    parser.add_argument("--shards", choices=("auto", "ray", "processes"), default="auto",
                        help="Ray shard actors or `ultramem shard serve` processes (auto: Ray if importable)")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must be > {WARMUP}")
    problems = _environment_problems()
    if problems:
        for line in problems:
            print(f"gpu-check: {line}", file=sys.stderr)
        print("gpu-check: install them, or carry their wheels to this machine (docs/benchmarks.md)", file=sys.stderr)
        return 2
    from param_server import allocator

    allocator.apply(allocator.worker_settings())  # this process is the model worker
    import torch

    from storage.table_store import create_table

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; `make gpu-check DEVICE=cpu` runs the check on the CPU",
              file=sys.stderr)
        return 2
    if args.precision == "auto":
        precisions = ["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"]
    else:
        precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    use_ray = args.shards == "ray" or (args.shards == "auto" and importlib.util.find_spec("ray") is not None)
    shards = RayShards() if use_ray else ProcessShards()
    print(f"gpu-check: tiny preset, {args.steps} sync steps per run, {NUM_SHARDS} {shards.name} on the CPU "
          f"per run, device {args.device} ({where}) against the CPU (fp32)")
    rows = []
    problems = []  # mismatches, over every run
    with tempfile.TemporaryDirectory(prefix="ultramem-gpu-check-") as tmp:
        from model_workers.model import LanguageModel
        from orchestration.config import load_config

        torch.manual_seed(0)
        specs = LanguageModel(load_config(preset="tiny").model).memory_tables()
        tables = [create_table(Path(tmp) / spec.name, spec).path for spec in specs]
        try:
            for lookup in ("rows", "pooled"):
                reference = _train("cpu", lookup, "fp32", tables, args.steps, shards)
                for precision in precisions:
                    run = _train(args.device, lookup, precision, tables, args.steps, shards)
                    found = compare(run, reference, precision)
                    problems += found
                    worst_loss = max(abs(a - b) for a, b in zip(run.losses, reference.losses, strict=True))
                    worst = worst_distance(run, reference)
                    rows.append((run, reference, worst_loss, worst, not found))
        finally:
            shards.close()
    print(f"  {'run':20s} {'loss 0 -> last':>17s} {'max |dloss|':>11s} {'max dist':>10s} "
          f"{'step tok/s':>11s} {'memory-path tok/s':>17s}  verdict")
    printed: set[int] = set()
    for run, reference, worst_loss, worst, ok in rows:
        for r in (reference, run):
            if id(r) in printed:
                continue
            printed.add(id(r))
            step_rate, memory_rate = r.tokens_per_s()
            same = r is reference
            verdict = "reference" if same else ("match" if ok else "MISMATCH")
            print(f"  {r.name:20s} {r.losses[0]:8.4f}->{r.losses[-1]:7.4f} "
                  f"{'' if same else f'{worst_loss:.1e}':>11s} {'' if same else f'{worst:.1e}':>10s} "
                  f"{step_rate:11,.0f} {memory_rate:17,.0f}  {verdict}")
    for line in problems:
        print(f"  MISMATCH {line}", file=sys.stderr)
    print("gpu-check: " + ("every run matches the CPU reference" if not problems else f"{len(problems)} mismatches"))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
