"""A/B of the shard's compute kernels against their numpy/torch predecessors, in one process.

    nice -n 19 .venv/bin/python bench/kernels_ab.py [--repeats 7] [--out bench/results]

On the paper-shaped layer of `bench/memory_path.py` (H=2 x m=80 = 160 selections per token, E=4,
h=2, d_v=384, P=65,536 rows), 2048 and 64 tokens per step. Legs interleaved repeat by repeat, CPU
time of this thread (`time.thread_time`, torch on one thread), medians of the repeats:
  * floor: one-thread torch `embedding_bag` sum with per_sample_weights over the same rows/weights
    (the memory-path benchmark's floor);
  * pooled_sum, before: a stable sort of the (token, projector) keys, one `embedding_bag` per d_v slice
    and a scatter into [T, E, d_v] (frozen below as `_pooled_sum_embedding_bag`); now:
    `param_server.pooling.pooled_sum` (the compiled pass with prefetching), entries in token order as a
    shard gets them;
  * pooled_backward, before: the gathered copy of V (as the shard reads it) + the numpy/embedding_bag
    formula (frozen below as `_pooled_backward_numpy`);
  * pooled_backward, now: `param_server.pooling.pooled_backward` reading the table in place, and on a
    gathered copy (the path a shard with rows beyond RAM takes);
  * optimizer step (lazy AdamW on the step's unique rows), before: the numpy formula (frozen below as
    `_adamw_numpy`); now: `param_server.optimizers.LazyAdamW` (the fused per-row kernel).
Prints CPU-s per million selections and ratios, writes <out>/kernels_ab.json (git-ignored scratch).
The first call of each kernel (JIT compile or cache load) is timed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROWS, D_V, PER_TOKEN, E, H = 65_536, 384, 160, 4, 2


def _pooled_backward_numpy(values, rows, projector, token_pos, scores, grad_out):
    """The formula this replaced (numpy gather + einsum for dL/ds, one embedding_bag per slice)."""
    n, h = scores.shape
    t, e, d_v = grad_out.shape
    k = d_v // h
    g_flat = token_pos * e + projector
    g = np.ascontiguousarray(grad_out, dtype=np.float32).reshape(t * e, d_v)
    v = values.astype(np.float32, copy=False).reshape(n, h, k)
    grad_scores = np.einsum("nhk,nhk->nh", g[g_flat].reshape(n, h, k), v)
    order = None
    if n > 1 and not bool((rows[1:] >= rows[:-1]).all()):
        order = np.argsort(rows, kind="stable")
    sorted_rows = rows if order is None else rows[order]
    starts = np.concatenate(([0], np.flatnonzero(sorted_rows[1:] != sorted_rows[:-1]) + 1)).astype(np.int64)
    idx = g_flat if order is None else g_flat[order]
    s = scores if order is None else scores[order]
    table = torch.from_numpy(g).view(t * e * h, k)
    offsets = torch.from_numpy(starts)
    summed = np.empty((starts.shape[0], h, k), dtype=np.float32)
    summed_t = torch.from_numpy(summed)
    for c in range(h):
        summed_t[:, c] = F.embedding_bag(torch.from_numpy(idx * h + c), table, offsets, mode="sum",
                                         per_sample_weights=torch.from_numpy(s[:, c].astype(np.float32)))
    return grad_scores.astype(np.float32, copy=False), sorted_rows[starts], summed.reshape(-1, d_v)


def _pooled_sum_embedding_bag(v, projector, token, scores, e, flat):
    """The pooled sum this replaced: sort by (token, projector), embedding_bag per slice, scatter."""
    from param_server.pooling import stable_argsort

    h, d_v = scores.shape[1], v.shape[1]
    k = d_v // h
    key = token * e + projector
    order = stable_argsort(key)
    key, idx, s = key[order], flat[order], scores[order]
    starts = np.concatenate(([0], np.flatnonzero(key[1:] != key[:-1]) + 1)).astype(np.int64)
    table = torch.from_numpy(v).view(v.shape[0] * h, k)
    sums = np.empty((starts.shape[0], h, k), dtype=np.float32)
    sums_t = torch.from_numpy(sums)
    for c in range(h):
        sums_t[:, c] = F.embedding_bag(torch.from_numpy(idx * h + c), table, torch.from_numpy(starts), mode="sum",
                                       per_sample_weights=torch.from_numpy(s[:, c].copy()))
    group_key = key[starts]
    group_tok, group_proj = group_key // e, group_key % e
    new_token = np.concatenate(([True], group_tok[1:] != group_tok[:-1]))
    tokens = group_tok[new_token]
    out = np.zeros((tokens.shape[0], e, d_v), dtype=np.float32)
    out[np.cumsum(new_token) - 1, group_proj] = sums.reshape(-1, d_v)
    return tokens, out


def _adamw_numpy(values, state, rows, grads, lr, b1=0.9, b2=0.95, eps=1e-8):
    """The lazy AdamW this replaced (gathers, ~12 elementwise passes, scatters); no weight decay."""
    g = grads
    t = state["step"][rows].astype(np.int64) + 1
    m = state["exp_avg"][rows]
    v = state["exp_avg_sq"][rows]
    tmp = np.multiply(g, np.float32(1 - b1))
    m *= np.float32(b1)
    m += tmp
    np.multiply(g, g, out=tmp)
    tmp *= np.float32(1 - b2)
    v *= np.float32(b2)
    v += tmp
    bc1 = 1.0 - np.power(b1, t, dtype=np.float64)
    bc2_sqrt = np.sqrt(1.0 - np.power(b2, t, dtype=np.float64))
    step_size = (lr / bc1).astype(np.float32)[:, None]
    np.sqrt(v, out=tmp)
    tmp /= bc2_sqrt.astype(np.float32)[:, None]
    tmp += np.float32(eps)
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p = values[rows]
    p -= tmp
    state["exp_avg"][rows] = m
    state["exp_avg_sq"][rows] = v
    state["step"][rows] = t.astype(state["step"].dtype)
    values[rows] = p


def _inputs(tokens: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = tokens * PER_TOKEN
    return {"rows": rng.integers(0, ROWS, n, dtype=np.int64),
            "projector": rng.integers(0, E, n, dtype=np.int64),
            "token": np.repeat(np.arange(tokens, dtype=np.int64), PER_TOKEN),
            "scores": rng.standard_normal((n, H), dtype=np.float32),
            "grad_out": rng.standard_normal((tokens, E, D_V), dtype=np.float32) * 1e-3}


def _gathered_numpy(table, rows, *args):
    return _pooled_backward_numpy(table[rows], rows, *args)  # the shard's read, then the old formula


def _gathered_now(table, rows, *args):
    from param_server.pooling import pooled_backward

    return pooled_backward(table[rows], rows, *args)  # a gathered copy (rows beyond RAM)


def _cpu(fn) -> float:
    c0 = time.thread_time()
    fn()
    return time.thread_time() - c0


def run(repeats: int, out_dir: Path) -> dict:
    from param_server.optimizers import LazyAdamW, SparseOptimizerConfig
    from param_server.pooling import pooled_backward, pooled_sum

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, D_V), dtype=np.float32) * 0.02
    state = {"exp_avg": np.zeros((ROWS, D_V), np.float32), "exp_avg_sq": np.zeros((ROWS, D_V), np.float32),
             "step": np.zeros(ROWS, np.int32)}
    adamw = LazyAdamW(SparseOptimizerConfig())
    x0 = _inputs(64, 1)
    first = {"pooled_sum": _cpu(lambda: pooled_sum(table, x0["projector"], x0["token"], x0["scores"], E,
                                                   flat=x0["rows"])),
             "pooled_backward": _cpu(lambda: pooled_backward(table, x0["rows"], x0["projector"], x0["token"],
                                                              x0["scores"], x0["grad_out"], flat=x0["rows"])),
             "adamw": _cpu(lambda: adamw.step(table.copy(), {k: a.copy() for k, a in state.items()},
                                              np.unique(x0["rows"]), np.ones((np.unique(x0["rows"]).size, D_V),
                                                                               np.float32), 1e-3))}
    results: dict = {"first_call_cpu_s": first, "shape": {"rows": ROWS, "d_v": D_V, "per_token": PER_TOKEN,
                                                           "E": E, "h": H}, "repeats": repeats}
    for tokens in (2048, 64):
        per: dict[str, list[float]] = {}
        for rep in range(repeats):
            x = _inputs(tokens, 100 + rep)
            n = x["rows"].shape[0]
            rows, proj, tok, s, g_out = x["rows"], x["projector"], x["token"], x["scores"], x["grad_out"]
            flat, offsets, w = torch.from_numpy(rows), torch.arange(0, n, PER_TOKEN), torch.from_numpy(s[:, 0].copy())
            legs = {
                "floor": partial(F.embedding_bag, flat, torch.from_numpy(table), offsets, mode="sum",
                                 per_sample_weights=w),
                "ps_before": partial(_pooled_sum_embedding_bag, table, proj, tok, s, E, rows),
                "ps_now": partial(pooled_sum, table, proj, tok, s, E, flat=rows),
                "pb_before": partial(_gathered_numpy, table, rows, proj, tok, s, g_out),
                "pb_now_in_place": partial(pooled_backward, table, rows, proj, tok, s, g_out, flat=rows),
                "pb_now_gathered": partial(_gathered_now, table, rows, proj, tok, s, g_out),
            }
            for name, fn in legs.items():
                per.setdefault(name, []).append(_cpu(fn) / n * 1e6)
            _, unique, grads = pooled_backward(table, rows, proj, tok, s, g_out, flat=rows)
            grads *= 1e-2
            opt_legs = {"opt_before": partial(_adamw_numpy, table, state, unique, grads, 1e-3),
                        "opt_now": partial(adamw.step, table, state, unique, grads, 1e-3)}
            for name, fn in opt_legs.items():
                per.setdefault(name, []).append(_cpu(fn) / n * 1e6)
        med = {k: statistics.median(v) for k, v in per.items()}
        fl = med["floor"]
        results[str(tokens)] = {"cpu_s_per_m_selections": med,
                                "ratio_to_floor": {k: v / fl for k, v in med.items()},
                                "speedup": {"pooled_sum": med["ps_before"] / med["ps_now"],
                                            "pooled_backward": med["pb_before"] / med["pb_now_in_place"],
                                            "pooled_backward_gathered": med["pb_before"] / med["pb_now_gathered"],
                                            "optimizer_step": med["opt_before"] / med["opt_now"]}}
        print(f"{tokens} tokens x {PER_TOKEN} selections, CPU-s per million selections (median of {repeats}):")
        for k, v in med.items():
            print(f"  {k:18s} {v:8.4f}  {v / fl:6.2f}x floor")
        print("  speedups: " + ", ".join(f"{k} {v:.2f}x" for k, v in results[str(tokens)]["speedup"].items()))
    print("first call CPU-s (JIT compile or cache load): " + ", ".join(f"{k} {v:.2f}" for k, v in first.items()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels_ab.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args()
    run(a.repeats, a.out)
