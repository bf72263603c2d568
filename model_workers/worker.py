"""`ModelWorker`: dense compute on a Ray worker, memory values on remote shards (DESIGN §1).

A plain class that `orchestration/placement.py` makes into a Ray actor (GPU when the cluster has
one). M workers form a torch.distributed group (gloo on CPU, NCCL on GPU) and wrap the model in
DDP, each on its own slice of every global batch; the memory layers reach the shards through a
`RemoteBackend`. The step itself is `trainer.train_step`, unchanged: the worker only adds the
process group, the remote backend, and the pause at step boundaries that checkpoints need (the
driver calls `run(until)` and gets control back at `until`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from model_workers.data import DataConfig, get_batch, prepare_corpus
from model_workers.model import LanguageModel, ModelConfig
from model_workers.remote import RemoteBackend
from model_workers.trainer import (
    TrainConfig,
    autocast_dtype,
    evaluate,
    make_optimizer,
    resolve_device,
    train_step,
)
from param_server.client import Client, ClientConfig
from param_server.partition_map import PartitionMap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs to build itself; the same for every rank but `rank`."""

    rank: int
    world_size: int
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    addresses: tuple[str, ...]  # shard gRPC addresses, index = shard id
    owner: tuple[int, ...]  # partition -> shard index
    epoch: int
    consistency: str = "async"  # "sync" | "async"
    staleness: int = 2  # async bound k (DESIGN §4.3)
    token: str | None = field(default=None, repr=False)  # the job's shard token (never printed)
    client: ClientConfig | None = None  # deadlines, retries, failover wait (default ClientConfig())


class ModelWorker:
    """One data-parallel rank: model + DDP + remote values; trains in chunks the driver asks for."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        cfg = spec.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg)
        if self.device.type == "cuda":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.corpus = prepare_corpus(spec.data)  # the driver prepared the cache: this only reads it
        pmap = PartitionMap(epoch=spec.epoch, addresses=spec.addresses, owner=spec.owner)
        client_cfg = dataclasses.replace(spec.client or ClientConfig(), token=spec.token)
        self.client = Client(list(spec.addresses), partition_map=pmap, worker_id=spec.rank, config=client_cfg)
        torch.manual_seed(cfg.seed)  # identical dense init on every rank (and as --local)
        model = LanguageModel(spec.model)
        self.backend = RemoteBackend(self.client, model.memory_tables(), consistency=spec.consistency,
                                     staleness=spec.staleness)
        model.set_backend(self.backend)
        self.model = model.to(self.device)
        self.forward: torch.nn.Module = self.model  # DDP wrapper after join_group (world_size > 1)
        self.optimizer = make_optimizer(self.model, cfg)
        self.step = 0
        self.train_time = 0.0
        self.train_steps = 0

    def node_id(self) -> str:
        """The Ray node this worker runs on (placement checks)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free port on it): rank 0's answer is where the group meets."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join_group(self, master_addr: str, master_port: int) -> None:
        """Form the torch.distributed group (gloo on CPU, NCCL on GPU) and wrap the model in DDP."""
        import torch.distributed as dist

        if self.spec.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if master_addr == "127.0.0.1":  # keep gloo's sockets on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.spec.rank, world_size=self.spec.world_size)
        self.forward = torch.nn.parallel.DistributedDataParallel(self.model)

    # --- driver calls -----------------------------------------------------------------------------
    def run(self, until: int) -> dict[str, Any]:
        """Train steps [self.step, until); return at the boundary with every push queued."""
        spec, cfg = self.spec, self.spec.train
        losses = []
        while self.step < until:
            x, y = get_batch(self.corpus.train, self.step, seed=cfg.seed, batch_size=spec.data.batch_size,
                             seq_len=spec.data.seq_len, rank=spec.rank, world_size=spec.world_size)
            t0 = time.perf_counter()
            res = train_step(self.model, self.optimizer, x.to(self.device), y.to(self.device), step=self.step,
                             cfg=cfg, max_steps=cfg.max_steps, amp_dtype=self.amp_dtype, forward=self.forward)
            self.train_time += time.perf_counter() - t0
            self.train_steps += 1
            self.step += 1
            losses.append(res.loss)
        self.backend.flush()
        tokens = spec.data.batch_size * spec.data.seq_len * self.train_steps
        return {"rank": spec.rank, "step": self.step, "loss": sum(losses) / max(len(losses), 1),
                "lr": res.lr if losses else 0.0, "tokens_per_s": tokens / self.train_time if self.train_time else 0.0,
                "lookups": self.backend.lookups, "rows_fetched": self.backend.rows_fetched,
                "staleness_bound": self.backend.staleness, "staleness_mean": self.backend.mean_staleness(),
                "train_time": self.train_time}

    def evaluate(self, max_batches: int) -> dict[str, float]:
        """Validation loss and bits per byte on this rank's slice (the driver averages)."""
        self.backend.flush()
        ev = evaluate(self.model, self.corpus, self.spec.data, max_batches=max_batches, device=self.device,
                      amp_dtype=self.amp_dtype, rank=self.spec.rank, world_size=self.spec.world_size)
        ev["memory"] = self.model.memory_metrics(reset=True)
        return ev

    def dense_state(self) -> dict[str, Any]:
        """{"model": state dict, "optimizer": AdamW state} on the CPU (rank 0's goes into a checkpoint)."""
        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"model": model, "optimizer": self.optimizer.state_dict()}

    def load_dense_state(self, state: dict[str, Any], step: int) -> None:
        """Restore model + AdamW state (as in a checkpoint's dense.pt) and continue at `step`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = step  # the shards were loaded from the same checkpoint: nothing of ours to wait for

    def flush(self) -> None:
        self.backend.flush()

    def pid(self) -> int:
        """This worker's process id (fault tests kill it)."""
        return os.getpid()

    def set_partition_map(self, epoch: int, addresses: list[str], owner: list[int]) -> bool:
        """Route by a newer map (the driver calls this, concurrently with `run`, when a shard restarted
        at a new address); returns whether it was newer than the client's."""
        return self.client.install_map(PartitionMap(epoch=epoch, addresses=tuple(addresses), owner=owner))

    def close(self) -> None:
        """Flush pushes, close channels, leave the process group."""
        try:
            self.client.close()
        finally:
            if self.spec.world_size > 1:
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
