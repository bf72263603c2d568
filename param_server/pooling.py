"""The shard side of pooled lookups (DESIGN §3.1 steps 4-6, §4.2 PooledGather / PooledBackward):
IVE grouping by (token, projector), MCS weighting of d_v slices by the h core scores, and the
backward of both. Both are compiled passes over the entries (param_server.kernels) that read the
table in place, the rest plain numpy; `LocalBackend` (model_workers/values.py) calls the same functions, so
local and remote pooled training share one formula.

UltraMemV2 pre-values (DESIGN §3.3 item 3) are scored here too: with a pre-value table P_tab
[P, d_p] beside V and the per-token projected query q_p [T, d_p] from the worker, entry j weighs
a_j = <q_p[t_j], P_tab[row_j]> and pools with the scores s'_j = a_j * s_j (`pre_value_scores`);
the backward turns dL/ds' into dL/ds, dL/dq_p per token and dL/dP_tab per row
(`pre_value_backward`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from param_server.checks import unique_inverse
from param_server.kernels import (
    pooled_backward_into,
    pooled_sum_into,
    pre_value_backward_into,
    pre_value_scores_into,
)


def stable_argsort(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable") of int64 keys [n], the fastest way measured on one thread:
    keys in [0, 2**16) as uint16, which numpy sorts by radix (327,680 keys: 6 ms against timsort's
    28 ms), else torch's stable sort (9 ms)."""
    if keys.shape[0] and int(keys.min()) >= 0 and int(keys.max()) < 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return torch.sort(torch.from_numpy(np.ascontiguousarray(keys)), stable=True)[1].numpy()


def _fresh_rows(shape: tuple[int, int]) -> np.ndarray:
    return np.empty(shape, dtype=np.float32)


def _float32_rows(table: np.ndarray, flat: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """What the kernels read: (a C-contiguous float32 table, int64 flat [n], entry j's row).

    flat None: `table` holds the n entries' rows. A float32 table is used in place; a bfloat16 /
    float16 (or strided) one gives its rows that the entries read, each converted once."""
    if table.dtype == np.float32 and table.flags.c_contiguous:
        return table, (np.arange(n, dtype=np.int64) if flat is None else np.asarray(flat, dtype=np.int64))
    if flat is None:
        return np.ascontiguousarray(table, dtype=np.float32), np.arange(n, dtype=np.int64)
    unique, inverse = unique_inverse(np.asarray(flat, dtype=np.int64))
    return np.ascontiguousarray(table[unique], dtype=np.float32), inverse


def row_runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries grouped by row: (order int64 [n], a stable sort by row; starts int64 [U + 1], the run
    of each unique row in that order; unique sorted rows int64 [U])."""
    if rows.shape[0] <= 1 or bool((rows[1:] >= rows[:-1]).all()):
        order, sorted_rows = np.arange(rows.shape[0], dtype=np.int64), rows
    else:
        order = stable_argsort(rows)
        sorted_rows = rows[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_rows[1:] != sorted_rows[:-1], [True])))
    return order, starts.astype(np.int64, copy=False), sorted_rows[starts[:-1]]


def pooled_backward(values: np.ndarray, rows: np.ndarray, projector: np.ndarray, token_pos: np.ndarray,
                    scores: np.ndarray, grad_out: np.ndarray, *, flat: np.ndarray | None = None,
                    rows_out: Callable[[tuple[int, int]], np.ndarray] = _fresh_rows,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of pooling for n entries, with the row gradients already summed per row.

    values [R, d_v]: V before the update, either each entry's row (flat None, R = n) or a whole
    table whose row flat[j] is entry j's (flat int64 [n]: a float32 table is read in place, no
    gathered copy); rows int64 [n] (may repeat); projector/token_pos int64 [n] (entry j's dL/do is
    grad_out[token_pos_j, projector_j]); scores float32 [n, h]; grad_out float32 [T, E, d_v] ->
    (dL/ds float32 [n, h], unique sorted rows int64 [U], dL/dV float32 [U, d_v]) with
    dL/ds[j, c] = <dL/do[t_j, p_j, slice c], V[row_j, slice c]> and
    dL/dV[u, slice c] = sum_{j: row_j = u} s_c[j] * dL/do[t_j, p_j, slice c] (d_v splits into h slices).

    One compiled pass over the entries grouped by row (param_server.kernels.pooled_backward_into):
    each row's V is read once and its entries' terms summed in its own slot, never overwritten
    (DESIGN §8); chosen by measurement
    (docs/benchmarks.md "Memory path", bench/kernels_ab.py). `rows_out(shape)` gives the float32
    buffer dL/dV is written into (default: a fresh array; the shard passes its ScratchPool's).
    """
    n, h = scores.shape
    t, e, d_v = grad_out.shape
    if n == 0:
        return np.zeros((0, h), np.float32), np.zeros(0, np.int64), np.zeros((0, d_v), np.float32)
    values, flat = _float32_rows(values, flat, n)
    g = np.ascontiguousarray(grad_out, dtype=np.float32).reshape(t * e, d_v)
    g_flat = (token_pos * e + projector).astype(np.int64, copy=False)  # [n], entry j's row of g
    order, starts, unique = row_runs(np.asarray(rows, dtype=np.int64))
    grad_scores = np.empty((n, h), dtype=np.float32)
    grad_rows = rows_out((unique.shape[0], d_v))
    pooled_backward_into(values, flat, g, g_flat,
                         np.ascontiguousarray(scores, dtype=np.float32), order, starts, grad_scores, grad_rows)
    return grad_scores, unique, grad_rows


def pooled_sum(
    v: np.ndarray, projector: np.ndarray, token: np.ndarray, scores: np.ndarray, e: int,
    *, flat: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """IVE grouping + MCS weighting + pooling (DESIGN §3.1 steps 4-6).

    v [R, d_v]: the rows of the entries (flat None, R = n), or a whole table whose row flat[j] is
    entry j's (flat int64 [n]: no gathered copy of the rows is made for a float32 table);
    projector/token int64 [n], scores float32 [n, h], e = E ->
    (tokens touched, sorted unique int64 [Tt]; sums float32 [Tt, E, d_v]) with
    o[t, p, slice c] = sum_j [proj_j = p][token_j = t] * s_c[j] * v[row_j, slice c].

    One compiled pass over the entries (param_server.kernels.pooled_sum_into): each entry adds its
    weighted row into its (token, projector) slot of the answer, in entry order, and nothing is
    sorted or scattered. A client sends a shard its entries in token order, so the answer is written
    in order and the rows are read at random, the row a few entries ahead requested early (chosen by
    measurement, docs/benchmarks.md "Memory path").
    """
    n = token.shape[0]
    d_v = v.shape[1]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, e, d_v), np.float32)
    v, flat = _float32_rows(v, flat, n)
    tokens, token_pos = unique_inverse(np.asarray(token, dtype=np.int64))
    out = np.zeros((tokens.shape[0], e, d_v), dtype=np.float32)
    pooled_sum_into(v, flat, token_pos, np.asarray(projector, dtype=np.int64),
                    np.ascontiguousarray(scores, dtype=np.float32), out)
    return tokens, out


def pre_value_scores(pre: np.ndarray, q_p: np.ndarray, q_pos: np.ndarray, scores: np.ndarray, *,
                     flat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pre-value weights of n entries (DESIGN §3.3 item 3).

    pre [R, d_p]: P_tab of each entry's row (flat None, R = n), or the whole P_tab whose row flat[j]
    is entry j's (flat int64 [n]: a float32 table is read in place, no gathered copy); q_p float32
    [Tq, d_p]; q_pos int64 [n] (entry j's query is q_p[q_pos_j]); scores float32 [n, h] ->
    (a float32 [n] = <q_p[q_pos_j], P_tab[row_j]>, s' float32 [n, h] = a_j * s_j).

    One compiled pass (param_server.kernels.pre_value_scores_into); the dot products are summed in
    SIMD order, so a may differ from a numpy dot product in the last bits.
    """
    n = scores.shape[0]
    pre, flat = _float32_rows(pre, flat, n)
    a, weighted = np.empty(n, np.float32), np.empty(scores.shape, np.float32)
    pre_value_scores_into(pre, flat, np.ascontiguousarray(q_p, dtype=np.float32),
                          np.asarray(q_pos, dtype=np.int64), np.ascontiguousarray(scores, dtype=np.float32),
                          a, weighted)
    return a, weighted


def pre_value_backward(pre: np.ndarray, q_p: np.ndarray, q_pos: np.ndarray, rows: np.ndarray, scores: np.ndarray,
                       a: np.ndarray, grad_weighted: np.ndarray, *, flat: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Backward of `pre_value_scores` from dL/ds'.

    pre [R, d_p]: P_tab of each entry's row (flat None) or the whole P_tab with entry j's row at
    flat[j] (as in pre_value_scores); q_p float32 [Tq, d_p], q_pos int64 [n], rows int64 [n] (may
    repeat), scores float32 [n, h] (s, before weighting), a float32 [n], grad_weighted float32 [n, h]
    = dL/ds' ->
    (dL/ds float32 [n, h] = a_j * dL/ds'_j; dL/dq_p float32 [Tq, d_p] = sum_{j: q_pos_j = t} g_j * P_tab[row_j];
    unique sorted rows int64 [U]; dL/dP_tab float32 [U, d_p] = sum_{j: row_j = u} g_j * q_p[q_pos_j]),
    with g_j = dL/da_j = <s_j, dL/ds'_j>. Repeated tokens and rows are summed, never overwritten
    (DESIGN §8), in row order (stable) whatever order the entries came in: a client sends each shard
    its entries sorted by row, so one shard and the in-process backend add in the same order.
    One compiled pass (param_server.kernels.pre_value_backward_into).
    """
    n, d_p = scores.shape[0], q_p.shape[1]
    if n == 0:
        return (np.zeros(scores.shape, np.float32), np.zeros((q_p.shape[0], d_p), np.float32),
                np.zeros(0, np.int64), np.zeros((0, d_p), np.float32))
    pre, flat = _float32_rows(pre, flat, n)
    order, starts, unique = row_runs(np.asarray(rows, dtype=np.int64))
    grad_scores = np.empty((n, scores.shape[1]), np.float32)
    grad_q = np.empty((q_p.shape[0], d_p), np.float32)
    grad_pre = np.empty((unique.shape[0], d_p), np.float32)
    pre_value_backward_into(pre, flat, np.ascontiguousarray(q_p, dtype=np.float32),
                            np.asarray(q_pos, dtype=np.int64), np.ascontiguousarray(scores, dtype=np.float32),
                            np.ascontiguousarray(a, dtype=np.float32),
                            np.ascontiguousarray(grad_weighted, dtype=np.float32), order, starts, grad_scores,
                            grad_q, grad_pre)
    return grad_scores, grad_q, unique, grad_pre
