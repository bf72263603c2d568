"""Implicit value expansion, multi-core scoring and pooling (DESIGN §3.1 steps 4-6, paper §3.3).

IVE: E·P virtual slots share P physical rows. A fixed random permutation π of [0, E·P) (a saved
buffer, the same on every worker) maps virtual slot g to g' = π(g); the **physical row** is g' mod P
and the **projector** is g' div P. Virtual value g' is V[g' mod P] · W_{g' div P}; summing the
selected rows per projector first and applying W_out = [W_0; ...; W_{E-1}] once is the same thing.

MCS: a value row is h slices of d_v/h; slice c is weighted by the core score s_c.

Two ways to run steps 5-6 (`MemoryConfig.lookup`): rows mode fetches the selected rows and pools
them here (`pooled_sum`, autograd gives the row gradients, pushed after backward); pooled mode
(`pooled_lookup`) lets the value backend pool where the table lives and exchanges only partial
sums [T, E, d_v] and score gradients [T*J, h] (DESIGN §4.2 PooledGather / PooledBackward); with
UltraMemV2 pre-values also the projected queries q_p [T, d_p] out and dL/dq_p back (DESIGN §3.3).

Legend: T tokens, J = H*m selected slots per token, E projectors, h cores, d_v value width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from model_workers.transfer import HostStaging

if TYPE_CHECKING:  # pragma: no cover
    from model_workers.values import ValueBackend


def make_permutation(num_virtual: int, seed: int, identity: bool = False) -> Tensor:
    """π of [0, E·P) as int64 [E·P], drawn from ``seed`` (identity when IVE is off)."""
    if identity:
        return torch.arange(num_virtual, dtype=torch.int64)
    return torch.randperm(num_virtual, generator=torch.Generator().manual_seed(seed))


def split_virtual(virtual_index: Tensor, permutation: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """virtual_index int64 [...] -> (physical_row = π(g) mod P, projector = π(g) div P), both [...]."""
    permuted = permutation[virtual_index]
    return permuted % num_rows, permuted // num_rows


def mcs_weight(values: Tensor, scores: Tensor) -> Tensor:
    """Multi-core scoring: values [T, J, d_v], scores [T, J, h] -> slice-weighted values [T, J, d_v]."""
    t, j, d_v = values.shape
    h = scores.shape[-1]
    sliced = values.view(t, j, h, d_v // h) * scores.unsqueeze(-1)  # (T, J, h, d_v/h)
    return sliced.view(t, j, d_v)


def pool(weighted: Tensor, projector: Tensor, e: int) -> Tensor:
    """Sum weighted rows per projector: weighted [T, J, d_v], projector [T, J] -> o [T, E, d_v]."""
    t, j, d_v = weighted.shape
    slot = (torch.arange(t, device=projector.device).unsqueeze(1) * e + projector).reshape(-1)  # (T*J,)
    out = weighted.new_zeros(t * e, d_v).index_add(0, slot, weighted.reshape(t * j, d_v))
    return out.view(t, e, d_v)


def pooled_sum(values: Tensor, projector: Tensor, scores: Tensor, e: int) -> Tensor:
    """MCS + pooling in one batched matmul (no [T, J, d_v] weighted copy).

    values [T, J, d_v], projector int64 [T, J], scores [T, J, h] -> o [T, E, d_v] with
    o[t, p, slice c] = sum_j [projector[t, j] = p] * scores[t, j, c] * values[t, j, slice c].
    """
    t, j, d_v = values.shape
    h = scores.shape[-1]
    dtype = torch.promote_types(values.dtype, scores.dtype)
    onehot = torch.nn.functional.one_hot(projector, e).to(dtype)  # (T, J, E)
    weight = onehot.unsqueeze(-1) * scores.to(dtype).unsqueeze(2)  # (T, J, E, h)
    sliced = values.to(dtype).view(t, j, h, d_v // h)  # (T, J, h, d_v/h)
    out = torch.einsum("tjec,tjcd->tecd", weight, sliced)  # (T, E, h, d_v/h)
    return out.reshape(t, e, d_v)


class _PooledLookup(torch.autograd.Function):
    """Steps 5-6 done where the values live: forward = partial sums, backward = dL/ds + row update.

    Each direction makes one device-to-host copy (model_workers/transfer.py): forward the rows,
    projectors and scores, backward the same with dL/do (kept on the device in between, so a second
    forward before this backward cannot overwrite them), and one non_blocking copy of the answer back.
    """

    @staticmethod
    def forward(ctx, scores: Tensor, q_p: Tensor | None, backend: ValueBackend, table: str, pre_table: str | None,
                rows: Tensor, projector: Tensor, token: Tensor, num_tokens: int, e: int,
                staging: HostStaging) -> Tensor:  # type: ignore[override]
        scores32 = scores.detach().float()  # (n, h), on the device
        q32 = q_p.detach().float() if q_p is not None else None  # (T, d_p), on the device
        host = staging.to_host("lookup", rows, projector, scores32, *(() if q32 is None else (q32,)))
        pre = {} if q32 is None else {"pre_table": pre_table, "q_p": host[3]}  # the shard scores pre-values
        out = backend.pooled(table, host[0], host[1], token, host[2], num_tokens, e, **pre)  # (T, E, d_v)
        ctx.backend, ctx.table, ctx.pre_table, ctx.staging = backend, table, pre_table, staging
        ctx.lookup = (rows, projector, token, scores32, q32)
        ctx.dtypes = (scores.dtype, q_p.dtype if q_p is not None else None)
        return staging.to_device("answer", out, scores.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, projector, token, scores32, q32 = ctx.lookup
        extra = () if q32 is None else (q32,)
        host = ctx.staging.to_host("backward", rows, projector, scores32, grad_out.detach().float(), *extra)
        rows_h, proj_h, scores_h, grad_h = host[:4]
        grad_q = None
        # the backend also updates the rows: dL/dV[row_j, slice c] = s_c[j] * dL/do[t_j, p_j, slice c]
        if q32 is None:
            grad_scores = ctx.backend.pooled_backward(ctx.table, rows_h, proj_h, token, scores_h, grad_h)  # (n, h)
        else:  # ... and P_tab's rows (DESIGN §3.3): dL/dq_p [T, d_p] comes back too
            grad_scores, grad_q = ctx.backend.pooled_backward_pre(ctx.table, ctx.pre_table, rows_h, proj_h, token,
                                                                  scores_h, host[4], grad_h)
            grad_q = ctx.staging.to_device("grad_q_p", grad_q, q32.device).to(ctx.dtypes[1])
        grad_scores = ctx.staging.to_device("grad_scores", grad_scores, scores32.device).to(ctx.dtypes[0])
        return grad_scores, grad_q, None, None, None, None, None, None, None, None, None


def pooled_lookup(backend: ValueBackend, table: str, rows: Tensor, projector: Tensor, scores: Tensor,
                  e: int, *, staging: HostStaging | None = None, pre_table: str | None = None,
                  q_p: Tensor | None = None) -> Tensor:
    """Pooled mode (DESIGN §4.2): MCS + pooling by the backend, where the table lives.

    rows/projector int64 [T, J], scores [T, J, h] -> o float32 [T, E, d_v], differentiable in the scores.
    The backend gets (row, projector, token, scores) per selected slot and answers the sums of step 6;
    backward sends dL/do and gets dL/ds back, and the backend queues the rows' update at the step and
    value LR of its last `begin_step` (no raw rows ever reach the worker). `staging`: the layer's
    host buffers (a fresh set when None). With pre-values (DESIGN §3.3), q_p [T, d_p] (differentiable)
    and `pre_table` go to the backend, which weighs each slot by <q_p[t], P_tab[row]> where the tables
    live and answers dL/dq_p in the backward.
    """
    t, j = rows.shape
    token = torch.arange(t, dtype=torch.int64).repeat_interleave(j)  # (T*J,), made on the host
    flat_rows = rows.reshape(-1).to(torch.int64)  # (T*J,), on the device
    flat_proj = projector.reshape(-1).to(torch.int64)
    flat_scores = scores.reshape(t * j, scores.shape[-1])  # (T*J, h)
    staging = staging if staging is not None else HostStaging()
    out = _PooledLookup.apply(flat_scores, q_p, backend, table, pre_table, flat_rows, flat_proj, token, t, e,
                              staging)
    return out  # (T, E, d_v)
