"""Additive product-key retrieval, the PKM baseline (Lample et al. 2019; DESIGN §3, ablation row 1).

Slot (i, j) scores s_row[i] + s_col[j]. Because the sum is monotone in both parts, the top-m over all
n_row * n_col slots lies inside (top-m rows) x (top-m cols), so this search is exact: take top-m per
side, score the m x m grid, keep its top-m. Used when MemoryConfig.tucker_rank == 0.

Legend: T tokens, H heads, n_row/n_col sub-keys per side, m top-m.
"""

from __future__ import annotations

import torch
from torch import Tensor


def product_key_topk(s_row: Tensor, s_col: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Exact additive product-key top-m.

    Args:
        s_row, s_col: sub-key scores [T, H, n_row], [T, H, n_col].
        m: top-m per head (<= n_row, n_col).
    Returns:
        virtual_index int64 [T, H, m] (= i_row * n_col + i_col, best first) and scores [T, H, m]
        (= s_row[i_row] + s_col[i_col], differentiable w.r.t. both score tensors).
    """
    n_col = s_col.shape[2]
    with torch.no_grad():
        top_row = s_row.detach().topk(m, dim=-1)  # (T, H, m)
        top_col = s_col.detach().topk(m, dim=-1)
        grid = top_row.values.unsqueeze(-1) + top_col.values.unsqueeze(-2)  # (T, H, m, m)
        best = grid.flatten(2).topk(m, dim=-1).indices  # (T, H, m)
        win_row = top_row.indices.gather(2, best // m)
        win_col = top_col.indices.gather(2, best % m)
    scores = s_row.gather(2, win_row) + s_col.gather(2, win_col)
    return win_row * n_col + win_col, scores


def brute_force_product_keys(s_row: Tensor, s_col: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Reference: top-m over every slot -> virtual_index [T, H, m], scores [T, H, m]."""
    grid = s_row.unsqueeze(-1) + s_col.unsqueeze(-2)  # (T, H, n_row, n_col)
    top = grid.flatten(2).topk(m, dim=-1)
    return top.indices, top.values
