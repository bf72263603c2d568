"""`RemoteBackend`: the value tables on parameter-server shards, reached over gRPC (DESIGN §4.3).

It plugs into the same `ValueBackend` interface as `LocalBackend`, so the model code does not
change. Consistency is enforced by the shards through `min_step`:

- `sync` (staleness 0): every push waits until the shards have queued it, and the lookups of the
  next step ask for all of this worker's pushes up to the previous step to be applied first. One
  worker in sync mode computes exactly what local training computes.
- `async` with staleness bound k: pushes return at once (communication overlaps the next step's
  compute), and a lookup at step t only waits for this worker's pushes up to step t - 1 - k.

Both lookup modes: rows mode (`fetch_rows` = Gather, `push_grads` = PushGradients) and pooled mode
(`pooled` = PooledGather, `pooled_backward` = PooledBackward, DESIGN §4.2). A pooled backward is a
round trip in both consistency modes (the worker needs dL/ds), but the shards queue its row update
like a push, numbered and stepped, so `min_step` works the same.

The backend works on the host: a memory layer hands it host tensors (read from the device in one
copy per layer and direction, model_workers/transfer.py) and copies the answers back to the device
itself, so nothing here syncs a GPU. `*_async` lookups run on this backend's lookup threads.

A rows-mode answer of 32 MiB or more (65,536 rows of d_v = 384 is 100 MB) lands in a kept buffer
(`param_server.scratch.ScratchPool`) once the previous answer in it is no longer referenced: glibc
maps every allocation that large afresh, and faulting in and zeroing its pages cost a 100 MB lookup
15-17% more client CPU (80-88 against 68-73 ms, side by side).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import torch

from model_workers.values import ValueBackend
from param_server.allocator import REUSE
from param_server.client import Client
from param_server.scratch import ScratchPool
from storage.layout import TableSpec

logger = logging.getLogger(__name__)

Consistency = Literal["sync", "async"]
# answers at least this large are received into kept buffers: below it malloc reuses freed blocks
ANSWER_POOL_MIN_BYTES = int(REUSE["MALLOC_MMAP_THRESHOLD_"])


def _ids(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.int64).numpy()


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


class RemoteBackend(ValueBackend):
    """Value tables behind a `param_server.Client`: rows mode (Gather + numbered pushes) and pooled
    mode (PooledGather + PooledBackward)."""

    def __init__(self, client: Client, specs: Iterable[TableSpec], *, consistency: Consistency = "async",
                 staleness: int = 2, wire_dtype: str = "float32", answer_pool: ScratchPool | None = None) -> None:
        """answer_pool: where rows-mode answers are received (default: up to 1 GiB of kept buffers,
        for answers of ANSWER_POOL_MIN_BYTES or more)."""
        if consistency not in ("sync", "async"):
            raise ValueError(f"consistency must be 'sync' or 'async', got {consistency!r}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.client = client
        self._specs = {spec.name: spec for spec in specs}
        self.consistency: Consistency = consistency
        self.staleness = 0 if consistency == "sync" else staleness
        self.wire_dtype = wire_dtype
        self.answers = answer_pool if answer_pool is not None else ScratchPool(1 << 30, ANSWER_POOL_MIN_BYTES)
        self.last_pushed_step = -1  # newest step whose pushes were sent
        self.lookups = 0
        self.rows_fetched = 0
        self.staleness_sum = 0  # sum over lookups of the observed staleness (see _observe)
        self._stats_lock = threading.Lock()  # lookups may finish on the lookup threads
        self._lookups = ThreadPoolExecutor(max(1, len(self._specs)), thread_name_prefix="memory-lookup")

    def tables(self) -> dict[str, TableSpec]:
        return dict(self._specs)

    def min_step(self, step: int | None = None) -> int | None:
        """The step whose pushes a lookup must see applied now (None: nothing to wait for).

        `step`: the lookup belongs to this step's backward (a pooled backward), so it waits for the
        steps before it only: with several memory layers the first backward of a step has already
        sent this step's update of its own table, and the next one must not wait for its own.
        """
        newest = self.last_pushed_step if step is None else min(self.last_pushed_step, step - 1)
        wanted = newest - self.staleness
        return wanted if wanted >= 0 else None

    def fetch_rows(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        """rows int64 [U] -> float32 [U, d_v], fresh up to the staleness bound."""
        r = _ids(rows)
        spec = self._specs.get(table)  # (an unknown table: the client says so)
        out = None if spec is None else self.answers.empty((r.size, spec.dim))
        values = self.client.gather(table, r, min_step=self.min_step(), wire_dtype=self.wire_dtype, out=out)
        self._observe(table, r.size)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def fetch_rows_async(self, table: str, rows: torch.Tensor) -> Future[torch.Tensor]:
        """Gather on a lookup thread: the dense blocks between a layer's read and add blocks run
        meanwhile (gRPC and torch both release the GIL while they work)."""
        return self._lookups.submit(self.fetch_rows, table, rows.detach().cpu())

    def push_grads(self, table: str, rows: torch.Tensor, grads: torch.Tensor, lr: float, step: int) -> None:
        """Send rows int64 [U] and grads [U, d_v]; sync waits until every shard has queued them."""
        r = _ids(rows)
        g = _f32(grads)
        self.client.push(table, r, g, lr=float(lr), step=int(step), wait=self.consistency == "sync")
        self.last_pushed_step = max(self.last_pushed_step, int(step))

    def pooled(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
               scores: torch.Tensor, num_tokens: int, num_projectors: int, *, pre_table: str | None = None,
               q_p: torch.Tensor | None = None) -> torch.Tensor:
        """PooledGather: rows/projector/token int64 [n], scores [n, h] (and with pre-values q_p [T, d_p],
        scored by the shards) -> float32 [T, E, d_v] (shard-summed)."""
        r = _ids(rows)
        out = self.client.pooled_gather(table, r, _ids(projector), _ids(token), _f32(scores), int(num_tokens),
                                        int(num_projectors), min_step=self.min_step(), wire_dtype=self.wire_dtype,
                                        pre_table=pre_table, q_p=None if q_p is None else _f32(q_p))
        self._observe(table, r.size)  # entries looked up (no row travels)
        return torch.from_numpy(out)

    def pooled_async(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
                     scores: torch.Tensor, num_tokens: int, num_projectors: int, *, pre_table: str | None = None,
                     q_p: torch.Tensor | None = None) -> Future[torch.Tensor]:
        """`pooled` on a lookup thread (forward without autograd, i.e. decoding): a memory layer
        starts it at its read block and waits after its add block, so the dense blocks in between run
        while the partial sums travel (as `fetch_rows_async` does for rows mode)."""
        return self._lookups.submit(self.pooled, table, rows.detach().cpu(), projector.detach().cpu(),
                                    token.detach().cpu(), scores.detach().cpu(), num_tokens, num_projectors,
                                    pre_table=pre_table, q_p=None if q_p is None else q_p.detach().cpu().clone())

    def pooled_backward(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
                        scores: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """PooledBackward at the step and value LR of begin_step: dL/do [T, E, d_v] -> dL/ds [n, h]."""
        step, lr = self.step_lr()
        grad_scores = self.client.pooled_backward(table, _ids(rows), _ids(projector), _ids(token), _f32(scores),
                                                  _f32(grad_out), lr=lr, step=step, min_step=self.min_step(step))
        self.last_pushed_step = max(self.last_pushed_step, step)
        return torch.from_numpy(np.ascontiguousarray(grad_scores, dtype=np.float32))

    def pooled_backward_pre(self, table: str, pre_table: str, rows: torch.Tensor, projector: torch.Tensor,
                            token: torch.Tensor, scores: torch.Tensor, q_p: torch.Tensor, grad_out: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """PooledBackward with pre-values: dL/do -> (dL/ds [n, h], dL/dq_p [T, d_p]); the shards update
        the rows of both tables at the step and value LR of begin_step."""
        step, lr = self.step_lr()
        grad_scores, grad_q = self.client.pooled_backward_pre(
            table, pre_table, _ids(rows), _ids(projector), _ids(token), _f32(scores), _f32(q_p), _f32(grad_out),
            lr=lr, step=step, min_step=self.min_step(step))
        self.last_pushed_step = max(self.last_pushed_step, step)
        return (torch.from_numpy(np.ascontiguousarray(grad_scores, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(grad_q, dtype=np.float32)))

    def flush(self) -> None:
        """Wait until every push sent so far has been queued by its shard."""
        self.client.flush()

    def _observe(self, table: str, rows: int) -> None:
        """Count a lookup and the staleness it saw: this worker's newest pushed step minus the newest
        step the answering shards had applied (0 when every push was visible; <= the bound)."""
        applied = self.client.applied_step(table)
        with self._stats_lock:
            self.lookups += 1
            self.rows_fetched += rows
            if self.last_pushed_step >= 0 and applied is not None:
                self.staleness_sum += max(0, self.last_pushed_step - applied)

    def mean_staleness(self) -> float:
        """Mean observed staleness (in this worker's steps) over the lookups so far."""
        return self.staleness_sum / self.lookups if self.lookups else 0.0
