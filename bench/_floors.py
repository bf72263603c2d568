"""The floors of `ultramem bench memory-path` (bench/memory_path.py): each call type's work done in
one process on one thread by plain library calls (numpy, torch), against which the shards' CPU per
selection is measured.

  * the lookup floor: the better of numpy fancy indexing + a weighted sum and torch `embedding_bag`
    (sum mode, per_sample_weights); for V2 (`v2_forward`) V2's lookup with pre-values;
  * Gather's floor: a gather of the rows (numpy `take`, torch `index_select`);
  * the backward floor: dL/ds (and V2's dL/dq_p) and the duplicate-summed row gradients
    (`v1_backward`, `v1_backward_embedding_bag`, `v2_backward`);
  * the optimizer floor: the shard's lazy AdamW by torch ops on gathered rows (`adamw_library`).

Tests check each against the shard's own results (tests/orchestration/test_bench.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from param_server.optimizers import SparseOptimizerConfig

if TYPE_CHECKING:
    from bench.memory_path import Layer


def floor_cpu_s(table: np.ndarray, x: dict[str, np.ndarray], layer: Layer) -> dict[str, float]:
    """CPU seconds of the same pooled lookup by one plain library call, one thread: numpy fancy
    indexing (gather, then one weighted sum per token) and torch embedding_bag with weights."""
    n, tokens = x["rows"].shape[0], x["grad_out"].shape[0]
    w = x["scores"][:, 0].copy()
    t_table, t_rows, t_w = torch.from_numpy(table), torch.from_numpy(x["rows"]), torch.from_numpy(w)
    offsets = torch.arange(0, n, layer.per_token, dtype=torch.int64)
    with one_torch_thread():
        c0 = time.thread_time()
        torch.nn.functional.embedding_bag(t_rows, t_table, offsets, mode="sum", per_sample_weights=t_w)
        c1 = time.thread_time()
        g = table[x["rows"]].reshape(tokens, layer.per_token, layer.d_v)
        np.einsum("tkd,tk->td", g, w.reshape(tokens, layer.per_token))
        c2 = time.thread_time()
    return {"embedding_bag": c1 - c0, "numpy": c2 - c1}


def gather_floor_cpu_s(tables: list[np.ndarray], rows: np.ndarray) -> float:
    """CPU seconds of Gather's work by one plain library call per table, one thread: the better of
    numpy `take` and torch `index_select`, each into a reused buffer (the second call is timed)."""
    best = []
    for how in ("numpy", "torch"):
        total = 0.0
        for table in tables:
            out = np.empty((rows.size, table.shape[1]), table.dtype)
            call = partial(np.take, table, rows, axis=0, out=out) if how == "numpy" else partial(
                torch.index_select, torch.from_numpy(table), 0, torch.from_numpy(rows), out=torch.from_numpy(out))
            total += second_call_cpu_s(call)[0]
        best.append(total)
    return min(best)


def v2_forward(table: np.ndarray, pre: np.ndarray, x: dict[str, np.ndarray], layer: Layer, how: str) -> np.ndarray:
    """The V2 pooled lookup by plain library calls: float32 [T, d_v] = sum_j a_j * s_j,c * V[row_j, slice c],
    a_j = <q_p[t_j], P_tab[row_j]>. how: "numpy" (fancy indexing + einsum) or "embedding_bag" (torch:
    P_tab rows by index_select, the sum by embedding_bag over V viewed as [P * h, d_v / h])."""
    t, k, h, d_p = x["q_p"].shape[0], layer.per_token, layer.cores, layer.d_p
    c = layer.d_v // h
    if how == "numpy":
        p = pre[x["rows"]].reshape(t, k, d_p)
        a = np.einsum("tkd,td->tk", p, x["q_p"])  # (T, k)
        w = x["scores"].reshape(t, k, h) * a[..., None]  # (T, k, h)
        return np.einsum("tkhc,tkh->thc", table[x["rows"]].reshape(t, k, h, c), w).reshape(t, layer.d_v)
    rows = torch.from_numpy(x["rows"])
    p = torch.from_numpy(pre).index_select(0, rows).view(t, k, d_p)
    a = torch.bmm(p, torch.from_numpy(x["q_p"]).view(t, d_p, 1))  # (T, k, 1)
    w = (torch.from_numpy(x["scores"]).view(t, k, h) * a).transpose(1, 2).reshape(-1)  # bag (t, c): its k weights
    out = torch.nn.functional.embedding_bag(torch.from_numpy(x["bag_index"]), torch.from_numpy(table).view(-1, c),
                                            torch.from_numpy(x["bag_offsets"]), mode="sum", per_sample_weights=w)
    return out.view(t, layer.d_v).numpy()


def v2_backward(table: np.ndarray, pre: np.ndarray, x: dict[str, np.ndarray], layer: Layer
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The V2 pooled backward by plain library calls (torch, what PooledBackward computes before
    the update it queues): dL/do [T, 1, d_v] -> (dL/ds [n, h], dL/dq_p [T, d_p], unique rows [U],
    dL/dV [U, d_v], dL/dP_tab [U, d_p]), duplicate rows summed with index_add_."""
    t, k, h, d_p = x["q_p"].shape[0], layer.per_token, layer.cores, layer.d_p
    c = layer.d_v // h
    rows, q_p = torch.from_numpy(x["rows"]), torch.from_numpy(x["q_p"])
    s, go = torch.from_numpy(x["scores"]).view(t, k, h), torch.from_numpy(x["grad_out"]).view(t, 1, h, c)
    v = torch.from_numpy(table).index_select(0, rows).view(t, k, h, c)
    p = torch.from_numpy(pre).index_select(0, rows).view(t, k, d_p)
    a = torch.bmm(p, q_p.view(t, d_p, 1)).squeeze(-1)  # (T, k)
    g_w = (v * go).sum(-1)  # dL/ds' (T, k, h)
    g_a = (g_w * s).sum(-1)  # dL/da (T, k)
    grad_q = torch.bmm(g_a.unsqueeze(1), p).squeeze(1)  # (T, d_p)
    g_v = ((s * a.unsqueeze(-1)).unsqueeze(-1) * go).view(-1, layer.d_v)  # (n, d_v)
    g_p = (g_a.unsqueeze(-1) * q_p.unsqueeze(1)).view(-1, d_p)  # (n, d_p)
    unique, inverse = torch.unique(rows, return_inverse=True)
    grad_v = torch.zeros(unique.shape[0], layer.d_v).index_add_(0, inverse, g_v)
    grad_pre = torch.zeros(unique.shape[0], d_p).index_add_(0, inverse, g_p)
    return ((g_w * a.unsqueeze(-1)).view(-1, h).numpy(), grad_q.numpy(), unique.numpy(), grad_v.numpy(),
            grad_pre.numpy())


def v2_floor_cpu_s(table: np.ndarray, pre: np.ndarray, x: dict[str, np.ndarray], layer: Layer) -> dict[str, float]:
    """CPU seconds of the V2 lookup floors on one thread (numpy and embedding_bag), each timed on its
    second call (the first faults in its fresh buffers; the shard's legs run warm too)."""
    return {how: second_call_cpu_s(lambda how=how: v2_forward(table, pre, x, layer, how))[0]
            for how in ("embedding_bag", "numpy")}


def v1_backward(table: np.ndarray, x: dict[str, np.ndarray], layer: Layer
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The v1 pooled backward by plain library calls (torch, what PooledBackward computes before the
    update it queues): dL/do [T, E, d_v] -> (dL/ds [n, h], unique rows [U], dL/dV [U, d_v]), where
    dL/ds_c[j] = <V[row_j, slice c], dL/do[t_j, p_j, slice c]> and each row's gradient sums
    s_c[j] * dL/do[t_j, p_j, slice c] over its entries (index_add_)."""
    n, h = x["rows"].shape[0], layer.cores
    c = layer.d_v // h
    rows = torch.from_numpy(x["rows"])
    slot = torch.from_numpy(x["token"] * layer.pooled_e + x["projector"])
    go = torch.from_numpy(x["grad_out"]).view(-1, h, c).index_select(0, slot)  # (n, h, c)
    v = torch.from_numpy(table).index_select(0, rows).view(n, h, c)
    grad_s = (v * go).sum(-1)  # (n, h)
    g_v = (torch.from_numpy(x["scores"]).unsqueeze(-1) * go).view(n, layer.d_v)
    unique, inverse = torch.unique(rows, return_inverse=True)
    grad_v = torch.zeros(unique.shape[0], layer.d_v).index_add_(0, inverse, g_v)
    return grad_s.numpy(), unique.numpy(), grad_v.numpy()


def v1_backward_embedding_bag(table: np.ndarray, x: dict[str, np.ndarray], layer: Layer
                              ) -> Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """v1_backward's work by the autograd backward of torch's embedding_bag (sum mode, weights):
    the forward is made here, and the call returned runs its backward once -> (dL/ds [n, h],
    unique rows [U], dL/dV [U, d_v]). A bag is one (token, projector, slice c) slot of the answer,
    its entries rows of V viewed as [P * h, d_v / h]; dL/dV comes dense, its unique rows taken."""
    h = layer.cores
    c = layer.d_v // h
    cores = np.arange(h)
    key = ((x["token"] * layer.pooled_e + x["projector"])[:, None] * h + cores).reshape(-1)  # bag of each (j, c)
    order = np.argsort(key, kind="stable")
    bags = x["grad_out"].shape[0] * layer.pooled_e * h
    offsets = torch.from_numpy(np.searchsorted(key[order], np.arange(bags)))
    index = torch.from_numpy((x["rows"][:, None] * h + cores).reshape(-1)[order])
    grad_out = torch.from_numpy(x["grad_out"]).view(bags, c)
    unique = torch.unique(torch.from_numpy(x["rows"]))
    weights = torch.from_numpy(x["scores"]).clone().requires_grad_(True)  # (n, h)
    values = torch.from_numpy(table).view(-1, c).requires_grad_(True)
    with torch.enable_grad():
        out = torch.nn.functional.embedding_bag(index, values, offsets, mode="sum",
                                                per_sample_weights=weights.view(-1)[torch.from_numpy(order)])

    def backward() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out.backward(grad_out)
        assert weights.grad is not None and values.grad is not None
        return weights.grad.numpy(), unique.numpy(), values.grad.view(-1, layer.d_v).index_select(0, unique).numpy()

    return backward


def adamw_library(p: np.ndarray, m: np.ndarray, v: np.ndarray, t: np.ndarray, rows: np.ndarray,
                  grads: np.ndarray, lr: float, config: SparseOptimizerConfig) -> None:
    """The shard's lazy AdamW (param_server.kernels.adamw_rows: each row's own step count, decoupled
    decay) by torch ops on the rows gathered with index_select and written back with index_copy_:
    p, m, v float32 [P, d] and t int32 [P] in place; rows unique int64 [U], grads float32 [U, d]."""
    b1, b2 = config.beta1, config.beta2
    r, g = torch.from_numpy(rows), torch.from_numpy(grads)
    tp, tm, tv, tt = (torch.from_numpy(a) for a in (p, m, v, t))
    steps = tt.index_select(0, r) + 1
    mr = tm.index_select(0, r).mul_(b1).add_(g, alpha=1.0 - b1)
    vr = tv.index_select(0, r).mul_(b2).addcmul_(g, g, value=1.0 - b2)
    st = steps.to(torch.float64)  # bias corrections in float64, then float32 per row (as the kernel)
    step_size = (lr / (1.0 - torch.pow(b1, st))).to(torch.float32).unsqueeze(1)
    bc2_sqrt = torch.sqrt(1.0 - torch.pow(b2, st)).to(torch.float32).unsqueeze(1)
    denom = vr.sqrt().div_(bc2_sqrt).add_(config.eps)
    pr = tp.index_select(0, r).mul_(1.0 - lr * config.weight_decay).sub_(mr.div(denom).mul_(step_size))
    for dst, src in ((tp, pr), (tm, mr), (tv, vr), (tt, steps)):
        dst.index_copy_(0, r, src)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside (the floors are one-thread figures), its thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def second_call_cpu_s(call: Callable[[], Any]) -> tuple[float, Any]:
    """(thread CPU seconds of the second of two calls, on one torch thread; its result): the first
    faults in fresh buffers, and the shard's legs run warm too."""
    with one_torch_thread():
        call()
        c0 = time.thread_time()
        result = call()
        return time.thread_time() - c0, result


def work_floors_cpu_s(tables: list[np.ndarray], x: dict[str, np.ndarray], layer: Layer,
                      states: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, float]:
    """CPU seconds of the backward's and the optimizer step's own work by plain library calls, one
    thread: "backward" (the better of v1_backward and v1_backward_embedding_bag, or v2_backward
    with pre-values) and "optimizer" (adamw_library on the backward's unique rows of every table;
    `states`: the floor's (m, v, step) per table, stepped in place)."""
    if layer.d_p:
        backward_s, out = second_call_cpu_s(lambda: v2_backward(tables[0], tables[1], x, layer))
        updates = [(out[2], out[3]), (out[2], out[4])]
    else:  # the better of index_add_ and embedding_bag's backward (its forward made untimed)
        backward_s, out = second_call_cpu_s(lambda: v1_backward(tables[0], x, layer))
        graphs = iter([v1_backward_embedding_bag(tables[0], x, layer) for _ in range(2)])
        backward_s = min(backward_s, second_call_cpu_s(lambda: next(graphs)())[0])
        updates = [(out[1], out[2])]
    config = SparseOptimizerConfig()

    def step() -> None:
        for table, (m, v, t), (rows, grads) in zip(tables, states, updates, strict=True):
            adamw_library(table, m, v, t, rows, grads, 1e-3, config)

    optimizer_s, _ = second_call_cpu_s(step)
    return {"backward": backward_s, "optimizer": optimizer_s}


def bag_layout(x: dict[str, np.ndarray], layer: Layer) -> None:
    """Add embedding_bag's index and offsets for v2_forward: bag (t, c) holds row_j * h + c of token t's k entries."""
    t, k, h = x["q_p"].shape[0], layer.per_token, layer.cores
    x["bag_index"] = (x["rows"].reshape(t, 1, k) * h + np.arange(h).reshape(1, h, 1)).reshape(-1)
    x["bag_offsets"] = np.arange(0, t * h * k, k, dtype=np.int64)
