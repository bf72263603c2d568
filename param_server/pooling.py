"""The shard side of pooled lookups (DESIGN §3.1 steps 4-6, §4.2 PooledGather / PooledBackward):
IVE grouping by (token, projector), MCS weighting of d_v slices by the h core scores, and the
backward of both. Plain numpy; `LocalBackend` (model_workers/values.py) calls the same functions,
so local and remote pooled training share one formula.
"""

from __future__ import annotations

import numpy as np

from param_server.optimizers import segment_sum


def pool_keys(token: np.ndarray, projector: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort order of the n entries by (token, projector) and the group starts: ([n], [G])."""
    key = token * e + projector  # [n], < 2**63 (checked)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.concatenate(([0], np.flatnonzero(sorted_key[1:] != sorted_key[:-1]) + 1))
    return order, starts


def pooled_backward_terms(values: np.ndarray, grad_out: np.ndarray, scores: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Backward of pooling for n entries: values [n, d_v] (V of each entry's row, before the update),
    grad_out [n, d_v] (dL/do at each entry's (token, projector)), scores float32 [n, h] ->
    (dL/ds [n, h], dL/dV per entry [n, d_v]; rows may repeat). d_v splits into h slices (MCS)."""
    n, h = scores.shape
    d_v = values.shape[1]
    g = grad_out.reshape(n, h, d_v // h)  # [n, h, d_v/h]
    v = values.astype(np.float32, copy=False).reshape(n, h, d_v // h)
    grad_scores = np.einsum("nhk,nhk->nh", g, v)  # [n, h]
    grad_rows = (g * scores[:, :, None]).reshape(n, d_v)  # [n, d_v]
    return grad_scores.astype(np.float32, copy=False), grad_rows


def pooled_sum(
    v: np.ndarray, projector: np.ndarray, token: np.ndarray, scores: np.ndarray, e: int
) -> tuple[np.ndarray, np.ndarray]:
    """IVE grouping + MCS weighting + pooling (DESIGN §3.1 steps 4-6) over gathered rows.

    v [n, d_v] (rows of the entries), projector/token int64 [n], scores float32 [n, h], e = E ->
    (tokens touched, sorted unique int64 [Tt]; sums float32 [Tt, E, d_v]) with
    o[t, p, slice c] = sum_j [proj_j = p][token_j = t] * s_c[j] * v[j, slice c].
    """
    n, d_v = v.shape
    h = scores.shape[1]
    weighted = (v.astype(np.float32).reshape(n, h, d_v // h) * scores[:, :, None]).reshape(n, d_v)
    order, starts = pool_keys(token, projector, e)
    group_sums = segment_sum(np.take(weighted, order, axis=0), starts)  # [G, d_v]
    group_tok = token[order][starts]  # [G], ascending
    group_proj = projector[order][starts]
    new_token = np.concatenate(([True], group_tok[1:] != group_tok[:-1]))
    tokens = group_tok[new_token]  # [Tt]
    out = np.zeros((tokens.shape[0], e, d_v), dtype=np.float32)
    out[np.cumsum(new_token) - 1, group_proj] = group_sums  # each (token, projector) once
    return tokens, out
