"""Counters a shard keeps about its own work (DESIGN §7: lookups/s, rows, queue depth, staleness).

Plain numbers, updated under the shard's lock; `Shard.metrics()` adds gauges (queue depth, bytes
resident, applied step per worker) and the servicer or actor exports the dict (Prometheus).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class ShardCounters:
    """Monotonic counters of one shard since it started."""

    lookups: int = 0  # gather and pooled_gather calls answered
    rows_looked_up: int = 0  # rows (pooled: entries) read by those lookups
    pushes_applied: int = 0  # pushes (and pooled backwards) applied by the apply thread
    rows_applied: int = 0  # unique rows updated by those applies
    apply_cpu_s: float = 0.0  # CPU seconds of the apply thread in those applies (duplicate sums + optimizer)
    wait_timeouts: int = 0  # min_step lookups that gave up
    lookups_waiting: int = 0  # gauge: min_step lookups blocked right now on a push not yet applied
    wait_checks: int = 0  # times a blocked min_step lookup re-checked its clock (each wake-up)
    requests_waiting_handoff: int = 0  # gauge: requests paused right now on a partition being handed off

    def count_lookup(self, rows: int) -> None:
        """One lookup of `rows` rows answered."""
        self.lookups += 1
        self.rows_looked_up += rows

    def count_apply(self, rows: int, cpu_s: float = 0.0) -> None:
        """One push applied to `rows` unique rows, taking `cpu_s` CPU seconds of the apply thread."""
        self.pushes_applied += 1
        self.rows_applied += rows
        self.apply_cpu_s += cpu_s

    def as_dict(self) -> dict[str, float]:
        """Every counter as a float, keyed by its field name."""
        return {k: float(v) for k, v in asdict(self).items()}
