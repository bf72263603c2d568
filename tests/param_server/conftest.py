"""Fixtures for the shard tests: small tables with a global numpy oracle, and shards that close.

`make_table` returns the spec, the whole table as one float32 oracle [P, d_v] and the
partitions a shard owns, laid out as storage hands them over ({p: {"values": [R, d_v]}}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from param_server.shard import Shard, ShardConfig
from storage.layout import TableSpec, numpy_dtype


@dataclass
class Table:
    """A test table: spec, the global oracle of its values, and one shard's partitions."""

    spec: TableSpec
    values: np.ndarray  # float32 [P, d_v], every row (what the spec dtype holds, as float32)
    partitions: dict[int, dict[str, np.ndarray]]  # the owned partitions, storage layout

    def owned_rows(self) -> np.ndarray:
        """Global rows (< P) in the owned partitions, ascending."""
        rows = np.arange(self.spec.rows)
        return rows[np.isin(rows % self.spec.num_partitions, list(self.partitions))]


def build_table(
    rows: int = 50, dim: int = 8, num_partitions: int = 4, *, owned: list[int] | None = None,
    dtype: str = "float32", optimizer: str = "sgd", optimizer_args: tuple = (), seed: int = 0,
    name: str = "mem",
) -> Table:
    """A table of random values; the shard owns `owned` partitions (default: all)."""
    spec = TableSpec(name=name, rows=rows, dim=dim, dtype=dtype, num_partitions=num_partitions,
                     optimizer=optimizer, optimizer_args=optimizer_args, seed=seed)
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, dim)).astype(numpy_dtype(dtype)).astype(np.float32)
    r = spec.rows_per_partition
    owned = list(range(num_partitions)) if owned is None else owned
    partitions = {}
    for p in owned:
        part = np.zeros((r, dim), dtype=numpy_dtype(dtype))
        local = np.arange(p, rows, num_partitions)  # global rows of partition p, in local order
        part[: local.shape[0]] = values[local].astype(numpy_dtype(dtype))
        partitions[p] = {"values": part}
    return Table(spec, values, partitions)


@pytest.fixture(scope="session")
def make_table() -> Callable[..., Table]:
    """`build_table` as a fixture (session-scoped, so hypothesis tests may use it)."""
    return build_table


@pytest.fixture
def shards() -> Iterator[Callable[..., Shard]]:
    """Factory of shards (ShardConfig keyword arguments), each closed after the test."""
    made: list[Shard] = []

    def factory(*tables: Table, **config: object) -> Shard:
        shard = Shard(ShardConfig(**config))  # type: ignore[arg-type]
        made.append(shard)
        for t in tables:
            shard.add_table(t.spec, t.partitions)
        return shard

    yield factory
    for shard in made:
        shard.close()


def snapshot(shard: Shard) -> dict[str, object]:
    """Everything a request may change, as bytes: table arrays, clocks, counters of accepted work."""
    shard.drain(timeout=10)
    out: dict[str, object] = {}
    for name in shard.table_names():
        for p, arrays in shard.export_partitions(name).items():
            for key, a in arrays.items():
                out[f"{name}/{p}/{key}"] = a.tobytes()
    metrics = shard.metrics()
    out["accepted"] = metrics["pushes_accepted"]
    out["applied"] = metrics["pushes_applied"]
    out["clocks"] = {k: v for k, v in metrics.items() if k.startswith("applied_step")}
    out["seq"] = [shard.last_seq(w) for w in range(4)]
    return out


def with_behaviour(handler: Any, wrap: Callable[[Callable], Callable]) -> Any:
    """A server interceptor's helper: `handler` (unary or server-streaming) with its behaviour f
    replaced by wrap(f); a streaming f returns the answers' iterator."""
    kind = "unary_stream" if handler.unary_stream is not None else "unary_unary"
    return handler._replace(**{kind: wrap(getattr(handler, kind))})
