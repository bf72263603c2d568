"""Value backends: where a memory layer's value rows live (DESIGN §3.1, docs/internals.md).

The model never owns the value tables. A layer fetches the rows it needs (`fetch_rows`, unique rows
-> float32 [U, d_v]) and, after backward, pushes their gradients (`push_grads`); the backend sums
duplicate rows and applies the table's sparse optimizer. `LocalBackend` keeps tables in-process as
numpy arrays and uses `param_server.optimizers` (the same code as a shard, never re-implemented
here); a remote backend wraps `param_server.client.Client` and plugs in unchanged.

`LocalBackend` tables are bit-identical to a sharded table made from the same `TableSpec`: row r is
local row r // NP of partition r % NP, and each partition is initialized by
`storage.layout.init_partition_values(spec, p)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from param_server.optimizers import SparseOptimizer, SparseOptimizerConfig, make_optimizer, sum_duplicates
from storage.layout import TableSpec, init_partition_values, numpy_dtype, state_layout


class BackendError(Exception):
    """Base of the errors a value backend raises on purpose."""


class UnknownTableError(BackendError, KeyError):
    """No table of that name in the backend."""


class InvalidRowsError(BackendError, ValueError):
    """Rows out of range, or rows and gradients of mismatched shape."""


class ValueBackend(ABC):
    """Where value tables live; the only door a memory layer uses to reach them."""

    @abstractmethod
    def tables(self) -> dict[str, TableSpec]:
        """Name -> spec of every table this backend serves."""

    @abstractmethod
    def fetch_rows(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        """rows int64 [U] (unique) -> a fresh float32 tensor [U, d_v] (the caller may require grad on it)."""

    @abstractmethod
    def push_grads(self, table: str, rows: torch.Tensor, grads: torch.Tensor, lr: float, step: int) -> None:
        """rows int64 [N] (may repeat), grads [N, d_v]: sum duplicates, apply the table's optimizer at ``lr``."""

    def flush(self) -> None:
        """Wait until every push is applied (a no-op for in-process backends)."""

    def add_table(self, spec: TableSpec, *, init: bool = True) -> None:
        """Create (or replace) a table; remote backends get their tables from the coordinator instead."""
        raise NotImplementedError(f"{type(self).__name__} cannot create tables; create them where they live")


@dataclass
class _Table:
    spec: TableSpec
    values: np.ndarray  # [P, d_v] in the spec dtype
    state: dict[str, np.ndarray]  # optimizer state arrays [P, ...]
    optimizer: SparseOptimizer


class LocalBackend(ValueBackend):
    """Value tables in this process (numpy), updated by param_server's sparse optimizers."""

    def __init__(
        self, specs: Iterable[TableSpec] = (), *, init: bool = True, seed: int | None = None
    ) -> None:
        """Make one table per spec; ``init`` fills values with N(0, init_std²) (else zeros).

        ``seed``, when given, replaces every spec's seed (the spec's own seed is used otherwise).
        """
        self._tables: dict[str, _Table] = {}
        for spec in specs:
            self.add_table(replace(spec, seed=seed) if seed is not None else spec, init=init)

    @classmethod
    def from_model(cls, model: Any, *, init: bool = True, seed: int | None = None) -> LocalBackend:
        """A backend holding ``model.memory_tables()`` (improved init via the specs' init_std)."""
        return cls(model.memory_tables(), init=init, seed=seed)

    # ------------------------------------------------------------------ tables
    def add_table(self, spec: TableSpec, *, init: bool = True) -> None:
        values = np.zeros((spec.rows, spec.dim), dtype=numpy_dtype(spec.dtype))
        if init:
            for p in range(spec.num_partitions):
                n = spec.valid_rows(p)
                values[p :: spec.num_partitions] = init_partition_values(spec, p)[:n]
        state = {k: np.zeros((spec.rows, *shape), dtype=dt) for k, (shape, dt) in state_layout(spec).items()}
        optimizer = make_optimizer(SparseOptimizerConfig.from_spec(spec))
        self._tables[spec.name] = _Table(spec, values, state, optimizer)

    def tables(self) -> dict[str, TableSpec]:
        return {name: t.spec for name, t in self._tables.items()}

    def _table(self, name: str) -> _Table:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(f"unknown table {name!r}; have {sorted(self._tables)}") from None

    def _rows(self, table: _Table, rows: torch.Tensor | np.ndarray) -> np.ndarray:
        r = np.asarray(
            rows.detach().cpu().numpy() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64
        )
        if r.ndim != 1:
            raise InvalidRowsError(f"{table.spec.name}: rows must be 1-D, got shape {r.shape}")
        if r.size and (r.min() < 0 or r.max() >= table.spec.rows):
            raise InvalidRowsError(
                f"{table.spec.name}: rows must be in [0, {table.spec.rows}), got {r.min()}..{r.max()}"
            )
        return r

    # ------------------------------------------------------------------ hot path
    def fetch_rows(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        t = self._table(table)
        r = self._rows(t, rows)
        return torch.from_numpy(t.values[r].astype(np.float32, copy=False))  # fancy index = a copy

    def push_grads(self, table: str, rows: torch.Tensor, grads: torch.Tensor, lr: float, step: int) -> None:
        t = self._table(table)
        r = self._rows(t, rows)
        g = (
            grads.detach().float().cpu().numpy()
            if isinstance(grads, torch.Tensor)
            else np.asarray(grads, np.float32)
        )
        if g.shape != (r.shape[0], t.spec.dim):
            raise InvalidRowsError(f"{table}: grads shape {g.shape} != ({r.shape[0]}, {t.spec.dim})")
        if not np.isfinite(g).all():
            raise InvalidRowsError(f"{table}: non-finite gradient pushed at step {step}")
        unique, summed = sum_duplicates(r, g)  # DESIGN §8: `table[idx] -= g` loses repeated rows
        t.optimizer.step(t.values, t.state, unique, summed, float(lr))

    # ------------------------------------------------------------------ checkpoint support
    def export_partitions(self, table: str) -> dict[int, dict[str, np.ndarray]]:
        """Partition p -> {"values": [R, d_v], state...: [R, ...]} copies (padding rows zero), as a shard exports."""
        t = self._table(table)
        spec = t.spec
        arrays = {"values": t.values, **t.state}
        out: dict[int, dict[str, np.ndarray]] = {}
        for p in range(spec.num_partitions):
            n = spec.valid_rows(p)
            part = {}
            for key, arr in arrays.items():
                buf = np.zeros((spec.rows_per_partition, *arr.shape[1:]), dtype=arr.dtype)
                buf[:n] = arr[p :: spec.num_partitions]
                part[key] = buf
            out[p] = part
        return out

    def import_partitions(self, spec: TableSpec, partitions: dict[int, dict[str, np.ndarray]]) -> None:
        """Replace table ``spec.name`` with these partitions (all NP of them; the inverse of export)."""
        if sorted(partitions) != list(range(spec.num_partitions)):
            raise InvalidRowsError(
                f"{spec.name}: need partitions 0..{spec.num_partitions - 1}, got {len(partitions)}"
            )
        trailing = {"values": (spec.dim,), **{k: shape for k, (shape, _) in state_layout(spec).items()}}
        for p, part in partitions.items():  # validate everything before replacing the table
            for key, shape in trailing.items():
                if key not in part or part[key].shape != (spec.rows_per_partition, *shape):
                    raise InvalidRowsError(f"{spec.name}: partition {p} array {key!r} missing or misshapen")
        self.add_table(spec, init=False)
        t = self._tables[spec.name]
        arrays = {"values": t.values, **t.state}
        for p, part in partitions.items():
            n = spec.valid_rows(p)
            for key, arr in arrays.items():
                arr[p :: spec.num_partitions] = part[key][:n]

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """{name: {"spec": spec dict, "values": [P, d_v], "state": {name: [P, ...]}}} (copies)."""
        return {
            name: {
                "spec": t.spec.to_dict(),
                "values": t.values.copy(),
                "state": {k: v.copy() for k, v in t.state.items()},
            }
            for name, t in self._tables.items()
        }

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        """Replace every table with those of ``state`` (as made by ``state_dict``); validated first."""
        staged = {}
        for name, entry in state.items():
            spec = TableSpec.from_dict(entry["spec"])
            if entry["values"].shape != (spec.rows, spec.dim):
                raise InvalidRowsError(
                    f"{name}: values shape {entry['values'].shape} != ({spec.rows}, {spec.dim})"
                )
            staged[name] = (spec, entry)
        self._tables.clear()
        for name, (spec, entry) in staged.items():
            self.add_table(spec, init=False)
            t = self._tables[name]
            t.values[...] = entry["values"]
            for key, arr in t.state.items():
                arr[...] = entry["state"][key]
