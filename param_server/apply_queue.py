"""The shard's apply queue: exactly-once admission of pushes, applied in order by one thread.

DESIGN §4.2-4.3. A push is admitted once per (worker_id, seq): the queue remembers each worker's
last accepted seq, and a push whose seq is <= it (a client retry, even while the original is still
queued) is acknowledged and dropped. Admitted pushes wait in a bounded FIFO; when `max_pending`
are waiting, `submit` raises `QueueFullError` and admits nothing (the client backs off and
retries). One background thread pops pushes in arrival order and hands each to the `apply`
callback (the shard's optimizer step); a push counts as pending until its apply returns, so
`drain()` means "everything accepted so far has been applied".
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from param_server.errors import QueueFullError, ShardClosedError, WaitTimeoutError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingUpdate:
    """One accepted push, validated and translated to the table's flat row slots."""

    table: str
    worker_id: int
    seq: int  # per-worker push number, 1, 2, 3, ...
    step: int  # the worker's training step this push belongs to
    lr: float  # learning rate, value multiplier included
    slots: np.ndarray  # int64 [N] rows of the shard's flat table arrays; may repeat
    grads: np.ndarray  # float32 [N, d_v], owned by the queue (a copy of the request's)
    # further (table, slots [N'], grads [N', dim]) applied together with this one under the same seq:
    # a pooled backward with pre-values updates the value table and its pre-value table at once
    also: tuple[tuple[str, np.ndarray, np.ndarray], ...] = ()

    def parts(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(table, slots, grads) of every table this update touches, this one first."""
        return [(self.table, self.slots, self.grads), *self.also]


class ApplyQueue:
    """Bounded FIFO of accepted pushes with one apply thread.

    Args:
        max_pending: pushes held (queued or being applied) before `submit` refuses.
        apply: called on the apply thread with each update, in arrival order.
        name: thread name, for logs and debuggers.
    """

    def __init__(
        self, max_pending: int, apply: Callable[[PendingUpdate], None], *, name: str = "apply-queue"
    ) -> None:
        if max_pending <= 0:
            raise ValueError(f"max_pending must be > 0, got {max_pending}")
        self.max_pending = max_pending
        self._apply = apply
        self._cv = threading.Condition()
        self._items: deque[PendingUpdate] = deque()
        self._last_seq: dict[int, int] = {}
        self._closing = False
        self.accepted = 0  # pushes admitted
        self.applied = 0  # pushes whose apply returned
        self.duplicates = 0  # retried pushes acknowledged and dropped
        self.rejected_full = 0  # submits refused with QueueFullError
        self.apply_errors = 0  # applies that raised (a bug: logged, the loop goes on)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, update: PendingUpdate) -> bool:
        """Admit `update` once: True if queued, False if its seq was already accepted.

        Raises:
            QueueFullError: `max_pending` pushes are pending; nothing changed.
            ShardClosedError: the queue was closed.
        """
        with self._cv:
            if self._closing:
                raise ShardClosedError("the shard is closed and accepts no pushes")
            if update.seq <= self._last_seq.get(update.worker_id, 0):
                self.duplicates += 1
                return False
            if len(self._items) >= self.max_pending:
                self.rejected_full += 1
                raise QueueFullError(
                    f"apply queue full ({len(self._items)} pending pushes); retry later"
                )
            self._last_seq[update.worker_id] = update.seq
            self._items.append(update)
            self.accepted += 1
            self._cv.notify_all()
            return True

    def last_seq(self, worker_id: int) -> int:
        """The last seq accepted from `worker_id` (0 if none)."""
        with self._cv:
            return self._last_seq.get(worker_id, 0)

    def restore_last_seq(self, worker_id: int, seq: int) -> None:
        """After a restart from a checkpoint: seqs up to `seq` of `worker_id` are in it (duplicates)."""
        with self._cv:
            self._last_seq[worker_id] = max(self._last_seq.get(worker_id, 0), seq)

    def depth(self) -> int:
        """Pushes queued or being applied."""
        with self._cv:
            return len(self._items)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every accepted push has been applied.

        Raises:
            WaitTimeoutError: pushes were still pending after `timeout` seconds.
        """
        with self._cv:
            if not self._cv.wait_for(lambda: not self._items, timeout):
                raise WaitTimeoutError(f"apply queue not drained after {timeout} s ({len(self._items)} pending)")

    def close(self, timeout: float | None = None) -> None:
        """Refuse new pushes, apply the pending ones, stop the thread. Idempotent."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise WaitTimeoutError(f"apply thread still running after {timeout} s")

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._items or self._closing)
                if not self._items:  # closing and drained
                    return
                update = self._items[0]  # stays counted as pending until applied
            try:
                self._apply(update)
            except Exception:  # our own bug: keep serving, make it visible
                logger.exception("apply of push (worker %s, seq %s) failed", update.worker_id, update.seq)
                with self._cv:
                    self.apply_errors += 1
            with self._cv:
                self._items.popleft()
                self.applied += 1
                self._cv.notify_all()
