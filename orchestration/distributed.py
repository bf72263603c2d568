"""`ultramem train` on Ray: coordinator, shard actors, model workers, coordinated checkpoints.

The driver's spine (DESIGN §1, §4, §5; STYLE §4 "ultramem train, end to end"):
1. prepare the corpus once (workers then read its cache), connect to Ray (embedded by default);
2. create the value tables empty (metadata only; each shard initialises its own partitions, in
   parallel, DESIGN §5) or take them from the checkpoint to resume; start the job's named
   coordinator and S shard actors (each within its RAM budget: the rest of its partitions goes
   through a chunk cache), install the partition map (epoch 1) on every shard;
3. start M model workers with a RemoteBackend, form their torch.distributed group;
4. train in chunks that end at log / eval / checkpoint boundaries (workers pause there with every
   push queued), with a progress bar;
5. checkpoint: shards drain and write their own partitions into table groups created up front,
   worker 0's dense state is written, the manifest goes last;
6. stop workers and shards; shut Ray down if we started it.

`rescale(to)` changes the shard count while `run()` trains (orchestration/rescale.py); a watcher
thread also takes requests that `ultramem shards scale` posts to the coordinator.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm import tqdm

from model_workers import checkpoint_io
from model_workers.data import prepare_corpus
from model_workers.model import LanguageModel
from model_workers.worker import ModelWorker, WorkerSpec
from orchestration.cluster import Cluster, ClusterConfig, DistributedConfig
from orchestration.config import to_dict
from orchestration.coordinator import NAMESPACE, Coordinator, ShardRecord, coordinator_name
from orchestration.placement import check_capacity, shard_options, worker_options
from orchestration.rescale import Rescaler, RescaleResult
from param_server.actor import ShardActor, ShardActorConfig, tables_dir
from param_server.partition_map import PartitionMap
from param_server.shard import ShardConfig
from storage.checkpoint import step_dir
from storage.table_store import create_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedResult:
    run_dir: Path
    steps: int
    train_loss: float
    val_loss: float
    val_bpb: float
    unigram_entropy: float
    tokens_per_s: float  # all workers together, training time only
    lookups_per_s: float
    staleness_bound: int
    staleness_mean: float  # observed: this worker's newest push minus the shards' applied step, per lookup
    checkpoint: Path | None


def _boundaries(start: int, stop: int, every: list[int]) -> list[int]:
    """Sorted step counts in (start, stop] where some periodic action is due, stop included."""
    marks = {stop}
    for n in every:
        if n > 0:
            marks.update(range((start // n + 1) * n, stop + 1, n))
    return sorted(m for m in marks if start < m <= stop)


class DistributedTrainer:
    """Owns the actors of one training job; `run()` trains, `close()` stops everything it started."""

    def __init__(self, run_cfg: Any, run_dir: str | Path, *, address: str | None = None,
                 resume: str | Path | None = None, progress: bool = True,
                 shard_budget_bytes: int | None = None) -> None:
        """shard_budget_bytes: RAM each shard may give partition data (None: cluster.shard_budget_bytes
        if the config has it, else unbounded); partitions beyond it are served through a chunk cache."""
        self.cfg = run_cfg
        self.dist: DistributedConfig = run_cfg.cluster
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.corpus = prepare_corpus(run_cfg.data)
        self.corpus.tokenizer.save(self.run_dir / "tokenizer.json")
        cpus = self.dist.num_cpus or max(os.cpu_count() or 1, self.dist.shards + self.dist.workers)
        self.cluster = Cluster(ClusterConfig(address=address, num_cpus=cpus if address is None else None,
                                             object_store_mb=self.dist.object_store_mb))
        self.cluster.connect()
        self.coordinator: Any = None
        self.shards: list[Any] = []
        self.workers: list[Any] = []
        self.step = 0
        self.shard_budget_bytes = shard_budget_bytes or self.dist.shard_budget_bytes
        self.job = f"{self.run_dir.name}-{secrets.token_hex(3)}"
        self._shard_by_id: dict[int, Any] = {}
        self._control = threading.RLock()  # a checkpoint never runs during a partition hand-off
        self._chunk_no = 0  # training chunks started; retired shards stop one chunk after a rescale
        self._retiring: list[tuple[int, Any]] = []
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        try:
            self._start(resume)
        except BaseException:
            self.close()
            raise

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    # --- start-up -----------------------------------------------------------------------------
    def _start(self, resume: str | Path | None) -> None:

        specs = LanguageModel(self.cfg.model).memory_tables()
        num_partitions = {s.num_partitions for s in specs}
        if len(num_partitions) != 1:
            raise ValueError(f"memory tables disagree on partition count: {sorted(num_partitions)}")
        (np_,) = num_partitions
        if self.dist.shards > np_:
            raise ValueError(f"{self.dist.shards} shards but only {np_} partitions (model.memory.num_partitions)")
        resources = self.cluster.resources()
        check_capacity(resources, self.dist.shards, self.dist.workers)

        ckpt = checkpoint_io.find_checkpoint(resume) if resume else None
        if ckpt is not None:
            table_paths = {s.name: str(tables_dir(ckpt) / s.name) for s in specs}
            self.step = int(checkpoint_io.read_manifest(ckpt)["step"])
        # the shards' working tables: created empty here (metadata only, never materialised in one
        # process); each shard initialises its own partitions, or copies them from the checkpoint
        self.work_paths = {}
        for spec in specs:
            path = self.run_dir / "tables" / spec.name
            if not (path / "zarr.json").exists():
                create_table(path, spec, initialize=False)
            self.work_paths[spec.name] = str(path)
        if ckpt is None:
            table_paths = dict(self.work_paths)

        name = coordinator_name(self.job)
        self.coordinator = ray.remote(Coordinator).options(name=name, namespace=NAMESPACE,
                                                          num_cpus=0).remote(np_)
        for spec in specs:
            self.coordinator.register_table.remote(spec.to_dict())
        self.coordinator.set_job.remote({"job": self.job, "run_dir": str(self.run_dir)})
        (self.run_dir / "job.json").write_text(json.dumps({"job": self.job, "coordinator": name,
                                                           "namespace": NAMESPACE}) + "\n")
        pmap = PartitionMap.round_robin(["?"] * self.dist.shards, np_)
        self._shard_cls = ray.remote(ShardActor).options(**shard_options(resources,
                                                                         max_restarts=self.dist.max_restarts))
        self._table_paths = table_paths
        self._initialize = ckpt is None
        self.shards = [self._spawn_shard(i, tuple(pmap.partitions_of(i))) for i in range(self.dist.shards)]
        self._shard_by_id = dict(enumerate(self.shards))
        addresses = ray.get([s.address.remote() for s in self.shards])
        records = [ShardRecord(i, a, pmap.partitions_of(i)) for i, a in enumerate(addresses)]
        epoch = ray.get(self.coordinator.set_shards.remote(records))
        self.pmap = PartitionMap(epoch=epoch, addresses=tuple(addresses), owner=pmap.owner)
        ray.get([s.set_partition_map.remote(epoch, addresses, pmap.owner.tolist()) for s in self.shards])
        logger.info("%d shards up at %s (epoch %d)", len(addresses), addresses, epoch)

        worker_cls = ray.remote(ModelWorker).options(**worker_options(resources))
        self.workers = [
            worker_cls.remote(WorkerSpec(rank=r, world_size=self.dist.workers, model=self.cfg.model,
                                         train=self.cfg.train, data=self.cfg.data, addresses=tuple(addresses),
                                         owner=tuple(pmap.owner.tolist()), epoch=epoch,
                                         consistency=self.dist.consistency, staleness=self.dist.staleness))
            for r in range(self.dist.workers)
        ]
        if self.dist.workers > 1:
            host, port = ray.get(self.workers[0].rendezvous_address.remote())
            ray.get([w.join_group.remote(host, port) for w in self.workers])
        if ckpt is not None:
            dense = checkpoint_io.read_dense(ckpt)
            ray.get([w.load_dense_state.remote(dense, self.step) for w in self.workers])
        self._watcher = threading.Thread(target=self._watch_requests, name="rescale-watcher", daemon=True)
        self._watcher.start()

    def _spawn_shard(self, shard_id: int, partitions: tuple[int, ...]) -> Any:
        """Start one ShardActor (its partitions initialised lazily, or loaded from the checkpoint)."""
        return self._shard_cls.remote(ShardActorConfig(
            shard_id=shard_id, table_paths=self._table_paths, partitions=partitions,
            checkpoint_root=str(self.checkpoint_root), work_paths=self.work_paths,
            initialize=self._initialize, coordinator=coordinator_name(self.job), namespace=NAMESPACE,
            shard=ShardConfig(ram_budget_bytes=self.shard_budget_bytes)))

    # --- rescaling (DESIGN §4.1, orchestration/rescale.py) ------------------------------------------
    def rescale(self, to: int) -> RescaleResult:
        """Change the shard count to `to` while training may run in another thread; partitions move
        one at a time. Safe to call from any thread; retired shards stop one training chunk later."""
        rescaler = Rescaler(self.coordinator, self._shard_by_id, self._new_empty_shard, self._control)
        result = rescaler.rescale(to)
        with self._control:
            for sid in result.retired:
                self._retiring.append((self._chunk_no, self._shard_by_id.pop(sid)))
            self.shards = [a for _, a in sorted(self._shard_by_id.items())]
        self._log({"kind": "rescale", "step": self.step, **result.to_dict()})
        return result

    def _new_empty_shard(self, shard_id: int) -> Any:
        return self._spawn_shard(shard_id, ())

    def _retire(self, finished_chunk: int | None) -> None:
        """Stop retired shards whose rescale ended before chunk `finished_chunk` began (None: all):
        every worker has made requests since, so none still routes to them."""
        with self._control:
            done = [a for mark, a in self._retiring if finished_chunk is None or mark < finished_chunk]
            self._retiring = [(m, a) for m, a in self._retiring if finished_chunk is not None and m >= finished_chunk]
        for actor in done:
            try:
                ray.get(actor.stop.remote(), timeout=60)
            except Exception as err:  # it owns nothing; killing it loses nothing
                logger.warning("retired shard did not stop cleanly: %s", err)
            ray.kill(actor, no_restart=True)

    def _watch_requests(self) -> None:
        """Take `ultramem shards scale` requests from the coordinator and run them."""
        while not self._stop_watch.wait(0.5):
            try:
                request = ray.get(self.coordinator.next_rescale_request.remote(), timeout=10)
            except Exception:  # the coordinator is gone: the job is closing
                return
            if request is None:
                continue
            rid, to = request
            try:
                outcome = {"state": "done", **self.rescale(to).to_dict()}
            except Exception as err:
                logger.exception("rescale to %d shards failed", to)
                outcome = {"state": "failed", "error": f"{type(err).__name__}: {err}"}
            try:
                ray.get(self.coordinator.finish_rescale.remote(rid, outcome), timeout=10)
            except Exception:
                return

    # --- the loop -----------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> DistributedResult:
        """Train to `max_steps` (default train.max_steps) with periodic eval and checkpoints."""

        tcfg = self.cfg.train
        stop = min(max_steps or tcfg.max_steps, tcfg.max_steps)
        marks = _boundaries(self.step, stop, [tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every])
        bar = tqdm(total=stop, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        ev: dict[str, float] | None = None
        ckpt: Path | None = None
        last: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        try:
            for until in marks:
                with self._control:
                    self._chunk_no += 1
                    chunk = self._chunk_no
                last = ray.get([w.run.remote(until) for w in self.workers])  # submit all, wait once
                self._retire(chunk)
                bar.update(until - self.step)
                self.step = until
                stats = self._stats(last, time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:,.0f}",
                                lookups_s=f"{stats['lookups_per_s']:,.0f}", stale=f"{stats['staleness_mean']:.2f}(<={stats['staleness_bound']})")
                self._log({"kind": "train", "step": self.step, **stats})
                if (tcfg.eval_every and until % tcfg.eval_every == 0) or until == stop:
                    ev = self.evaluate()
                if (tcfg.checkpoint_every and until % tcfg.checkpoint_every == 0) or until == stop:
                    ckpt = self.save()
        finally:
            bar.close()
        if ev is None:
            ev = self.evaluate()
        stats = self._stats(last, time.perf_counter() - t_start) if last else {
            "loss": float("nan"), "tokens_per_s": 0.0, "lookups_per_s": 0.0, "staleness_bound": self.dist.staleness,
            "staleness_mean": 0.0}
        return DistributedResult(self.run_dir, self.step, stats["loss"], ev["val_loss"], ev["val_bpb"],
                                 self.corpus.unigram_entropy, stats["tokens_per_s"], stats["lookups_per_s"],
                                 stats["staleness_bound"], stats["staleness_mean"], ckpt)

    def _stats(self, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        return {
            "loss": float(np.mean([r["loss"] for r in results])),
            "lr": results[0]["lr"],
            "tokens_per_s": float(sum(r["tokens_per_s"] for r in results)),
            # rows looked up on the shards per second of wall time (all workers, all memory layers)
            "lookups_per_s": float(sum(r["rows_fetched"] for r in results) / max(wall, 1e-9)),
            "staleness_bound": int(results[0]["staleness_bound"]),
            "staleness_mean": float(np.mean([r["staleness_mean"] for r in results])),
        }

    def evaluate(self) -> dict[str, float]:
        """Validation loss / bits per byte, averaged over workers."""
        evs = ray.get([w.evaluate.remote(self.cfg.train.eval_batches) for w in self.workers])
        val = float(np.mean([e["val_loss"] for e in evs]))
        out = {"val_loss": val, "val_bpb": self.corpus.bits_per_byte(val)}
        self._log({"kind": "eval", "step": self.step, **out, "memory": evs[0]["memory"],
                   "unigram_entropy": self.corpus.unigram_entropy})
        logger.info("step %d: val loss %.4f, %.4f bits/byte", self.step, out["val_loss"], out["val_bpb"])
        return out

    def save(self) -> Path:
        """Coordinated checkpoint: workers are paused at a step boundary with pushes queued;
        shards drain and write their partitions; worker 0's dense state; the manifest last."""

        path = step_dir(self.checkpoint_root, self.step)
        specs = self._specs()
        checkpoint_io.begin_checkpoint(path)
        for spec in specs:
            create_table(path / "tables" / spec.name, spec, initialize=False)
        with self._control:  # no partition is in transit while the shards write theirs
            ray.get([s.save.remote(str(path)) for s in list(self._shard_by_id.values())])
        dense = ray.get(self.workers[0].dense_state.remote())
        train_state = {"step": self.step, "rng": {}, "data": {"seed": self.cfg.train.seed, "next_step": self.step}}
        checkpoint_io.finish_checkpoint(path, dense=dense, train_state=train_state,
                                        config=to_dict(self.cfg), tokenizer_json=self.corpus.tokenizer.to_json(),
                                        tables=[s.name for s in specs], kind="ultramem.distributed")
        ray.get(self.coordinator.record_checkpoint.remote(str(path)))
        if self.cfg.train.keep_checkpoints:
            checkpoint_io.prune_checkpoints(self.checkpoint_root, keep=self.cfg.train.keep_checkpoints)
        return path

    def _specs(self) -> list[Any]:

        return LanguageModel(self.cfg.model).memory_tables()

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def shard_metrics(self) -> list[dict[str, float]]:
        return ray.get([s.metrics.remote() for _, s in sorted(self._shard_by_id.items())])

    def placement(self) -> dict[str, list[str]]:
        """Ray node id of every shard and every worker."""
        infos = ray.get([s.info.remote() for _, s in sorted(self._shard_by_id.items())])
        return {"shards": [i["node_id"] for i in infos],
                "workers": ray.get([w.node_id.remote() for w in self.workers])}

    def call_workers(self, method: str, *args: Any) -> list[Any]:
        """Call a ModelWorker method on every rank (tests and tools)."""
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])

    # --- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop workers, then shards, then (if embedded) Ray: nothing is left behind."""
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(15)
        if not ray.is_initialized():
            return
        self._retire(None)
        try:
            if self.workers:
                ray.get([w.close.remote() for w in self.workers], timeout=60)
            self.shards = list(self._shard_by_id.values()) or self.shards
            if self.shards:
                ray.get([s.stop.remote() for s in self.shards], timeout=60)
        except Exception as err:  # still tear the actors down below
            logger.warning("clean shutdown failed: %s", err)
        for actor in [*self.workers, *self.shards, self.coordinator]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.workers, self.shards, self.coordinator = [], [], None
        self._shard_by_id = {}
        if self.cluster.started_here:
            self.cluster.close()


def train_distributed(run_cfg: Any, run_dir: str | Path, *, address: str | None = None,
                      resume: str | Path | None = None, max_steps: int | None = None,
                      progress: bool = True, on_trainer: Callable[[DistributedTrainer], None] | None = None,
                      shard_budget_bytes: int | None = None) -> DistributedResult:
    """Build the job, train, always clean up."""
    trainer = DistributedTrainer(run_cfg, run_dir, address=address, resume=resume, progress=progress,
                                 shard_budget_bytes=shard_budget_bytes)
    try:
        if on_trainer is not None:
            on_trainer(trainer)
        return trainer.run(max_steps)
    finally:
        trainer.close()
