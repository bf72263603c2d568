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

Faults (docs/reliability.md §6): a shard killed mid-run is restarted by Ray, reloads the last
checkpoint, replays its update log and reports its new address to the coordinator; the watcher
sees the epoch move and installs the new map on every shard and worker, whose clients re-send what
the dead shard did not acknowledge. A shard that dies during a checkpoint makes the driver wait for
it and write the checkpoint again; a checkpoint that cannot be written (a full disk) raises
`CheckpointFailedError` and leaves the previous one the newest. A dead model worker fails the job
with `WorkerFailedError`, or (cluster.on_worker_failure = "restart") every actor is restarted from
the last checkpoint. Every driver `ray.get` has a timeout (cluster.call_timeout_s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
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
from orchestration.cluster import LOOPBACK, Cluster, ClusterConfig, DistributedConfig
from orchestration.config import to_dict
from orchestration.coordinator import NAMESPACE, Coordinator, ShardRecord, coordinator_name
from orchestration.placement import check_capacity, shard_options, worker_options
from orchestration.rescale import Rescaler, RescaleResult
from param_server.actor import ShardActor, ShardActorConfig, tables_dir
from param_server.fanout import ClientConfig
from param_server.partition_map import PartitionMap
from param_server.partitions import work_table_options
from param_server.server import ServerConfig
from param_server.shard import ShardConfig
from storage.checkpoint import step_dir
from storage.errors import CheckpointError
from storage.table_store import create_table

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 300.0  # actors starting (imports, table loads) on a busy machine


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
    shard_addresses: tuple[str, ...] = ()  # where the shards listened at the end (host:port each)


class _WorkerGone(Exception):
    """A model worker died outside a training chunk (evaluation, checkpoint): handled like one inside."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err


class WorkerFailedError(RuntimeError):
    """A model worker died and cluster.on_worker_failure is "fail" (or restarts ran out)."""


class ShardStartError(RuntimeError):
    """A shard actor failed in its constructor (for example: its node cannot see the run directory)."""


def _cause(err: BaseException) -> str:
    """The last `SomeError: message` line of a Ray error (the remote exception), else its first line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    raised = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)]
    return raised[-1] if raised else (lines[0] if lines else type(err).__name__)


class CheckpointFailedError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoint is intact and still the newest."""


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
                 shard_budget_bytes: int | None = None, resume_verified: bool = False) -> None:
        """shard_budget_bytes: RAM each shard may give partition data (None: cluster.shard_budget_bytes
        if the config has it, else unbounded); partitions beyond it are served through a chunk cache.
        resume_verified: `resume` is a step directory that checkpoint_io.find_checkpoint already
        verified (the CLI's), so its files are not hashed again."""
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
        self._routing_epoch = 0  # newest partition-map epoch installed on every shard and worker
        self.shard_restarts = 0  # shard restarts noticed (their new map installed)
        self.worker_restarts = 0  # whole-job restarts after a model worker died
        try:
            self._start(resume, verified=resume_verified)
        except BaseException:
            self.close()
            raise

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    # --- start-up -----------------------------------------------------------------------------
    def _start(self, resume: str | Path | None, *, verified: bool = False) -> None:

        specs = LanguageModel(self.cfg.model).memory_tables()
        num_partitions = {s.num_partitions for s in specs}
        if len(num_partitions) != 1:
            raise ValueError(f"memory tables disagree on partition count: {sorted(num_partitions)}")
        (np_,) = num_partitions
        if self.dist.shards > np_:
            raise ValueError(f"{self.dist.shards} shards but only {np_} partitions (model.memory.num_partitions)")
        resources = self.cluster.resources()
        check_capacity(resources, self.dist.shards, self.dist.workers)

        if resume is None:
            ckpt = None
        elif verified:
            ckpt = Path(resume)
        else:  # verified here (falling back past damaged ones of a run directory, which are set aside)
            ckpt = checkpoint_io.resume_point(resume, self.run_dir)
        if ckpt is not None:
            table_paths = {s.name: str(tables_dir(ckpt) / s.name) for s in specs}
            self.step = int(checkpoint_io.read_manifest(ckpt)["step"])
        # the shards' working tables: created empty here (metadata only, never materialised in one
        # process); each shard initialises its own partitions, or copies them from the checkpoint
        self.work_paths = {}
        for spec in specs:
            path = self.run_dir / "tables" / spec.name
            if not (path / "zarr.json").exists():  # beyond RAM: smaller chunks, all raw (written in place)
                create_table(path, spec, initialize=False, **work_table_options(
                    spec, self.shard_budget_bytes, self.dist.shards, cache_share=ShardConfig.cache_share))
            self.work_paths[spec.name] = str(path)
        if ckpt is None:
            table_paths = dict(self.work_paths)

        self.step = self.step if ckpt is not None else 0
        self._stop_watch.clear()
        # the job's shard token: fresh per job, handed to shards and workers through Ray only (never
        # logged: ServerConfig/ClientConfig leave it out of their repr; never written to the run directory)
        self._token = secrets.token_urlsafe(32)
        name = coordinator_name(self.job)
        self.coordinator = ray.remote(Coordinator).options(name=name, namespace=NAMESPACE,
                                                          num_cpus=0).remote(np_)
        for spec in specs:
            self.coordinator.register_table.remote(spec.to_dict())
        self.coordinator.set_job.remote({"job": self.job, "run_dir": str(self.run_dir)})
        (self.run_dir / "job.json").write_text(json.dumps({"job": self.job, "coordinator": name,
                                                           "namespace": NAMESPACE}) + "\n")
        pmap = PartitionMap.round_robin(["?"] * self.dist.shards, np_)
        self._shard_cls = ray.remote(ShardActor).options(**shard_options(
            resources, max_restarts=self.dist.max_restarts, budgeted=self.shard_budget_bytes is not None))
        self._table_paths = table_paths
        self._initialize = ckpt is None
        self.shards = [self._spawn_shard(i, tuple(pmap.partitions_of(i))) for i in range(self.dist.shards)]
        self._shard_by_id = dict(enumerate(self.shards))
        try:
            addresses = self._get([s.address.remote() for s in self.shards], _START_TIMEOUT_S)
        except ray.exceptions.RayActorError as err:  # its constructor raised: say why in one line
            raise ShardStartError(f"a shard could not start: {_cause(err)}") from None
        records = [ShardRecord(i, a, pmap.partitions_of(i)) for i, a in enumerate(addresses)]
        epoch = self._get(self.coordinator.set_shards.remote(records), _START_TIMEOUT_S)
        self.pmap = PartitionMap(epoch=epoch, addresses=tuple(addresses), owner=pmap.owner)
        self._get([s.set_partition_map.remote(epoch, addresses, pmap.owner.tolist()) for s in self.shards],
                  _START_TIMEOUT_S)
        self._routing_epoch = epoch
        logger.info("%d shards up at %s (epoch %d)", len(addresses), addresses, epoch)

        worker_cls = ray.remote(ModelWorker).options(**worker_options(resources))
        self.workers = [
            worker_cls.remote(WorkerSpec(rank=r, world_size=self.dist.workers, model=self.cfg.model,
                                         train=self.cfg.train, data=self.cfg.data, addresses=tuple(addresses),
                                         owner=tuple(pmap.owner.tolist()), epoch=epoch,
                                         consistency=self.dist.consistency, staleness=self.dist.staleness,
                                         token=self._token, client=self._client_config()))
            for r in range(self.dist.workers)
        ]
        if self.dist.workers > 1:
            host, port = self._get(self.workers[0].rendezvous_address.remote(), _START_TIMEOUT_S)
            self._get([w.join_group.remote(host, port) for w in self.workers], _START_TIMEOUT_S)
        if ckpt is not None:
            dense = checkpoint_io.read_dense(ckpt)
            self._get([w.load_dense_state.remote(dense, self.step) for w in self.workers], _START_TIMEOUT_S)
        self._watcher = threading.Thread(target=self._watch_requests, name="rescale-watcher", daemon=True)
        self._watcher.start()

    def _spawn_shard(self, shard_id: int, partitions: tuple[int, ...]) -> Any:
        """Start one ShardActor (its partitions initialised lazily, or loaded from the checkpoint)."""
        return self._shard_cls.remote(ShardActorConfig(
            shard_id=shard_id, table_paths=self._table_paths, partitions=partitions,
            checkpoint_root=str(self.checkpoint_root), work_paths=self.work_paths,
            initialize=self._initialize, coordinator=coordinator_name(self.job), namespace=NAMESPACE,
            shard=ShardConfig(ram_budget_bytes=self.shard_budget_bytes),
            update_log_dir=str(self.run_dir / "update-log"), server=self._server_config(), bind=self._bind()))

    def _bind(self) -> str:
        """Where shards listen (cluster.shard_host): loopback on the Ray we started, else resolved on each
        node (its address as Ray knows it, a named interface's, or the IP given)."""
        if self.dist.shard_host == "auto":
            return LOOPBACK if self.cluster.started_here else "node"
        return self.dist.shard_host

    def _server_config(self) -> ServerConfig:
        """The shards' gRPC server: the job's token, TLS and mTLS from the cluster config."""
        d = self.dist
        return ServerConfig(token=self._token, tls_cert=d.tls_cert, tls_key=d.tls_key,
                            tls_client_ca=d.tls_ca if d.tls_client_cert else None)

    def client_config(self) -> ClientConfig:
        """How to call this job's shards (the job's token, TLS): for its workers, tools and tests."""
        return self._client_config()

    def _client_config(self) -> ClientConfig:
        """Workers' client: each call attempt bounded by call_timeout_s (at most 60 s), and a dead shard
        waited for as long as the driver waits for anything; the job's token and TLS."""
        d = self.dist
        return ClientConfig(timeout_s=min(60.0, d.call_timeout_s), failover_timeout_s=d.call_timeout_s,
                            token=self._token, tls_ca=d.tls_ca, tls_cert=d.tls_client_cert,
                            tls_key=d.tls_client_key, tls_server_name=d.tls_server_name)

    def _get(self, refs: Any, timeout: float | None = None) -> Any:
        """ray.get with the job's deadline (GetTimeoutError past it): the driver never waits forever."""
        return ray.get(refs, timeout=timeout or self.dist.call_timeout_s)

    # --- faults (docs/reliability.md §6) ---------------------------------------------------------
    def _install_routing(self) -> bool:
        """If the coordinator's map is newer than the one installed (a shard restarted at a new address),
        install it on every shard and worker; returns whether it did."""
        with self._control:
            epoch, addresses, owner = self._get(self.coordinator.routing.remote(), 30)
            if epoch <= self._routing_epoch:
                return False
            calls = [s.set_partition_map.remote(epoch, addresses, owner) for s in self._shard_by_id.values()]
            calls += [w.set_partition_map.remote(epoch, addresses, owner) for w in self.workers]
            self._get(calls, 30)
            self._routing_epoch = epoch
        for event in self._get(self.coordinator.take_restarts.remote(), 30):
            self.shard_restarts += 1
            logger.warning("shard %d was restarted at %s; partition map epoch %d installed everywhere",
                           event["shard_id"], event["address"], epoch)
            self._log({"kind": "shard_restart", "step": self.step, **event})
        return True

    def _await_shards(self, timeout: float = 120.0) -> None:
        """Wait until every shard answers (Ray restarted the dead ones) and its map is installed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._get([s.address.remote() for s in self._shard_by_id.values()], 10)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                if time.monotonic() > deadline:
                    raise CheckpointFailedError(f"shards did not come back within {timeout:.0f} s: {err}") from None
                time.sleep(0.5)
        while not self._install_routing() and self._routing_epoch < self._get(
                self.coordinator.routing.remote(), 30)[0]:
            time.sleep(0.2)

    def _teardown(self) -> None:
        """Kill every actor of the job (workers, shards, coordinator) and stop the watcher."""
        self._stop_watch.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(15)
        for actor in [*self.workers, *self._shard_by_id.values(), *self.shards, self.coordinator]:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self.workers, self.shards, self.coordinator = [], [], None
        self._shard_by_id = {}
        self._retiring = []

    def _worker_failed(self, err: BaseException, until: int) -> None:
        """A model worker died during steps (self.step, until]: fail clearly, or restart the job from the
        last checkpoint (cluster.on_worker_failure)."""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        what = f"a model worker died while training steps {self.step + 1}..{until} ({first})"
        if self.dist.on_worker_failure == "fail":
            raise WorkerFailedError(f"{what} (set cluster.on_worker_failure = \"restart\" to resume from the "
                                    "last checkpoint instead)") from None
        if self.worker_restarts >= self.dist.max_restarts:
            raise WorkerFailedError(f"{what}; {self.worker_restarts} restarts already (cluster.max_restarts)") from None
        ckpt = None
        if checkpoint_io.latest(self.checkpoint_root) is not None:
            try:  # the newest checkpoint that verifies (a damaged newer one is named in a warning, set aside)
                ckpt = checkpoint_io.resume_point(self.checkpoint_root, self.run_dir)
            except CheckpointError as err:
                raise WorkerFailedError(f"{what}; no valid checkpoint to restart from: {err}") from None
        logger.warning("%s; restarting every actor from %s", what, ckpt or "the initial state")
        self._teardown()
        self.worker_restarts += 1
        self.job = f"{self.run_dir.name}-{secrets.token_hex(3)}"
        self._start(ckpt, verified=True)
        self._log({"kind": "worker_restart", "step": self.step, "from": str(ckpt) if ckpt else None})

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
        """Install the new map when a shard restarted; take `ultramem shards scale` requests and run them."""
        while not self._stop_watch.wait(0.25):
            try:
                self._install_routing()
                request = ray.get(self.coordinator.next_rescale_request.remote(), timeout=10)
            except Exception as err:  # a shard still restarting, or the job is closing
                if self._stop_watch.is_set():
                    return
                logger.debug("watcher: %s", err)
                continue
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
        every = [tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every]
        bar = tqdm(total=stop, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True)
        ev: dict[str, float] | None = None
        ckpt: Path | None = None
        last: list[dict[str, Any]] = []
        t_start = time.perf_counter()
        try:
            while self.step < stop:
                until = _boundaries(self.step, stop, every)[0]
                with self._control:
                    self._chunk_no += 1
                    chunk = self._chunk_no
                try:  # submit all, wait once; a training chunk gets call_timeout_s per step
                    last = self._get([w.run.remote(until) for w in self.workers],
                                     self.dist.call_timeout_s * (until - self.step + 8))
                except ray.exceptions.RayActorError as err:  # a worker process died
                    self._worker_failed(err, until)
                    bar.reset(total=stop)
                    bar.update(self.step)
                    continue
                self._retire(chunk)
                bar.update(until - self.step)
                self.step = until
                stats = self._stats(last, time.perf_counter() - t_start)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:,.0f}",
                                lookups_s=f"{stats['lookups_per_s']:,.0f}",
                                stale=f"{stats['staleness_mean']:.2f}(<={stats['staleness_bound']})")
                self._log({"kind": "train", "step": self.step, **stats})
                try:
                    if (tcfg.eval_every and until % tcfg.eval_every == 0) or until == stop:
                        ev = self.evaluate()
                    if (tcfg.checkpoint_every and until % tcfg.checkpoint_every == 0) or until == stop:
                        ckpt = self.save()
                except _WorkerGone as gone:  # a worker died during evaluation or its checkpoint part
                    self._worker_failed(gone.err, until)
                    bar.reset(total=stop)
                    bar.update(self.step)
        finally:
            bar.close()
        if ev is None:
            ev = self.evaluate()
        stats = self._stats(last, time.perf_counter() - t_start) if last else {
            "loss": float("nan"), "tokens_per_s": 0.0, "lookups_per_s": 0.0, "staleness_bound": self.dist.staleness,
            "staleness_mean": 0.0}
        return DistributedResult(self.run_dir, self.step, stats["loss"], ev["val_loss"], ev["val_bpb"],
                                 self.corpus.unigram_entropy, stats["tokens_per_s"], stats["lookups_per_s"],
                                 stats["staleness_bound"], stats["staleness_mean"], ckpt,
                                 tuple(self.pmap_addresses()))

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
        try:
            evs = self._get([w.evaluate.remote(self.cfg.train.eval_batches) for w in self.workers])
        except ray.exceptions.RayActorError as err:
            raise _WorkerGone(err) from err
        val = float(np.mean([e["val_loss"] for e in evs]))
        out = {"val_loss": val, "val_bpb": self.corpus.bits_per_byte(val)}
        self._log({"kind": "eval", "step": self.step, **out, "memory": evs[0]["memory"],
                   "unigram_entropy": self.corpus.unigram_entropy})
        logger.info("step %d: val loss %.4f, %.4f bits/byte", self.step, out["val_loss"], out["val_bpb"])
        return out

    def save(self) -> Path:
        """Coordinated checkpoint: workers are paused at a step boundary with pushes queued;
        shards drain and write their partitions; worker 0's dense state; the manifest last.

        A shard that dies meanwhile is waited for (Ray restarts it with the state it had: the last
        checkpoint plus its update log) and the checkpoint is written again, once. Any other failure
        (a full disk) removes the unfinished directory and raises CheckpointFailedError; the
        previous checkpoint stays the newest.
        """
        path = step_dir(self.checkpoint_root, self.step)
        for attempt in (1, 2):
            try:
                return self._save_once(path)
            except _WorkerGone:
                shutil.rmtree(path, ignore_errors=True)  # never half-written: no manifest, now no dir
                raise
            except ray.exceptions.RayActorError as err:
                if attempt == 2:
                    self._abandon(path, err)
                logger.warning("a shard died while writing %s (%s); writing it again once it is back", path, err)
                self._await_shards()
            except (OSError, ray.exceptions.RayError, CheckpointError) as err:
                self._abandon(path, err)
        raise AssertionError("unreachable")

    def _abandon(self, path: Path, err: BaseException) -> None:
        """Remove an unfinished checkpoint directory and raise CheckpointFailedError naming the cause."""
        shutil.rmtree(path, ignore_errors=True)
        prev = checkpoint_io.latest(self.checkpoint_root)
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise CheckpointFailedError(f"checkpoint {path} failed ({type(err).__name__}: {cause}); the newest "
                                    f"complete checkpoint is still {prev}") from err

    def _save_once(self, path: Path) -> Path:
        specs = self._specs()
        checkpoint_io.begin_checkpoint(path)
        for spec in specs:
            create_table(path / "tables" / spec.name, spec, initialize=False)
        with self._control:  # no partition is in transit while the shards write theirs
            saved = self._get([s.save.remote(str(path)) for s in list(self._shard_by_id.values())])
        known = {rel: digest for result in saved for rel, digest in result["files"].items()}  # hashed by the shards
        try:
            dense = self._get(self.workers[0].dense_state.remote())
        except ray.exceptions.RayActorError as err:
            raise _WorkerGone(err) from err
        train_state = {"step": self.step, "rng": {}, "data": {"seed": self.cfg.train.seed, "next_step": self.step}}
        checkpoint_io.finish_checkpoint(path, dense=dense, train_state=train_state,
                                        config=to_dict(self.cfg), tokenizer_json=self.corpus.tokenizer.to_json(),
                                        tables=[s.name for s in specs], kind="ultramem.distributed", known=known)
        self._get(self.coordinator.record_checkpoint.remote(str(path)))
        if self.cfg.train.keep_checkpoints:
            checkpoint_io.prune_checkpoints(self.checkpoint_root, keep=self.cfg.train.keep_checkpoints)
        return path

    def _specs(self) -> list[Any]:

        return LanguageModel(self.cfg.model).memory_tables()

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def pmap_addresses(self) -> list[str]:
        """The shard addresses of the newest partition map (after restarts and rescales)."""
        return list(self._get(self.coordinator.routing.remote(), 30)[1])

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
        self.shards = list(self._shard_by_id.values()) or self.shards
        refs = [w.close.remote() for w in self.workers]
        _settle(refs, "model worker")
        _settle([s.stop.remote() for s in self.shards], "shard")
        self._teardown()
        if self.cluster.started_here:
            self.cluster.close()


def _settle(refs: list[Any], what: str) -> None:
    """Wait (once, 60 s) for clean-shutdown calls; an actor that already died is expected after a
    failure (logged at info), anything else is a warning. The caller kills every actor afterwards."""
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=60)
    for ref in refs:
        if ref not in ready:
            logger.warning("a %s did not stop within 60 s; killing it", what)
            continue
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayActorError:
            logger.info("a %s had already died; nothing to stop cleanly", what)
        except Exception as err:
            logger.warning("a %s did not stop cleanly: %s", what, err)


def train_distributed(run_cfg: Any, run_dir: str | Path, *, address: str | None = None,
                      resume: str | Path | None = None, max_steps: int | None = None,
                      progress: bool = True, on_trainer: Callable[[DistributedTrainer], None] | None = None,
                      shard_budget_bytes: int | None = None, resume_verified: bool = False) -> DistributedResult:
    """Build the job, train, always clean up."""
    trainer = DistributedTrainer(run_cfg, run_dir, address=address, resume=resume, progress=progress,
                                 shard_budget_bytes=shard_budget_bytes, resume_verified=resume_verified)
    try:
        if on_trainer is not None:
            on_trainer(trainer)
        return trainer.run(max_steps)
    finally:
        trainer.close()
