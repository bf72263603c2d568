"""The shard's applied-step clocks (DESIGN §4.3 consistency): what a `min_step` lookup waits on.

Per (worker, table): the highest step of that worker's pushes to that table the shard has applied,
and the steps of its pushes still queued. Per table, not per worker: a worker pushes to every
table each step, and a lookup on table T must not pass because another table's push was applied.
A lookup with min_step passes once the clock is >= min_step and no queued push of the worker at a
step <= min_step is left (a re-routed push may arrive after a later one was applied, DESIGN §4.1).
Per worker also the highest applied seq. The clocks travel with handed-off partitions (`items` /
`merge`) and with checkpoints (`progress` / `restore`, param_server/actor.py).

Not locked: `Shard` calls every method with its condition variable held and notifies after changes.
"""

from __future__ import annotations

from collections.abc import Iterable

Key = tuple[int, str]  # (worker, table)


class StepClocks:
    """Applied and queued steps per (worker, table); applied seq per worker."""

    def __init__(self) -> None:
        self._applied: dict[Key, int] = {}
        self._applied_seq: dict[int, int] = {}
        self._queued: dict[Key, dict[int, int]] = {}  # (worker, table) -> {step: queued pushes}

    def queue(self, worker: int, table: str, step: int) -> None:
        """A push of `step` was queued."""
        queued = self._queued.setdefault((worker, table), {})
        queued[step] = queued.get(step, 0) + 1

    def unqueue(self, worker: int, table: str, step: int) -> None:
        """A push counted by `queue` left the queue without being applied (refused, a duplicate)."""
        queued = self._queued[(worker, table)]
        queued[step] -= 1
        if not queued[step]:
            del queued[step]

    def applied(self, worker: int, table: str, step: int, seq: int) -> None:
        """A queued push (step, seq) was applied: it leaves the queue and advances the clocks."""
        self.unqueue(worker, table, step)
        key = (worker, table)
        self._applied[key] = max(self._applied.get(key, -1), step)
        self._applied_seq[worker] = max(self._applied_seq.get(worker, 0), seq)

    def reached(self, worker: int, table: str, min_step: int) -> bool:
        """Every push of `worker` to `table` up to `min_step` is applied and none of them is queued."""
        queued = self._queued.get((worker, table))
        return self.step(worker, table) >= min_step and not (queued and min(queued) <= min_step)

    def step(self, worker: int, table: str | None = None) -> int:
        """The highest applied step of `worker` on `table` (-1: none); with no table, the lowest over
        the tables the worker has pushed to."""
        if table is not None:
            return self._applied.get((worker, table), -1)
        steps = [s for (w, _), s in self._applied.items() if w == worker]
        return min(steps) if steps else -1

    def items(self) -> list[tuple[int, str, int]]:
        """[(worker, table, applied step)], sorted."""
        return [(w, name, s) for (w, name), s in sorted(self._applied.items())]

    def merge(self, clocks: Iterable[tuple[int, str, int]]) -> None:
        """Start clocks never seen here at a previous owner's value (a hand-off); keep the others: that
        worker still pushes every step here, so a lower clock only waits for a push on its way."""
        for w, name, s in clocks:
            self._applied.setdefault((int(w), str(name)), int(s))

    def workers(self) -> list[int]:
        """Every worker with a clock or an applied seq, sorted."""
        return sorted(set(self._applied_seq) | {w for w, _ in self._applied})

    def restore(self, clocks: Iterable[tuple[int, str, int]], seqs: Iterable[tuple[int, int]]) -> None:
        """Advance to a checkpoint's progress (a shard restarted from it)."""
        for w, name, s in clocks:
            key = (int(w), str(name))
            self._applied[key] = max(self._applied.get(key, -1), int(s))
        for w, q in seqs:
            self._applied_seq[int(w)] = max(self._applied_seq.get(int(w), 0), int(q))
