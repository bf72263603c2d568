"""Implicit value expansion, multi-core scoring and pooling (DESIGN §3.1 steps 4-6, paper §3.3).

IVE: E·P virtual slots share P physical rows. A fixed random permutation π of [0, E·P) (a saved
buffer, the same on every worker) maps virtual slot g to g' = π(g); the **physical row** is g' mod P
and the **projector** is g' div P. Virtual value g' is V[g' mod P] · W_{g' div P}; summing the
selected rows per projector first and applying W_out = [W_0; ...; W_{E-1}] once is the same thing.

MCS: a value row is h slices of d_v/h; slice c is weighted by the core score s_c.

Legend: T tokens, J = H*m selected slots per token, E projectors, h cores, d_v value width.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
