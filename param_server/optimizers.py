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

    def _decay(self, p: np.ndarray, lr: float) -> None:
        """Decoupled weight decay on touched rows: p <- p * (1 - lr * wd)."""
        if self.config.weight_decay:
            p *= np.float32(1.0 - lr * self.config.weight_decay)


def _write_back(values: np.ndarray, rows: np.ndarray, p: np.ndarray) -> None:
    values[rows] = p if values.dtype == np.float32 else p.astype(values.dtype)


class SGD(SparseOptimizer):
    """p <- p - lr * g (after decoupled weight decay)."""

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        p = values[rows].astype(np.float32, copy=False)  # [U, d_v], a fresh copy either way
        self._decay(p, lr)
        p -= np.float32(lr) * np.asarray(grads, np.float32)
        _write_back(values, rows, p)


class RowwiseAdagrad(SparseOptimizer):
    """One accumulator per row: sum_sq += mean(g^2 over d_v); p <- p - lr * g / (sqrt(sum_sq) + eps)."""

    state_names = ("sum_sq",)

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        g = np.asarray(grads, np.float32)
        sum_sq = state["sum_sq"]
        acc = sum_sq[rows] + np.mean(g * g, axis=1, dtype=np.float32)  # [U]
        sum_sq[rows] = acc
        p = values[rows].astype(np.float32, copy=False)  # [U, d_v], a fresh copy either way
        self._decay(p, lr)
        p -= np.float32(lr) * g / (np.sqrt(acc) + np.float32(self.config.eps))[:, None]
        _write_back(values, rows, p)


class LazyAdamW(SparseOptimizer):
    """AdamW on touched rows only, with each row's own step count for bias correction."""

    state_names = ("exp_avg", "exp_avg_sq", "step")

    def step(self, values, state, rows, grads, lr):
        if rows.shape[0] == 0:
            return
        cfg = self.config
        b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
        g = np.asarray(grads, np.float32)  # [U, d_v]
        t = state["step"][rows].astype(np.int64) + 1  # [U], this row's step number
        m = state["exp_avg"][rows]  # [U, d_v] copies, updated with few temporaries
        v = state["exp_avg_sq"][rows]
        tmp = np.multiply(g, np.float32(1.0) - b1)
        m *= b1
        m += tmp
        np.multiply(g, g, out=tmp)
        tmp *= np.float32(1.0) - b2
        v *= b2
        v += tmp
        # bias corrections in float64 (as torch does with Python floats), then float32 per row
        bc1 = 1.0 - np.power(cfg.beta1, t, dtype=np.float64)
        bc2_sqrt = np.sqrt(1.0 - np.power(cfg.beta2, t, dtype=np.float64))
        step_size = (lr / bc1).astype(np.float32)[:, None]  # [U, 1]
        np.sqrt(v, out=tmp)  # denom = sqrt(v) / sqrt(bc2) + eps
        tmp /= bc2_sqrt.astype(np.float32)[:, None]
        tmp += np.float32(cfg.eps)
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p = values[rows].astype(np.float32, copy=False)  # [U, d_v], a fresh copy either way
        self._decay(p, lr)
        p -= tmp
        state["exp_avg"][rows] = m
        state["exp_avg_sq"][rows] = v
        state["step"][rows] = t.astype(state["step"].dtype)
        _write_back(values, rows, p)


_OPTIMIZERS: dict[str, type[SparseOptimizer]] = {
    "adamw": LazyAdamW,
    "adagrad": RowwiseAdagrad,
    "sgd": SGD,
}


def make_optimizer(config: SparseOptimizerConfig) -> SparseOptimizer:
    """The optimizer named by `config.name`."""
    return _OPTIMIZERS[config.name](config)
