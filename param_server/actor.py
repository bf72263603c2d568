"""`ShardActor`: a Ray actor that owns one `Shard` and its gRPC server (DESIGN §1, STYLE §15).

The class is plain Python; `orchestration/placement.py` makes it remote with `.options(...)`
(resources, `max_restarts`). Control goes through Ray (address, partition map, save, drain,
metrics, partition hand-offs); data goes through gRPC. A fresh actor loads its partitions from
`table_paths` (the checkpoint the driver chose and verified, or the initial tables); an actor that
Ray restarts after a crash loads them from the newest complete checkpoint under `checkpoint_root`
(the base of its update log), after checking its own partitions' files against that checkpoint's
manifest (sizes and sha256, docs/reliability.md §7): a damaged checkpoint fails the restart with a
CheckpointError naming the file instead of serving wrong values. A fresh job's
tables are created empty (metadata only): each shard initialises its own partitions (DESIGN §5,
seeded per partition), in RAM when they fit `ShardConfig.ram_budget_bytes`, else in the shared
work table that its chunk cache writes back into. After a rescale the coordinator knows the
shard's partitions, so a restarted shard asks it rather than trusting its launch arguments.

Hand-off of a partition (DESIGN §4.1, driven by `orchestration/rescale.py`): `freeze` pauses
pushes to it, `handoff_export` drains and copies it, the new owner `adopt`s it, the coordinator's
new map is installed everywhere, then `release` drops it here, waits for every push RPC that began
under the old map and returns the applied-step clocks the new owner merges (`merge_clocks`).

Crash recovery (DESIGN §4.3, docs/reliability.md §6): with `update_log_dir` set, every push the
shard admits is appended to its update log (`param_server/update_log.py`) before it is
acknowledged. A fresh launch starts an empty log; an actor that Ray restarts after a crash reloads
the newest checkpoint, replays the log segments written since it, then reports its new address to
the coordinator (which bumps the map epoch; the driver installs the new map on every shard and
worker). Each checkpoint cuts the log: pushes wait while the shard drains, starts segment
`base-<step>` and writes its partitions and its progress at the cut (`step-N/shards/shard-<id>.json`:
applied-step clocks and last seq per worker). A restarted shard resumes that progress before the
replay, so a kill right after a checkpoint (empty log) neither makes lookups wait for pushes the
checkpoint already holds nor lets a re-sent push in twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from param_server.bind import resolve_bind
from param_server.errors import PathNotFoundError
from param_server.partition_map import PartitionMap
from param_server.partitions import Arrays
from param_server.server import ServerConfig, ShardServer, create_server
from param_server.shard import Shard, ShardConfig
from param_server.update_log import INIT, UpdateLog
from storage.checkpoint import TABLES, atomic_write_json, digest_files, latest_checkpoint, step_of, verify_checkpoint
from storage.layout import partition_file_filter
from storage.table_store import open_table

logger = logging.getLogger(__name__)

_PUSH_METHODS = ("/ultramem.v1.MemoryShard/PushGradients", "/ultramem.v1.MemoryShard/PooledBackward")


@dataclass(frozen=True)
class ShardActorConfig:
    """Everything a shard actor needs to (re)build itself; passed again by Ray on a restart."""

    shard_id: int
    table_paths: dict[str, str]  # table name -> initial table group (used when no checkpoint exists)
    partitions: tuple[int, ...]  # partitions owned, the same for every table
    checkpoint_root: str | None = None  # <run>/checkpoints: the newest valid step is loaded on start
    shard: ShardConfig = field(default_factory=ShardConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    work_paths: dict[str, str] = field(default_factory=dict)  # writable groups for cached partitions
    initialize: bool = False  # the initial tables are empty: generate this shard's partitions
    coordinator: str | None = None  # named coordinator actor that knows the partitions after a rescale
    namespace: str = "ultramem"
    update_log_dir: str | None = None  # <run>/update-log: this shard logs to shard-<id>/ there (None: no log)
    log_fsync: bool = False  # fsync each log append (machine crashes too; a process crash needs only a flush)
    bind: str | None = None  # None: listen on server.host; "node" (the node's address as Ray knows it), an
    # interface name or an IP address, resolved on the node the actor lands on (param_server/bind.py)


def progress_path(step_dir: Path | str, shard_id: int) -> Path:
    """`step-N/shards/shard-<id>.json`: the shard's applied-step clocks and last seqs at the cut (a
    restarted shard resumes them; the manifest, written after every shard saved, covers the file)."""
    return Path(step_dir) / "shards" / f"shard-{shard_id}.json"


def tables_dir(step_dir: Path | str) -> Path:
    """Where a checkpoint keeps its table groups (DESIGN §5)."""
    return Path(step_dir) / "tables"


class PushGate(grpc.ServerInterceptor):
    """Counts push RPCs in flight by generation, so a hand-off can wait for those begun before a cut."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0
        self._in_flight: dict[int, int] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method not in _PUSH_METHODS or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def counted(request: Any, context: grpc.ServicerContext) -> Any:
            with self._cond:
                gen = self._generation
                self._in_flight[gen] = self._in_flight.get(gen, 0) + 1
            try:
                return inner(request, context)
            finally:
                with self._cond:
                    self._in_flight[gen] -= 1
                    self._cond.notify_all()

        return grpc.unary_unary_rpc_method_handler(counted, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def wait_for_earlier(self, timeout: float = 60.0) -> None:
        """Start a new generation and wait until every push RPC of the earlier ones has returned."""
        with self._cond:
            cut = self._generation = self._generation + 1
            if not self._cond.wait_for(lambda: not any(n for g, n in self._in_flight.items() if g < cut), timeout):
                raise TimeoutError(f"push RPCs still running {timeout} s after a partition hand-off")


class ShardActor:
    """One parameter-server shard inside a Ray actor; serves gRPC from the moment it is built."""

    def __init__(self, config: ShardActorConfig) -> None:
        self.config = config
        self._check_storage_visible()
        torch.set_num_threads(1)  # one intra-op thread per kernel call, as `ultramem shard serve` (cmd_shard)
        self.partitions = self._current_partitions()
        self.shard = Shard(config.shard, shard_id=config.shard_id)
        self.restarted = _reconstructed()
        self.loaded_from = self._load()
        self.replayed = 0  # logged pushes applied again after a restart
        self.log: UpdateLog | None = self._open_log()
        self.gate = PushGate()
        self.server: ShardServer
        self.server, _ = create_server(self.shard, self._server_config(), interceptors=[self.gate])
        self.server.start()
        logger.info("shard actor %d (pid %d) serving %s from %s%s", config.shard_id, os.getpid(),
                    self.server.address, self.loaded_from,
                    f", {self.replayed} logged pushes replayed" if self.restarted else "")
        if self.restarted:
            self._report_restart()

    def _server_config(self) -> ServerConfig:
        """config.server with the bind address resolved on this node (config.bind)."""
        if self.config.bind is None:
            return self.config.server
        import ray

        host, advertise = resolve_bind(self.config.bind, ray.util.get_node_ip_address())
        return dataclasses.replace(self.config.server, host=host, advertise_host=advertise)

    def _check_storage_visible(self) -> None:
        """Fail at start, naming the path and the node, when this node cannot see the run directory
        (a real cluster needs it on a filesystem every node mounts at the same path)."""
        paths = [*self.config.table_paths.values(), *self.config.work_paths.values()]
        paths += [str(Path(p).parent) for p in (self.config.checkpoint_root, self.config.update_log_dir) if p]
        missing = next((p for p in paths if not Path(p).exists()), None)
        if missing is None:
            return
        try:
            import ray

            node = ray.util.get_node_ip_address()
        except Exception:  # outside Ray
            node = "this node"
        raise PathNotFoundError(
            f"shard {self.config.shard_id} on node {node} ({socket.gethostname()}) cannot see {missing}: on a "
            "cluster the run directory (tables, checkpoints, update log) must be on a filesystem that every "
            "node mounts at the same path")

    def _open_log(self) -> UpdateLog | None:
        """Open this shard's update log: after a Ray restart replay it on top of the loaded checkpoint;
        on a fresh launch start it empty (an old log belongs to a job that no longer exists)."""
        if self.config.update_log_dir is None or self.config.shard.read_only:
            return None
        log = UpdateLog(Path(self.config.update_log_dir) / f"shard-{self.config.shard_id}",
                        fsync=self.config.log_fsync)
        base = self._loaded_step
        if self.restarted:
            self.replayed = self.shard.replay(log.replay_records(base))
        else:
            log.prune(2**62)
        log.open(base)
        self.shard.attach_log(log)
        return log

    def _report_restart(self) -> None:
        """Tell the coordinator our new address (it bumps the epoch) and take the new map ourselves;
        the driver installs it on the other shards and the workers."""
        if self.config.coordinator is None:
            return
        import ray

        try:
            coordinator = ray.get_actor(self.config.coordinator, namespace=self.config.namespace)
            ray.get(coordinator.update_address.remote(self.config.shard_id, self.server.address), timeout=30)
            epoch, addresses, owner = ray.get(coordinator.routing.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError) as err:
            logger.warning("shard %d restarted but could not report to %s: %s", self.config.shard_id,
                           self.config.coordinator, err)
            return
        self.set_partition_map(epoch, addresses, owner)

    def _current_partitions(self) -> tuple[int, ...]:
        """The launch partitions, or what the coordinator says this shard owns now (after a rescale)."""
        if self.config.coordinator is None:
            return self.config.partitions
        import ray

        try:
            coordinator = ray.get_actor(self.config.coordinator, namespace=self.config.namespace)
            owned = ray.get(coordinator.partitions_of.remote(self.config.shard_id), timeout=30)
        except (ValueError, ray.exceptions.RayError) as err:
            logger.warning("coordinator %s not reachable (%s); using launch partitions", self.config.coordinator, err)
            return self.config.partitions
        return tuple(owned) if owned is not None else self.config.partitions

    def _load(self) -> str:
        step_dir = self._restart_checkpoint()
        if step_dir is None and not self.config.initialize:  # a fresh launch from the checkpoint the driver chose
            step_dir = _checkpoint_of(self.config.table_paths)
        self._loaded_step = step_of(step_dir) if step_dir is not None else INIT
        for name, initial in self.config.table_paths.items():
            source = tables_dir(step_dir) / name if step_dir is not None else Path(initial)
            work = self.config.work_paths.get(name)
            work_store = open_table(work, "r+") if work is not None and not self.config.shard.read_only else None
            store = open_table(source, "r")
            if work_store is not None and Path(work).resolve() == source.resolve():
                store = work_store
            self.shard.load_table(store, self.partitions, work_store=work_store,
                                  initialize=self.config.initialize and step_dir is None)
        if step_dir is not None:
            progress = progress_path(step_dir, self.config.shard_id)
            if self.restarted and progress.exists():  # a fresh launch starts new clients: seq 1 again
                self.shard.restore_progress(json.loads(progress.read_text()))
            return str(step_dir)
        return "initialised partitions" if self.config.initialize else "initial tables"

    def _restart_checkpoint(self) -> Path | None:
        """After a crash: the newest complete checkpoint under checkpoint_root (its update log's base),
        with this shard's partitions verified against the manifest; None on a fresh launch."""
        if not self.restarted or not self.config.checkpoint_root:
            return None
        step_dir = latest_checkpoint(self.config.checkpoint_root)
        if step_dir is None:
            return None
        mine = partition_file_filter(self.partitions)
        names = set(self.config.table_paths)

        def owned(rel: str) -> bool:  # tables/<name>/<array>/c/<p>/...: this shard's partitions and metadata
            parts = rel.split("/", 2)
            return len(parts) == 3 and parts[0] == TABLES and parts[1] in names and mine(parts[2])

        progress = progress_path(step_dir, self.config.shard_id).relative_to(step_dir).as_posix()
        verify_checkpoint(step_dir, only=lambda rel: rel == progress or owned(rel))
        return step_dir

    # --- control plane (Ray calls) ----------------------------------------------------------------
    def address(self) -> str:
        """host:port of this shard's gRPC server."""
        return self.server.address

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        import ray

        names = self.shard.table_names()
        return {"shard_id": self.config.shard_id, "address": self.server.address, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "loaded_from": self.loaded_from, "restarted": self.restarted, "replayed": self.replayed,
                "partitions": self.shard.owned_partitions(names[0]) if names else [],
                "tables": names}

    def set_partition_map(self, epoch: int, addresses: Sequence[str], owner: Sequence[int]) -> None:
        """Install the cluster's map so requests routed with an older epoch are refused."""
        self.server.set_partition_map(
            PartitionMap(epoch=epoch, addresses=tuple(addresses), owner=np.asarray(owner, dtype=np.int32)))

    def drain(self) -> None:
        """Wait until every accepted push is applied."""
        self.shard.drain()

    def save(self, step_dir: str) -> dict[str, Any]:
        """Drain, then write the owned partitions into `step_dir/tables/<name>`.

        Returns {"partitions": owned ids, "files": {path relative to step_dir: {"bytes", "sha256"}}}:
        the digests of the chunk files just written (hashed here, while they are in the page cache and
        in parallel with the other shards, so the manifest never re-reads the table). The update log
        is cut at the drained state: later pushes go to segment `base-<step>`, and segments older
        than the newest complete checkpoint are deleted.
        """
        log = self.log
        cut = (lambda: log.rotate(step_of(step_dir))) if log is not None else None
        progress = self.shard.save(tables_dir(step_dir), cut=cut)
        atomic_write_json(progress_path(step_dir, self.config.shard_id), progress)
        if log is not None and self.config.checkpoint_root is not None:
            valid = latest_checkpoint(self.config.checkpoint_root)
            if valid is not None:
                log.prune(step_of(valid))
        names = self.shard.table_names()
        owned = self.shard.owned_partitions(names[0]) if names else []
        return {"partitions": owned, "files": _digest_partitions(Path(step_dir), names, owned)}

    def metrics(self) -> dict[str, float]:
        return self.shard.metrics()

    # --- partition hand-off (rescaling) -------------------------------------------------------------
    def freeze(self, partitions: Sequence[int]) -> None:
        """Pause pushes touching `partitions` (lookups go on: the data does not change)."""
        self.shard.freeze(partitions)

    def unfreeze(self, partitions: Sequence[int]) -> None:
        """Abort a hand-off: paused pushes proceed here."""
        self.shard.unfreeze(partitions)

    def handoff_export(self, partitions: Sequence[int]) -> dict[str, Any]:
        """Drained state of frozen partitions: {"tables": {table: {p: arrays}}, "stores": {table: path}}
        (stores: where cached partitions are durable now, so a new owner on the same store skips a copy)."""
        tables = self.shard.handoff_export(partitions)
        stores = {name: self.shard.work_store_path(name) for name in tables}
        return {"tables": tables, "stores": {k: v for k, v in stores.items() if v is not None}}

    def adopt(self, exported: dict[str, Any]) -> None:
        """Hold partitions another shard handed off (not routed here before the new map)."""
        tables: dict[str, dict[int, Arrays | None]] = {}
        for name, parts in exported["tables"].items():
            src, mine = exported["stores"].get(name), self.config.work_paths.get(name)
            budget = self.config.shard.ram_budget_bytes
            same_store = src is not None and mine is not None and Path(src).resolve() == Path(mine).resolve()
            # the previous owner flushed them into the same store: a cached owner reads them there
            tables[name] = {int(p): (None if same_store and budget is not None else a) for p, a in parts.items()}
        self.shard.adopt(tables)

    def release(self, partitions: Sequence[int]) -> list[tuple[int, str, int]]:
        """Drop handed-off partitions, wait for push RPCs begun under the old map, drain; returns clocks."""
        self.shard.release(partitions)
        self.gate.wait_for_earlier()
        self.shard.drain()
        return self.shard.clocks()

    def merge_clocks(self, clocks: Sequence[tuple[int, str, int]]) -> None:
        """Start unseen applied-step clocks at the previous owner's value."""
        self.shard.merge_clocks(clocks)

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving and stop the apply loop after draining it (cached chunks written back)."""
        self.server.stop(grace)
        self.shard.close()
        if self.log is not None:
            self.log.close()


def _checkpoint_of(table_paths: dict[str, str]) -> Path | None:
    """The step directory the tables live in (step-N/tables/<name>), or None for tables elsewhere."""
    first = next(iter(table_paths.values()), None)
    parent = Path(first).parent if first is not None else None
    if parent is not None and parent.name == TABLES and parent.parent.name.startswith("step-"):
        return parent.parent
    return None


def _digest_partitions(step_dir: Path, names: Sequence[str], partitions: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Digests of the chunk files of `partitions` under step_dir/tables/<name> (metadata excluded:
    the driver wrote it), keyed by path relative to step_dir."""
    mine = partition_file_filter(partitions)
    rels = []
    for name in names:
        root = tables_dir(step_dir) / name
        for dirpath, _, filenames in os.walk(root):
            for f in filenames:
                rel = (Path(dirpath) / f).relative_to(root).as_posix()
                if f != "zarr.json" and not f.startswith(".") and mine(rel):
                    rels.append(f"{TABLES}/{name}/{rel}")
    return digest_files(step_dir, rels)


def _reconstructed() -> bool:
    """True inside a Ray actor that Ray has restarted after a crash."""
    try:
        import ray

        return ray.is_initialized() and bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not in an actor (tests build the class directly)
        return False
