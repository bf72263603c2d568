"""Sparse optimizers for memory value tables (DESIGN §4.4, §3.1 step 8).

The single implementation of the value-table update rules: the shard's apply loop and the
model's in-process `LocalBackend` both call these. An optimizer updates only the rows it is given
(lazy): lazy AdamW keeps m, v and a step count per row (bias correction uses the row's own count)
and applies decoupled weight decay to touched rows only; row-wise Adagrad keeps one accumulator
per row (the mean of the squared gradient over d_v, summed over steps); SGD keeps nothing.

Math runs in float32; `values` may be float32, float16 or ml_dtypes.bfloat16 (touched rows are
converted, updated and written back). State arrays follow `storage.layout.OPTIMIZER_STATE`.
Weight decay is decoupled for every optimizer (p <- p * (1 - lr * wd) on touched rows).

`table[idx] -= g` is wrong when idx repeats (last write wins, DESIGN §8): callers sum
duplicates first with `sum_duplicates` (torch.unique + index_add_, no np.add.at).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from param_server.errors import ConfigError
from param_server.kernels import adagrad_rows, adamw_rows, sgd_rows

if TYPE_CHECKING:
    from storage.layout import TableSpec

OptimizerName = Literal["adamw", "adagrad", "sgd"]


@dataclass(frozen=True)
class SparseOptimizerConfig:
    """Hyper-parameters of a table's sparse optimizer; the LR travels with each push."""

    name: OptimizerName = "adamw"
    beta1: float = 0.9  # AdamW first-moment decay (DESIGN §3.1 step 8)
    beta2: float = 0.95  # AdamW second-moment decay (paper: 0.95)
    eps: float = 1e-8  # added to the denominator (AdamW, Adagrad)
    weight_decay: float = 0.0  # decoupled, applied to touched rows only

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "adagrad", "sgd"):
            raise ConfigError(f"optimizer must be adamw, adagrad or sgd, got {self.name!r}")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"optimizer.{field} must be in [0, 1), got {value}")
        if not self.eps > 0.0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"optimizer.weight_decay must be finite and >= 0, got {self.weight_decay}")

    @classmethod
    def from_spec(cls, spec: TableSpec) -> SparseOptimizerConfig:
        """The config a table spec asks for: `spec.optimizer` plus `spec.optimizer_args` overrides."""
        valid = [f.name for f in fields(cls) if f.name != "name"]
        kwargs: dict[str, float] = {}
        for key, value in spec.optimizer_args:
            if key not in valid:
                raise ConfigError(f"unknown optimizer arg {key!r}; valid: {', '.join(valid)}")
            kwargs[key] = float(value)
        return cls(name=spec.optimizer, **kwargs)  # type: ignore[arg-type]


def sum_duplicates(rows: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the gradients of repeated rows (`torch.unique` + `index_add_`, compiled; no np.add.at).

    Args:
        rows: int64 [N], may repeat, any order.
        grads: [N, d_v], any float dtype.
    Returns:
        (unique sorted int64 rows [U], float32 summed grads [U, d_v]).
    """
    rows = np.asarray(rows, dtype=np.int64)
    grads = np.asarray(grads, dtype=np.float32)
    if rows.shape[0] <= 1 or bool(np.all(rows[1:] > rows[:-1])):
        return rows, grads  # already unique and sorted: nothing to sum
    unique, inverse = torch.unique(torch.from_numpy(rows), sorted=True, return_inverse=True)
    summed = torch.zeros((unique.shape[0], *grads.shape[1:]), dtype=torch.float32)
    summed.index_add_(0, inverse, torch.from_numpy(np.ascontiguousarray(grads)))
    return unique.numpy(), summed.numpy()


class SparseOptimizer(ABC):
    """Updates the given rows of a value table and their optimizer state in place."""

    #: names of the state arrays this optimizer reads and writes (see storage.layout.OPTIMIZER_STATE)
    state_names: tuple[str, ...] = ()

    def __init__(self, config: SparseOptimizerConfig) -> None:
        self.config = config

    @abstractmethod
    def step(
        self,
        values: np.ndarray,
        state: dict[str, np.ndarray],
        rows: np.ndarray,
        grads: np.ndarray,
        lr: float,
    ) -> None:
        """One optimizer step on `rows`.

        Args:
            values: [N, d_v] table (float32, float16 or bfloat16), updated in place.
            state: state arrays [N, ...], updated in place.
            rows: unique int64 [U] indices into the first axis.
            grads: float32 [U, d_v], the summed gradient of each row.
            lr: learning rate of this step (value-LR multiplier included).
        """

    def _decay(self, lr: float) -> float:
        """Decoupled weight decay factor on touched rows: p <- p * (1 - lr * wd)."""
        return 1.0 - lr * self.config.weight_decay


def _rows_f32(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 table to update in place, its row index): the table itself when float32 and
    C-contiguous, else a float32 copy of the touched rows (bfloat16 / float16) indexed 0..U-1."""
    if values.dtype == np.float32 and values.flags.c_contiguous:
        return values, rows
    return np.ascontiguousarray(values[rows], dtype=np.float32), np.arange(rows.shape[0], dtype=np.int64)


def _write_back(values: np.ndarray, rows: np.ndarray, p: np.ndarray) -> None:
    if p is not values:
        values[rows] = p if values.dtype == np.float32 else p.astype(values.dtype)


class SGD(SparseOptimizer):
    """p <- p - lr * g (after decoupled weight decay)."""

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        rows = np.asarray(rows, dtype=np.int64)
        p, index = _rows_f32(values, rows)
        sgd_rows(p, index, np.ascontiguousarray(grads, np.float32), lr, self._decay(lr))
        _write_back(values, rows, p)


class RowwiseAdagrad(SparseOptimizer):
    """One accumulator per row: sum_sq += mean(g^2 over d_v); p <- p - lr * g / (sqrt(sum_sq) + eps)."""

    state_names = ("sum_sq",)

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        rows = np.asarray(rows, dtype=np.int64)
        p, index = _rows_f32(values, rows)
        sum_sq = state["sum_sq"]
        if p is values:
            adagrad_rows(p, sum_sq, rows, np.ascontiguousarray(grads, np.float32), lr, self.config.eps,
                         self._decay(lr))
        else:  # a copy of the rows: their accumulators too, written back after
            acc = np.ascontiguousarray(sum_sq[rows], dtype=np.float32)
            adagrad_rows(p, acc, index, np.ascontiguousarray(grads, np.float32), lr, self.config.eps,
                         self._decay(lr))
            sum_sq[rows] = acc
        _write_back(values, rows, p)


class LazyAdamW(SparseOptimizer):
    """AdamW on touched rows only, with each row's own step count for bias correction.

    One fused pass per row (param_server.kernels.adamw_rows): m, v, the step count and the value
    are read and written in place, with no gathered copies (measured: bench/kernels_ab.py).
    """

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        cfg = self.config
        rows = np.asarray(rows, dtype=np.int64)
        p, index = _rows_f32(values, rows)
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        g = np.ascontiguousarray(grads, np.float32)
        if p is values:
            adamw_rows(p, m, v, t, rows, g, lr, cfg.beta1, cfg.beta2, cfg.eps, self._decay(lr))
        else:  # a copy of the rows: their state too, written back after
            mc, vc, tc = m[rows], v[rows], t[rows]
            adamw_rows(p, mc, vc, tc, index, g, lr, cfg.beta1, cfg.beta2, cfg.eps, self._decay(lr))
            m[rows], v[rows], t[rows] = mc, vc, tc
        _write_back(values, rows, p)


_OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    "adamw": LazyAdamW,
    "adagrad": RowwiseAdagrad,
    "sgd": SGD,
}


def make_optimizer(config: SparseOptimizerConfig) -> SparseOptimizer:
    """The optimizer named by `config.name`."""
    return _OPTIMIZERS[config.name](config)
