"""Value backends: where a memory layer's value rows live (DESIGN §3.1, docs/internals.md).

The model never owns the value tables. A layer fetches the rows it needs (`fetch_rows`, unique rows
-> float32 [U, d_v]) and, after backward, pushes their gradients (`push_grads`); the backend sums
duplicate rows and applies the table's sparse optimizer. `LocalBackend` keeps tables in-process as
numpy arrays and uses `param_server.optimizers` (the same code as a shard, never re-implemented
here); a remote backend wraps `param_server.client.Client` and plugs in unchanged. In pooled mode
(DESIGN §4.2) the backend pools the rows itself (`pooled`) and turns dL/do into dL/ds plus a row
update (`pooled_backward`); LocalBackend does it with the shard's `pooled_sum` and the shard's
backward formula, so local and remote agree to float tolerance.

`LocalBackend` tables are bit-identical to a sharded table made from the same `TableSpec`: row r is
local row r // NP of partition r % NP, and each partition is initialized by
`storage.layout.init_partition_values(spec, p)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from param_server.optimizers import SparseOptimizer, SparseOptimizerConfig, make_optimizer, sum_duplicates
from param_server.pooling import pooled_backward as pooled_backward_rows
from param_server.pooling import pooled_sum, pre_value_backward, pre_value_scores
from storage.layout import TableSpec, init_table_values, numpy_dtype, state_layout


class BackendError(Exception):
    """Base of the errors a value backend raises on purpose."""


class UnknownTableError(BackendError, KeyError):
    """No table of that name in the backend."""


class InvalidRowsError(BackendError, ValueError):
    """Rows out of range, or rows and gradients of mismatched shape."""


class PooledStepError(BackendError, RuntimeError):
    """A pooled backward came before any `begin_step` (no step or value LR to update the rows with)."""


def _answered(fn: Callable[..., torch.Tensor], *args: Any) -> Future[torch.Tensor]:
    """A future holding fn(*args), or its exception (delivered where the caller waits, as a remote
    failure would be)."""
    done: Future[torch.Tensor] = Future()
    try:
        done.set_result(fn(*args))
    except Exception as err:
        done.set_exception(err)
    return done


class ValueBackend(ABC):
    """Where value tables live; the only door a memory layer uses to reach them.

    Rows mode uses `fetch_rows` + `push_grads`. Pooled mode (DESIGN §4.2) uses `pooled` in the
    forward and `pooled_backward` in the backward, which also updates the rows at the step and value
    LR of the last `begin_step`.

    A memory layer hands every method host tensors that are views of its reused staging buffers
    (model_workers/transfer.py): valid for the call (until the answer of an `*_async` call), so a
    backend that keeps one longer copies it. Answers are fresh host tensors the layer may keep.
    """

    _step_lr: tuple[int, float] | None = None  # (step, value LR) of the last begin_step

    @abstractmethod
    def tables(self) -> dict[str, TableSpec]:
        """Name -> spec of every table this backend serves."""

    @abstractmethod
    def fetch_rows(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        """rows int64 [U] (unique) -> a fresh float32 tensor [U, d_v] (the caller may require grad on it)."""

    def fetch_rows_async(self, table: str, rows: torch.Tensor) -> Future[torch.Tensor]:
        """`fetch_rows` started now, answered later: a memory layer issues it at its read block and
        waits for it after its add block, so the dense blocks in between overlap the lookup
        (DESIGN §3.1 skip-layer). In-process backends answer at once."""
        return _answered(self.fetch_rows, table, rows)

    def pooled_async(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
                     scores: torch.Tensor, num_tokens: int, num_projectors: int, *, pre_table: str | None = None,
                     q_p: torch.Tensor | None = None) -> Future[torch.Tensor]:
        """`pooled` started now, answered later (decoding, without autograd: a memory layer overlaps
        it with the dense blocks before its add block, as `fetch_rows_async`). In-process: at once."""
        return _answered(lambda: self.pooled(table, rows, projector, token, scores, num_tokens, num_projectors,
                                             pre_table=pre_table, q_p=q_p))

    @abstractmethod
    def push_grads(self, table: str, rows: torch.Tensor, grads: torch.Tensor, lr: float, step: int) -> None:
        """rows int64 [N] (may repeat), grads [N, d_v]: sum duplicates, apply the table's optimizer at ``lr``."""

    def flush(self) -> None:  # noqa: B027 (an optional hook: in-process backends have nothing to wait for)
        """Wait until every push is applied (a no-op for in-process backends)."""

    def begin_step(self, step: int, value_lr: float) -> None:
        """Announce the optimizer step (0-based) and value LR (multiplier included) of the coming
        forward/backward: pooled backwards update the rows with them (train_step calls this)."""
        if isinstance(step, bool) or int(step) != step or step < 0:
            raise ValueError(f"begin_step: step must be an int >= 0, got {step!r}")
        if not (np.isfinite(value_lr) and value_lr >= 0):
            raise ValueError(f"begin_step: value_lr must be finite and >= 0, got {value_lr!r}")
        self._step_lr = (int(step), float(value_lr))

    def step_lr(self) -> tuple[int, float]:
        """(step, value LR) of the last begin_step; PooledStepError if there was none."""
        if self._step_lr is None:
            raise PooledStepError("pooled backward needs the step and value LR: call "
                                  "backend.begin_step(step, value_lr) before the forward (train_step does)")
        return self._step_lr

    def pooled(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
               scores: torch.Tensor, num_tokens: int, num_projectors: int, *, pre_table: str | None = None,
               q_p: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled lookup (DESIGN §3.1 step 6 where the table lives).

        rows/projector/token int64 [n], scores float32 [n, h] -> float32 [T = num_tokens, E, d_v] with
        o[t, p, slice c] = sum_j [projector_j = p][token_j = t] * scores[j, c] * V[rows_j, slice c].
        With pre-values (DESIGN §3.3): `pre_table` names P_tab of `table`, q_p float32 [T, d_p] is each
        token's projected query, and scores[j] is weighted by a_j = <q_p[token_j], P_tab[rows_j]> first.
        """
        raise NotImplementedError(f"{type(self).__name__} has no pooled mode; use memory.lookup = 'rows'")

    def pooled_backward_pre(self, table: str, pre_table: str, rows: torch.Tensor, projector: torch.Tensor,
                            token: torch.Tensor, scores: torch.Tensor, q_p: torch.Tensor, grad_out: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward of `pooled` with pre-values: dL/do [T, E, d_v] -> (dL/ds float32 [n, h], dL/dq_p
        float32 [T, d_p]) (param_server.pooling.pre_value_backward), and the rows of both tables updated
        (the same optimizer, step and value LR) as `pooled_backward` does for V."""
        raise NotImplementedError(f"{type(self).__name__} has no pooled pre-values; use memory.lookup = 'rows'")

    def pooled_backward(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
                        scores: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """Backward of `pooled`: grad_out float32 [T, E, d_v] = dL/do -> dL/ds float32 [n, h], with
        dL/ds[j, c] = <dL/do[t_j, p_j, slice c], V[row_j, slice c]> (V before this update), and the
        rows updated with dL/dV[row_j, slice c] = s_c[j] * dL/do[t_j, p_j, slice c] (duplicates
        summed, one optimizer step per row) at the step and value LR of the last begin_step."""
        raise NotImplementedError(f"{type(self).__name__} has no pooled mode; use memory.lookup = 'rows'")

    def add_table(self, spec: TableSpec, *, init: bool = True) -> None:
        """Create (or replace) a table; remote backends get their tables from the coordinator instead."""
        raise NotImplementedError(f"{type(self).__name__} cannot create tables; create them where they live")


def _ids(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.int64)


def _float32(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else x,
                      dtype=np.float32)


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
        values = init_table_values(spec) if init else np.zeros((spec.rows, spec.dim), dtype=numpy_dtype(spec.dtype))
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

    def pooled(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
               scores: torch.Tensor, num_tokens: int, num_projectors: int, *, pre_table: str | None = None,
               q_p: torch.Tensor | None = None) -> torch.Tensor:
        """In-process pooled lookup with the shard's own math (param_server.pooling.pooled_sum, and
        pre_value_scores with pre-values)."""
        t = self._table(table)
        r, p, tok, s = self._pooled_args(t, rows, projector, token, scores, num_tokens, num_projectors)
        out = np.zeros((num_tokens, num_projectors, t.spec.dim), dtype=np.float32)
        if pre_table is not None or q_p is not None:
            t_pre, q = self._pre_args(t, pre_table, q_p, num_tokens)
            _, s = pre_value_scores(t_pre.values, q, tok, s, flat=r)  # s' = a * s, (n, h); P_tab read in place
        if r.size:
            tokens, sums = pooled_sum(t.values, p, tok, s, num_projectors, flat=r)  # (Tt,), (Tt, E, d_v)
            out[tokens] = sums
        return torch.from_numpy(out)

    def pooled_backward(self, table: str, rows: torch.Tensor, projector: torch.Tensor, token: torch.Tensor,
                        scores: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """dL/ds [n, h] and an immediate row update (param_server.pooling.pooled_backward)."""
        step, lr, t, g_out, (r, p, tok, s) = self._backward_args(table, rows, projector, token, scores, grad_out)
        if not np.isfinite(g_out).all():
            raise InvalidRowsError(f"{table}: non-finite dL/do in the pooled backward of step {step}")
        n = r.shape[0]
        # V before this step's update; the same formula as the shard's PooledBackward
        grad_scores, unique, summed = pooled_backward_rows(t.values, r, p, tok, s, g_out, flat=r)  # read in place
        if n:
            t.optimizer.step(t.values, t.state, unique, summed, lr)
        return torch.from_numpy(grad_scores)

    def pooled_backward_pre(self, table: str, pre_table: str, rows: torch.Tensor, projector: torch.Tensor,
                            token: torch.Tensor, scores: torch.Tensor, q_p: torch.Tensor, grad_out: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """dL/ds [n, h], dL/dq_p [T, d_p] and an immediate update of both tables (the shard's formula)."""
        step, lr, t, g_out, (r, p, tok, s) = self._backward_args(table, rows, projector, token, scores, grad_out)
        t_pre, q = self._pre_args(t, pre_table, q_p, g_out.shape[0])
        if not np.isfinite(g_out).all():
            raise InvalidRowsError(f"{table}: non-finite dL/do in the pooled backward of step {step}")
        # P_tab read in place, before this step's update (as the shard reads it)
        a, weighted = pre_value_scores(t_pre.values, q, tok, s, flat=r)
        grad_weighted, unique, summed = pooled_backward_rows(t.values, r, p, tok, weighted, g_out, flat=r)
        grad_scores, grad_q, pre_unique, pre_summed = pre_value_backward(t_pre.values, q, tok, r, s, a, grad_weighted,
                                                                         flat=r)
        if r.size:
            t.optimizer.step(t.values, t.state, unique, summed, lr)
            t_pre.optimizer.step(t_pre.values, t_pre.state, pre_unique, pre_summed, lr)
        return torch.from_numpy(grad_scores), torch.from_numpy(grad_q)

    def _backward_args(self, table: str, rows: Any, projector: Any, token: Any, scores: Any, grad_out: Any
                       ) -> tuple[int, float, _Table, np.ndarray, tuple[np.ndarray, ...]]:
        """(step, lr, table, dL/do float32 [T, E, d_v], (rows, projector, token, scores)) of a pooled
        backward, checked (the finiteness of dL/do aside)."""
        step, lr = self.step_lr()
        t = self._table(table)
        g_out = _float32(grad_out)
        if g_out.ndim != 3 or g_out.shape[2] != t.spec.dim:
            raise InvalidRowsError(f"{table}: grad_out must be [T, E, {t.spec.dim}], got {list(g_out.shape)}")
        return step, lr, t, g_out, self._pooled_args(t, rows, projector, token, scores, g_out.shape[0], g_out.shape[1])

    def _pre_args(self, t: _Table, pre_table: str | None, q_p: Any, num_tokens: int) -> tuple[_Table, np.ndarray]:
        """The pre-value table of `t` and q_p float32 [T, d_p], validated."""
        if pre_table is None or q_p is None:
            raise InvalidRowsError(f"{t.spec.name}: pre-values need both pre_table and q_p")
        t_pre = self._table(pre_table)
        if (t_pre.spec.rows, t_pre.spec.num_partitions) != (t.spec.rows, t.spec.num_partitions):
            raise InvalidRowsError(f"{pre_table} is not a pre-value table of {t.spec.name}: rows or partitions differ")
        q = _float32(q_p)
        if q.shape != (num_tokens, t_pre.spec.dim) or not np.isfinite(q).all():
            raise InvalidRowsError(f"{pre_table}: q_p must be finite [{num_tokens}, {t_pre.spec.dim}], "
                                   f"got {list(q.shape)}")
        return t_pre, q

    def _pooled_args(self, t: _Table, rows: Any, projector: Any, token: Any, scores: Any, num_tokens: int,
                     num_projectors: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Validated (rows [n], projector [n], token [n], scores float32 [n, h]), all numpy."""
        r = self._rows(t, rows)
        p, tok = _ids(projector), _ids(token)
        s = _float32(scores)
        n = r.shape[0]
        if p.shape != (n,) or tok.shape != (n,) or s.ndim != 2 or s.shape[0] != n:
            raise InvalidRowsError(f"{t.spec.name}: rows, projector, token [n] and scores [n, h] disagree in n")
        if s.shape[1] < 1 or t.spec.dim % s.shape[1]:
            raise InvalidRowsError(f"{t.spec.name}: scores [n, h] need h dividing d_v={t.spec.dim}, got h={s.shape[1]}")
        if n and (p.min() < 0 or p.max() >= num_projectors or tok.min() < 0 or tok.max() >= num_tokens):
            raise InvalidRowsError(f"{t.spec.name}: projector ids must be in [0, {num_projectors}) and "
                                   f"token ids in [0, {num_tokens})")
        return r, p, tok, s

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
