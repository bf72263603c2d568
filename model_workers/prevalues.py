"""PEER-style pre-values of UltraMemV2 (DESIGN §3.3 item 3, arXiv 2508.18756).

Beside the value table V [P, d_v] each memory layer has a second sparse table, the pre-values
P_tab [P, d_p] (same rows, same partitions). A token's projected query q_p = x·W_p (W_p: D -> d_p on
the worker, no activation) weighs each selected physical row by

    a_j = ⟨q_p[t], P_tab[row_j]⟩,

and a_j multiplies the slot's core scores: s'_c[j] = a_j · s_c[j]. Pooling (DESIGN §3.1 step 6) then
runs unchanged with s' in place of s, so a pooled backend needs nothing new: it sees weighted scores.

Init (DESIGN §3.3 item 4): W_p ~ N(0, 1/D) and P_tab ~ N(0, 1/d_p), so that for a unit-RMS input a_j has
unit variance at init; the value table's σ then sets the output scale (the ffn_matched calibration
of MemoryLayer counts E[a_j²] = σ_p²·|q_p|² in).

Legend: T tokens, J = H*m selected slots per token, d_p pre-value width, h cores.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pre_value_std(d_p: int) -> float:
    """σ of the pre-value table: 1/√d_p, so ⟨q_p, P_tab[row]⟩ has the variance of one q_p element."""
    return d_p**-0.5


def pre_value_weight(q_p: Tensor, pre_values: Tensor) -> Tensor:
    """q_p [T, d_p], pre_values [T, J, d_p] (the selected rows of P_tab) -> a [T, J] = ⟨q_p[t], P_tab[row_j]⟩."""
    dtype = torch.promote_types(q_p.dtype, pre_values.dtype)
    return torch.einsum("td,tjd->tj", q_p.to(dtype), pre_values.to(dtype))


def weight_scores(scores: Tensor, weight: Tensor) -> Tensor:
    """scores [T, J, h], a [T, J] -> s' [T, J, h] = a_j · s_c[j] (every core of a slot gets its row's a_j)."""
    dtype = torch.promote_types(scores.dtype, weight.dtype)
    return scores.to(dtype) * weight.to(dtype).unsqueeze(-1)
