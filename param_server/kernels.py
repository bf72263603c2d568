"""Compiled per-entry and per-row kernels of the shard's hot path (numba, one thread).

Four jobs, each in one pass over its data with no gathered copies:
  * `pooled_sum_into`: the pooled lookup (param_server.pooling.pooled_sum). Each entry j adds
    s_c[j] * V[row_j, slice c] into its (token, projector) slot of the answer, in entry order.
  * `pre_value_scores_into` / `pre_value_backward_into`: UltraMemV2's pre-value weights and their
    backward (param_server.pooling.pre_value_scores / pre_value_backward), P_tab read in place.
  * `pooled_backward_into`: the backward of pooling (param_server.pooling.pooled_backward). For each
    entry j it reads V[row_j] in the table itself and dL/do[token_j, projector_j], writes the h score
    gradients and adds s_c[j] * dL/do[.., slice c] into row_j's gradient slot (repeated rows summed).
  * `adamw_rows`, `adagrad_rows`, `sgd_rows`: one optimizer step per touched row, value, state and
    gradient read and written in place (param_server.optimizers).

Float32 math throughout, like the numpy formulas they replace; only the dot products of dL/ds are
reassociated (vectorised), so dL/ds may differ from numpy's in the last bits.

JIT cache: `cache=True` writes the compiled code next to this file (`param_server/__pycache__`) or,
when that is read-only (an installed package), under numba's user-wide cache directory
(`$NUMBA_CACHE_DIR`, else ~/.cache/numba or its platform equivalent). When no cache directory is
writable the kernels still work: they compile at the first call of each process.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
from llvmlite import ir, ir_layer_typed_pointers_enabled
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# dot products may be reassociated (SIMD); no other fast-math licence (NaN and inf keep their meaning)
_DOT_MATH = {"reassoc", "contract"}


def _jit(**kwargs):
    """numba.njit with the on-disk cache when a cache directory is writable, else without it.
    error_model="numpy": a float division by zero gives inf/nan (as numpy does) instead of a
    per-element check that raises, which would keep the loops from vectorising (6x, measured)."""

    def wrap(fn):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", numba.NumbaWarning)
                return numba.njit(cache=True, nogil=True, error_model="numpy", **kwargs)(fn)
        except (RuntimeError, numba.NumbaWarning):  # no writable cache locator: compile per process
            return numba.njit(cache=False, nogil=True, error_model="numpy", **kwargs)(fn)

    return wrap


# the intrinsic's name carries its pointer type: "p0i8" where llvmlite's IR layer writes typed
# pointers (i8*), "p0" where it writes opaque ones (ptr)
_PREFETCH_NAME = "llvm.prefetch.p0i8" if ir_layer_typed_pointers_enabled else "llvm.prefetch.p0"


@intrinsic
def _prefetch(typingctx, array, row, col):  # pragma: no cover (compiled)
    """Ask the CPU to start loading the cache line of array[row, col] (2-D): llvm.prefetch, a read,
    kept in every cache level. Only a hint: it changes no value and never faults."""

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        view = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, view, [args[1], args[2]], wraparound=False)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]), _PREFETCH_NAME)
        builder.call(hint, [builder.bitcast(pointer, byte_pointer), ir.Constant(i32, 0), ir.Constant(i32, 3),
                            ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


# the pooled kernels ask for the row of the entry _AHEAD places on while they work on one: a shard's
# entries come in token order (the pooled sum reads their V rows) and are taken in row order by the
# backward (which reads their dL/do rows), so those reads are random and would each wait for memory
_AHEAD = 4
_LINE_FLOATS = 16  # float32 values in a 64-byte cache line


@_jit(fastmath=_DOT_MATH)
def _pooled_backward(table, flat, g, g_flat, scores, order, starts, grad_scores, grad_rows):  # pragma: no cover
    h = scores.shape[1]
    d = table.shape[1]
    k = d // h
    n = order.shape[0]
    for u in range(starts.shape[0] - 1):  # one unique row: its entries are order[starts[u]:starts[u + 1]]
        out = grad_rows[u]
        out[:] = 0
        v = table[flat[order[starts[u]]]]  # read once, in place
        for e in range(starts[u], starts[u + 1]):
            if e + _AHEAD < n:
                ahead = g_flat[order[e + _AHEAD]]
                for i in range(0, d, _LINE_FLOATS):
                    _prefetch(g, ahead, i)
            j = order[e]
            go = g[g_flat[j]]
            s = scores[j]
            for c in range(h):
                v_c, go_c, out_c = v[c * k:(c + 1) * k], go[c * k:(c + 1) * k], out[c * k:(c + 1) * k]
                acc = np.float32(0.0)
                for i in range(k):
                    acc += go_c[i] * v_c[i]
                grad_scores[j, c] = acc
                s_c = s[c]
                for i in range(k):
                    out_c[i] += s_c * go_c[i]


@_jit(fastmath={"contract"})
def _pooled_sum(table, flat, token_pos, projector, scores, out):  # pragma: no cover
    h = scores.shape[1]
    d = table.shape[1]
    k = d // h
    n = flat.shape[0]
    for j in range(n):
        if j + _AHEAD < n:  # written out here and in _pre_value_scores: as a shared njit function
            ahead = flat[j + _AHEAD]  # it measured 1.3-2x slower on the small layer (d_v = 128)
            for i in range(0, d, _LINE_FLOATS):
                _prefetch(table, ahead, i)
        v, o, s = table[flat[j]], out[token_pos[j], projector[j]], scores[j]
        for c in range(h):
            s_c, v_c, o_c = s[c], v[c * k:(c + 1) * k], o[c * k:(c + 1) * k]
            for i in range(k):
                o_c[i] += s_c * v_c[i]


def _check_indices(kernel: str, *checks: tuple[str, np.ndarray, int]) -> None:
    """ValueError unless each (name, int array, bound) lies in [0, bound): the compiled loops index
    without checks, so a wrapper checks first and nothing is written on bad input."""
    for name, idx, bound in checks:
        if idx.shape[0] and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise ValueError(f"{kernel}: {name} outside [0, {bound})")


def pooled_sum_into(table: np.ndarray, flat: np.ndarray, token_pos: np.ndarray, projector: np.ndarray,
                    scores: np.ndarray, out: np.ndarray) -> None:
    """out[token_pos_j, projector_j, slice c] += scores[j, c] * table[flat_j, slice c] for every
    entry j in order: table float32 [R, d_v] (read in place), flat/token_pos/projector int64 [n],
    scores float32 [n, h], out float32 [T, E, d_v] (zeroed by the caller). The indices are checked
    here (the kernel does not check them): an index out of range is a ValueError, nothing written."""
    n = flat.shape[0]
    if not (token_pos.shape == projector.shape == (n,) and scores.shape[0] == n and table.shape[1] == out.shape[2]
            and table.shape[1] % scores.shape[1] == 0):
        raise ValueError("pooled_sum_into: mismatched shapes")
    _check_indices("pooled_sum_into", ("flat", flat, table.shape[0]), ("token_pos", token_pos, out.shape[0]),
                   ("projector", projector, out.shape[1]))
    _pooled_sum(table, flat, token_pos, projector, scores, out)


@_jit(fastmath=_DOT_MATH)
def _pre_value_scores(pre, flat, q_p, q_pos, scores, a, weighted):  # pragma: no cover
    d = pre.shape[1]
    n = flat.shape[0]
    for j in range(n):
        if j + _AHEAD < n:
            ahead = flat[j + _AHEAD]
            for i in range(0, d, _LINE_FLOATS):
                _prefetch(pre, ahead, i)
        p, q = pre[flat[j]], q_p[q_pos[j]]
        acc = np.float32(0.0)
        for i in range(d):
            acc += q[i] * p[i]
        a[j] = acc
        for c in range(scores.shape[1]):
            weighted[j, c] = acc * scores[j, c]


def pre_value_scores_into(pre: np.ndarray, flat: np.ndarray, q_p: np.ndarray, q_pos: np.ndarray,
                          scores: np.ndarray, a: np.ndarray, weighted: np.ndarray) -> None:
    """a[j] = <q_p[q_pos_j], pre[flat_j]> and weighted[j] = a[j] * scores[j] for every entry j:
    pre float32 [R, d_p] (read in place), flat/q_pos int64 [n], q_p float32 [Tq, d_p], scores float32
    [n, h]; a float32 [n] and weighted float32 [n, h] are written. Indices are checked here (a
    ValueError, nothing written), as in pooled_sum_into."""
    n = flat.shape[0]
    if not (q_pos.shape == a.shape == (n,) and scores.shape[0] == n and weighted.shape == scores.shape
            and q_p.shape[1] == pre.shape[1]):
        raise ValueError("pre_value_scores_into: mismatched shapes")
    _check_indices("pre_value_scores_into", ("flat", flat, pre.shape[0]), ("q_pos", q_pos, q_p.shape[0]))
    _pre_value_scores(pre, flat, q_p, q_pos, scores, a, weighted)


@_jit(fastmath=_DOT_MATH)
def _pre_value_backward(pre, flat, q_p, q_pos, scores, a, grad_weighted, order, starts,
                        grad_scores, grad_q, grad_pre):  # pragma: no cover
    h = scores.shape[1]
    d = pre.shape[1]
    grad_q[:] = 0
    for u in range(starts.shape[0] - 1):  # one unique row: its entries are order[starts[u]:starts[u + 1]]
        out = grad_pre[u]
        out[:] = 0
        p = pre[flat[order[starts[u]]]]  # read once, in place
        for e in range(starts[u], starts[u + 1]):
            j = order[e]
            g = np.float32(0.0)
            for c in range(h):
                g += scores[j, c] * grad_weighted[j, c]
                grad_scores[j, c] = a[j] * grad_weighted[j, c]
            q, gq = q_p[q_pos[j]], grad_q[q_pos[j]]
            for i in range(d):
                out[i] += g * q[i]
            for i in range(d):
                gq[i] += g * p[i]


def pre_value_backward_into(pre: np.ndarray, flat: np.ndarray, q_p: np.ndarray, q_pos: np.ndarray,
                            scores: np.ndarray, a: np.ndarray, grad_weighted: np.ndarray, order: np.ndarray,
                            starts: np.ndarray, grad_scores: np.ndarray, grad_q: np.ndarray,
                            grad_pre: np.ndarray) -> None:
    """Backward of pre_value_scores_into in one pass over the entries grouped by row (order int64 [n]
    sorts them by row, stably; starts int64 [U + 1] bounds each row's run): with g_j = <s_j, dL/ds'_j>,
    grad_scores[j] = a_j * dL/ds'_j, grad_q[q_pos_j] += g_j * pre[flat_j] and grad_pre[u] +=
    g_j * q_p[q_pos_j], summed in that order (repeats summed, never overwritten). grad_q [Tq, d_p] and
    grad_pre [U, d_p] need not be zeroed. Indices are checked here, as in pooled_sum_into."""
    n = flat.shape[0]
    if not (q_pos.shape == a.shape == order.shape == (n,) and scores.shape == grad_weighted.shape == grad_scores.shape
            and scores.shape[0] == n and grad_q.shape == q_p.shape and q_p.shape[1] == pre.shape[1]
            and grad_pre.shape == (starts.shape[0] - 1, pre.shape[1]) and starts.shape[0] >= 1):
        raise ValueError("pre_value_backward_into: mismatched shapes")
    _check_indices("pre_value_backward_into", ("flat", flat, pre.shape[0]), ("q_pos", q_pos, q_p.shape[0]),
                   ("order", order, n), ("starts", starts, n + 1))
    _pre_value_backward(pre, flat, q_p, q_pos, scores, a, grad_weighted, order, starts, grad_scores, grad_q, grad_pre)


def pooled_backward_into(table: np.ndarray, flat: np.ndarray, g: np.ndarray, g_flat: np.ndarray,
                         scores: np.ndarray, order: np.ndarray, starts: np.ndarray, grad_scores: np.ndarray,
                         grad_rows: np.ndarray) -> None:
    """table float32 [R, d_v] (entry j's row is table[flat[j]]), g float32 [T * E, d_v] (entry j's
    dL/do is g[g_flat[j]]), scores float32 [n, h]; order int64 [n] sorts the entries by row (stable)
    and starts int64 [U + 1] bounds each unique row's run in that order ->
    grad_scores float32 [n, h] and grad_rows float32 [U, d_v], both written (need not be zeroed).
    Each unique row's V is read once and its gradient summed in a row-sized accumulator."""
    _pooled_backward(table, flat, g, g_flat, scores, order, starts, grad_scores, grad_rows)


@_jit()
def _adamw(p, exp_avg, exp_avg_sq, step, rows, grads, lr, b1, b2, eps, decay):  # pragma: no cover
    d = p.shape[1]
    one_b1 = np.float32(1.0) - b1
    one_b2 = np.float32(1.0) - b2
    for u in range(rows.shape[0]):
        r = rows[u]
        t = step[r] + 1
        step[r] = t
        # bias corrections in float64 (as torch does with Python floats), then float32 per row
        bc1 = 1.0 - math.pow(np.float64(b1), t)
        bc2_sqrt = np.float32(math.sqrt(1.0 - math.pow(np.float64(b2), t)))
        step_size = np.float32(lr / bc1)
        pr, mr, vr, gr = p[r], exp_avg[r], exp_avg_sq[r], grads[u]
        for i in range(d):
            gi = gr[i]
            m = mr[i] * b1 + gi * one_b1
            v = vr[i] * b2 + (gi * gi) * one_b2
            mr[i] = m
            vr[i] = v
            pr[i] = pr[i] * decay - m / (math.sqrt(v) / bc2_sqrt + eps) * step_size


@_jit()
def _adagrad(p, sum_sq, rows, grads, lr, eps, decay):  # pragma: no cover
    d = p.shape[1]
    for u in range(rows.shape[0]):
        r = rows[u]
        gr = grads[u]
        sq = np.float32(0.0)
        for i in range(d):
            sq += gr[i] * gr[i]
        acc = sum_sq[r] + sq / np.float32(d)
        sum_sq[r] = acc
        denom = math.sqrt(acc) + eps
        pr = p[r]
        for i in range(d):
            pr[i] = pr[i] * decay - lr * gr[i] / denom


@_jit()
def _sgd(p, rows, grads, lr, decay):  # pragma: no cover
    d = p.shape[1]
    for u in range(rows.shape[0]):
        pr, gr = p[rows[u]], grads[u]
        for i in range(d):
            pr[i] = pr[i] * decay - lr * gr[i]


def adamw_rows(p: np.ndarray, exp_avg: np.ndarray, exp_avg_sq: np.ndarray, step: np.ndarray, rows: np.ndarray,
               grads: np.ndarray, lr: float, beta1: float, beta2: float, eps: float, decay: float) -> None:
    """Lazy AdamW on p[rows] (float32 [N, d_v]) and its state, in place; rows unique int64 [U],
    grads float32 [U, d_v]; decay = 1 - lr * weight_decay."""
    f = np.float32
    _adamw(p, exp_avg, exp_avg_sq, step, rows, grads, float(lr), f(beta1), f(beta2), f(eps), f(decay))


def adagrad_rows(p: np.ndarray, sum_sq: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float, eps: float,
                 decay: float) -> None:
    """Row-wise Adagrad on p[rows] and sum_sq[rows], in place (see adamw_rows for the arguments)."""
    f = np.float32
    _adagrad(p, sum_sq, rows, grads, f(lr), f(eps), f(decay))


def sgd_rows(p: np.ndarray, rows: np.ndarray, grads: np.ndarray, lr: float, decay: float) -> None:
    """SGD on p[rows], in place (see adamw_rows for the arguments)."""
    _sgd(p, rows, grads, np.float32(lr), np.float32(decay))


_warm = False


def warm_up() -> None:
    """Load (or compile) every kernel now, once per process, on tiny inputs: a shard calls this at
    start so its first request does not pay the JIT cost and its idle RSS holds the compiled code
    (~30 MB of LLVM runtime, measured). ~0.3 s of CPU with the on-disk cache, ~1-2 s without."""
    global _warm
    if _warm:
        return
    f32, i64 = np.float32, np.int64
    table, rows, one = np.zeros((1, 2), f32), np.zeros(1, i64), np.zeros(1, f32)
    for read_only in range(4):  # numba compiles read-only arrays apart: scores viewed in a request, tables
        values, scores = table.copy(), np.zeros((1, 1), f32)
        values.flags.writeable, scores.flags.writeable = not read_only & 1, not read_only & 2
        pooled_sum_into(values, rows, rows, rows, scores, np.zeros((1, 1, 2), f32))
        pre_value_scores_into(values, rows, table, rows, scores, np.zeros(1, f32), np.zeros((1, 1), f32))
        pre_value_backward_into(values, rows, table, rows, scores, one, scores, rows, np.array([0, 1], i64),
                                np.zeros((1, 1), f32), np.zeros((1, 2), f32), np.zeros((1, 2), f32))
    pooled_backward_into(table, rows, table, rows, np.zeros((1, 1), f32), rows, np.array([0, 1], i64),
                         np.zeros((1, 1), f32), np.zeros((1, 2), f32))
    adamw_rows(table, table.copy(), table.copy(), np.zeros(1, np.int32), rows, table, 0.0, 0.9, 0.95, 1e-8, 1.0)
    adagrad_rows(table, one, rows, table, 0.0, 1e-8, 1.0)
    sgd_rows(table, rows, table, 0.0, 1.0)
    _warm = True
