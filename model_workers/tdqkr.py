"""Tucker-decomposed query-key retrieval, TDQKR (DESIGN §3.1 steps 2-3, paper §3.2).

The score of virtual slot (i, j) for head h is the bilinear form
    G[i, j] = sum_c  S_row[i, :] · C_c · S_col[j, :]^T
with per-rank key scores S_row [T, H, n_row, r], S_col [T, H, n_col, r] and h Tucker cores C_c [H, r, r]
(multi-core scoring keeps the per-core parts s_c apart). Searching all n_row * n_col slots is too
expensive, so candidates come from the rank-1 shortcut: u, v = leading singular vectors of sum_c C_c
(fp32 SVD, detached buffers refreshed once per optimizer step, sign aligned with the previous step),
top-m of S_row·u and of S_col·v, then the exact m x m grid is rescored and its top-m kept. The filter
is exact for rank-1 cores with non-negative filter scores; otherwise `recall` measures how close it is.

The signed filter (`signed=True`, `MemoryConfig.tdqkr_filter = "signed"`, not in the paper): with
signed scores a rank-1 core σ·u·vᵀ scores slot (i, j) as σ·f_row[i]·f_col[j], so the best slots come
from two large positive *or two large negative* filter scores; the top-m filter never sees the
second kind (recall ~0.5 in training, docs/quality.md). It keeps the top-m and the bottom-m of each
side (2m candidates, all n when 2m >= n) and rescores the 2m x 2m grid exactly: exact for rank-1
cores of either sign whenever at least m of the grid's products are positive, at 4x the grid cost.

Decoding (`tdqkr_topk_decode`, eval without autograd, shared query) never builds S_row, S_col: since
S·u = q·(K·u), the filter scores are one matmul against keys with u folded in (`DecodeKeys`, cached by
the layer between steps), and only the m candidates' rank scores are computed. Same arithmetic in
another summation order: scores agree to float rounding (~1e-7 relative), so the selection is
`tdqkr_topk`'s except where two candidates tie to that precision. No [T, H, n, r] tensor is built;
at K = 4096 those dominated a batched decode step (bench/serve.py, docs/benchmarks.md "serve").

Legend: T tokens, H heads, n_row/n_col virtual sub-keys per side, r Tucker rank, h cores, m top-m.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


def key_matrix(keys: Tensor) -> Tensor:
    """keys [H, n, d_k, r] -> [d_k, H*n*r] (a contiguous copy): the right operand of the one matmul
    that scores a shared query against every head's keys (`rank_scores`)."""
    heads, n, d_k, r = keys.shape
    return keys.permute(2, 0, 1, 3).reshape(d_k, heads * n * r)


def rank_scores(query: Tensor, keys: Tensor, matrix: Tensor | None = None) -> Tensor:
    """Per-rank key scores: query [T, H, d_k] (or [T, 1, d_k] shared) , keys [H, n, d_k, r] -> [T, H, n, r].

    `matrix` is `key_matrix(keys)` made beforehand (the serving path caches it between decode steps);
    it is only used for a shared query and gives the same result as building it here.
    """
    heads, n, d_k, r = keys.shape
    if query.shape[1] == 1:  # shared query: one matmul against every head's keys
        flat = key_matrix(keys) if matrix is None else matrix  # (d_k, H*n*r)
        return (query[:, 0] @ flat).view(-1, heads, n, r)
    return torch.einsum("thd,hndr->thnr", query, keys)


class TuckerCores(nn.Module):
    """The h Tucker cores [h, H, r, r] (init U(0, 1)) and the rank-1 filter buffers u, v [H, r]."""

    def __init__(
        self, heads: int, rank: int, num_cores: int, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.cores = nn.Parameter(torch.rand(num_cores, heads, rank, rank, generator=generator))
        # persistent: a reloaded model filters exactly as the saved one did (sign history included)
        self.register_buffer("filter_u", torch.zeros(heads, rank))
        self.register_buffer("filter_v", torch.zeros(heads, rank))
        self.refresh_filter()

    @torch.no_grad()
    def refresh_filter(self) -> None:
        """Recompute u, v = leading singular vectors of sum_c C_c (fp32), sign-aligned with the old u."""
        summed = self.cores.detach().float().sum(0)  # (H, r, r)
        left, _, right_t = torch.linalg.svd(summed)
        u, v = left[..., :, 0], right_t[..., 0, :]  # (H, r) each; summed ≈ σ u v^T
        prev = self.filter_u.float()
        # flipping both u and v leaves σ u v^T unchanged; keep the direction of the previous step,
        # or (first call) the one with a non-negative sum (the Perron direction of a positive core)
        ref = torch.where(prev.abs().sum(-1, keepdim=True) > 0, prev, torch.ones_like(u))
        sign = torch.where((u * ref).sum(-1, keepdim=True) < 0, -1.0, 1.0)
        self.filter_u.copy_(u * sign)
        self.filter_v.copy_(v * sign)

    def aux_loss(self, alpha: float, threshold: float = 0.15) -> Tensor:
        """alpha/(r-1) * sum_{i>=2} relu(λ_i - threshold)^2 over the summed core's singular values, mean over H."""
        rank = self.cores.shape[-1]
        if alpha == 0.0 or rank < 2:
            return self.cores.new_zeros(())
        sv = torch.linalg.svdvals(self.cores.float().sum(0))  # (H, r), descending
        return alpha / (rank - 1) * torch.relu(sv[:, 1:] - threshold).pow(2).sum(-1).mean()


def _gather_side(scores: Tensor, index: Tensor) -> Tensor:
    """scores [T, H, n, r], index [T, H, m] -> [T, H, m, r]."""
    return scores.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, scores.shape[-1]))


def filter_candidates(f: Tensor, m: int, signed: bool = False) -> Tensor:
    """Candidate sub-keys of one side from its filter scores f [T, H, n] -> index int64 [T, H, c].

    top (signed=False): the m largest, c = m, best first. signed: the m largest, then the m smallest
    (c = 2m, disjoint even under ties), or every sub-key (c = n, descending) when 2m >= n.
    """
    if not signed:
        return f.topk(m, dim=-1).indices
    n = f.shape[-1]
    if 2 * m >= n:
        return f.argsort(dim=-1, descending=True)
    top = f.topk(m, dim=-1).indices
    rest = f.scatter(-1, top, float("inf"))  # the top-m can no longer be among the smallest
    return torch.cat([top, rest.topk(m, dim=-1, largest=False).indices], dim=-1)


def _grid_winners(grid: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """grid [T, H, c_row, c_col] -> positions (row, col) [T, H, m] of its top-m cells, best first."""
    best = grid.flatten(2).topk(m, dim=-1).indices  # (T, H, m) into the flattened grid
    c_col = grid.shape[-1]
    return best // c_col, best % c_col


def core_scores(a: Tensor, b: Tensor, cores: Tensor) -> Tensor:
    """Per-core bilinear scores of paired rows: a, b [T, H, m, r], cores [h, H, r, r] -> s_c [T, H, m, h]."""
    return torch.einsum("thjr,chrs,thjs->thjc", a, cores, b)


def tdqkr_topk(
    s_row: Tensor, s_col: Tensor, cores: Tensor, u: Tensor, v: Tensor, m: int, *, signed: bool = False
) -> tuple[Tensor, Tensor]:
    """TDQKR top-m: rank-1 filter, exact c x c rescoring (c = m, or 2m when signed), final top-m.

    Args:
        s_row, s_col: per-rank scores [T, H, n_row, r], [T, H, n_col, r].
        cores: [h, H, r, r]; u, v: filter vectors [H, r] (detached buffers).
        m: top-m per head (<= n_row, n_col).
        signed: keep the bottom-m of the filter scores too (`filter_candidates`, module docstring).
    Returns:
        virtual_index int64 [T, H, m] (= i_row * n_col + i_col, best first) and per-core scores
        s_c [T, H, m, h], differentiable w.r.t. s_row, s_col and cores; sum over c is the exact G.
    """
    n_col = s_col.shape[2]
    with torch.no_grad():  # selection only: gradients flow through the winners' scores below
        sr, sc = s_row.detach(), s_col.detach()
        f_row = torch.einsum("thnr,hr->thn", sr, u.to(sr.dtype))  # (T, H, n_row)
        f_col = torch.einsum("thnr,hr->thn", sc, v.to(sc.dtype))
        i_row = filter_candidates(f_row, m, signed)  # (T, H, c_row)
        i_col = filter_candidates(f_col, m, signed)
        a, b = _gather_side(sr, i_row), _gather_side(sc, i_col)  # (T, H, c, r)
        summed = cores.detach().to(sr.dtype).sum(0)  # (H, r, r)
        grid = torch.einsum("thir,hrs,thjs->thij", a, summed, b)  # (T, H, c_row, c_col)
        pick_row, pick_col = _grid_winners(grid, m)  # (T, H, m) positions in the candidate lists
        win_row = i_row.gather(2, pick_row)  # (T, H, m) virtual row sub-key
        win_col = i_col.gather(2, pick_col)
    scores = core_scores(_gather_side(s_row, win_row), _gather_side(s_col, win_col), cores.to(s_row.dtype))
    return win_row * n_col + win_col, scores


@dataclass(frozen=True)
class DecodeKeys:
    """A side's sub-keys prepared for decoding (made once per parameter change, see eval_cache.py)."""

    filter: Tensor  # [d_k, H*n]: keys folded with the filter vector, Σ_r K[..., r]·u_r, as a matmul operand
    keys: Tensor  # [H, n, r, d_k]: the (normed) keys, rank before d_k so a candidate's r rows are contiguous

    @classmethod
    def make(cls, keys: Tensor, u: Tensor) -> DecodeKeys:
        """keys [H, n, d_k, r] (already normed, in the query dtype), u [H, r] -> DecodeKeys."""
        heads, n, d_k, _ = keys.shape
        folded = torch.einsum("hndr,hr->dhn", keys, u.to(keys.dtype)).reshape(d_k, heads * n)
        return cls(folded.contiguous(), keys.permute(0, 1, 3, 2).contiguous())


def _candidates(query: Tensor, side: DecodeKeys, m: int, signed: bool) -> tuple[Tensor, Tensor]:
    """query [T, d_k] -> filter candidates [T, H, c] (`filter_candidates`) and their rank scores [T, H, c, r]."""
    heads, n = side.keys.shape[:2]
    t, d_k = query.shape
    index = filter_candidates((query @ side.filter).view(t, heads, n), m, signed)  # (T, H, c)
    picked = side.keys[torch.arange(heads, device=index.device).view(1, heads, 1), index]  # (T, H, c, r, d_k)
    return index, (picked @ query.view(t, 1, 1, d_k, 1)).squeeze(-1)  # (T, H, c, r)


def tdqkr_topk_decode(q_row: Tensor, q_col: Tensor, row: DecodeKeys, col: DecodeKeys, cores: Tensor,
                      m: int, *, signed: bool = False) -> tuple[Tensor, Tensor]:
    """`tdqkr_topk` for a shared query without autograd, from the queries instead of S_row, S_col.

    q_row, q_col [T, d_k]; row, col: DecodeKeys; cores [h, H, r, r]; signed as in tdqkr_topk ->
    virtual_index int64 [T, H, m] and s_c [T, H, m, h] (tdqkr_topk on rank_scores, to float
    rounding; module docstring).
    """
    n_col = col.keys.shape[1]
    i_row, a = _candidates(q_row, row, m, signed)  # (T, H, c_row), (T, H, c_row, r)
    i_col, b = _candidates(q_col, col, m, signed)
    cores = cores.detach().to(a.dtype)
    grid = torch.einsum("thir,hrs,thjs->thij", a, cores.sum(0), b)  # (T, H, c_row, c_col)
    pick_row, pick_col = _grid_winners(grid, m)
    scores = core_scores(_gather_side(a, pick_row), _gather_side(b, pick_col), cores)  # (T, H, m, h)
    return i_row.gather(2, pick_row) * n_col + i_col.gather(2, pick_col), scores


def brute_force_topk(s_row: Tensor, s_col: Tensor, cores: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Exact top-m over all n_row * n_col slots: -> virtual_index [T, H, m], total score [T, H, m]."""
    grid = torch.einsum("thir,hrs,thjs->thij", s_row, cores.to(s_row.dtype).sum(0), s_col)
    top = grid.flatten(2).topk(m, dim=-1)
    return top.indices, top.values


def recall(found: Tensor, reference: Tensor) -> float:
    """Mean fraction of the reference top-m ([T, H, m]) present in the found set ([T, H, m])."""
    hit = (reference.unsqueeze(-1) == found.unsqueeze(-2)).any(-1)  # (T, H, m)
    return float(hit.float().mean()) if hit.numel() else 1.0
