"""TDQKR (DESIGN §3.1 step 3) against brute force over every virtual slot, at small sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.tdqkr import TuckerCores, brute_force_topk, core_scores, rank_scores, recall, tdqkr_topk


def _rank_one_cores(h: int, heads: int, r: int, gen: torch.Generator) -> torch.Tensor:
    """h cores per head, each a positive multiple of the same non-negative u v^T: sum is rank 1."""
    u = torch.rand(heads, r, generator=gen, dtype=torch.float64) + 0.1
    v = torch.rand(heads, r, generator=gen, dtype=torch.float64) + 0.1
    scale = torch.rand(h, heads, 1, 1, generator=gen, dtype=torch.float64) + 0.5
    return scale * (u.unsqueeze(-1) * v.unsqueeze(-2))  # (h, H, r, r)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    t=st.integers(1, 5),
    heads=st.integers(1, 3),
    n_row=st.integers(2, 9),
    n_col=st.integers(2, 9),
    r=st.integers(1, 3),
    h=st.integers(1, 3),
    m=st.integers(1, 8),
)
def test_rank_one_cores_with_nonnegative_scores_find_the_brute_force_top_m(
    seed, t, heads, n_row, n_col, r, h, m
):
    m = min(m, n_row, n_col)
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.rand(t, heads, n_row, r, generator=gen, dtype=torch.float64)  # non-negative
    s_col = torch.rand(t, heads, n_col, r, generator=gen, dtype=torch.float64)
    cores = _rank_one_cores(h, heads, r, gen)
    tucker = TuckerCores(heads, r, h)
    with torch.no_grad():
        tucker.cores.copy_(cores)
    tucker.refresh_filter()
    found, scores = tdqkr_topk(s_row, s_col, cores, tucker.filter_u, tucker.filter_v, m)
    ref, ref_scores = brute_force_topk(s_row, s_col, cores, m)
    assert found.shape == (t, heads, m) and scores.shape == (t, heads, m, h)
    assert torch.equal(found.sort(-1).values, ref.sort(-1).values)
    torch.testing.assert_close(scores.sum(-1), ref_scores)  # best first, like the reference
    assert recall(found, ref) == 1.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), r=st.integers(1, 3), h=st.integers(1, 3), m=st.integers(1, 5))
def test_returned_scores_are_the_exact_bilinear_form_for_any_cores(seed, r, h, m):
    gen = torch.Generator().manual_seed(seed)
    t, heads, n_row, n_col = 3, 2, 6, 5
    s_row = torch.randn(t, heads, n_row, r, generator=gen, dtype=torch.float64)  # signed
    s_col = torch.randn(t, heads, n_col, r, generator=gen, dtype=torch.float64)
    cores = torch.randn(h, heads, r, r, generator=gen, dtype=torch.float64)  # full rank, signed
    u = torch.randn(heads, r, generator=gen, dtype=torch.float64)
    v = torch.randn(heads, r, generator=gen, dtype=torch.float64)
    found, scores = tdqkr_topk(s_row, s_col, cores, u, v, m)
    i_row, i_col = found // n_col, found % n_col
    for ti in range(t):
        for hd in range(heads):
            for j in range(m):
                a, b = s_row[ti, hd, i_row[ti, hd, j]], s_col[ti, hd, i_col[ti, hd, j]]
                for c in range(h):
                    expect = a @ cores[c, hd] @ b
                    torch.testing.assert_close(scores[ti, hd, j, c], expect)


def test_signed_scores_give_recall_below_one_when_negatives_multiply_into_a_winner():
    # rank 1, core = [[1]]: slot (0, 0) scores (-5) * (-5) = 25, but the filter keeps rows/cols with
    # the largest filter score (index 2, value 2) and never sees it
    s = torch.tensor([-5.0, 1.0, 2.0], dtype=torch.float64).view(1, 1, 3, 1)
    cores = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    u = torch.ones(1, 1, dtype=torch.float64)
    found, scores = tdqkr_topk(s, s, cores, u, u, 1)
    ref, ref_scores = brute_force_topk(s, s, cores, 1)
    assert ref.item() == 0 and ref_scores.item() == 25.0
    assert found.item() == 2 * 3 + 2 and scores.sum().item() == 4.0
    assert recall(found, ref) < 1.0


def test_filter_vectors_are_the_leading_singular_pair_of_the_summed_cores_and_keep_their_sign():
    tucker = TuckerCores(heads=3, rank=2, num_cores=2, generator=torch.Generator().manual_seed(1))
    summed = tucker.cores.detach().sum(0)
    u, v = tucker.filter_u.clone(), tucker.filter_v.clone()
    sigma = torch.linalg.svdvals(summed)[:, 0]
    # u^T C v = σ_max with unit u, v: the leading singular pair
    torch.testing.assert_close(torch.einsum("hr,hrs,hs->h", u, summed, v), sigma)
    assert (u.sum(-1) > 0).all()  # a positive core's Perron direction, not its negative
    with torch.no_grad():
        tucker.filter_u.neg_()  # pretend the previous step chose the other sign
        tucker.filter_v.neg_()
    tucker.refresh_filter()
    torch.testing.assert_close(tucker.filter_u, -u)  # aligned with the previous step's sign
    torch.testing.assert_close(tucker.filter_v, -v)


def test_aux_loss_penalizes_only_non_leading_singular_values_above_the_threshold():
    tucker = TuckerCores(heads=1, rank=2, num_cores=1)
    with torch.no_grad():
        tucker.cores.copy_(torch.diag(torch.tensor([1.0, 0.5])).view(1, 1, 2, 2))
    loss = tucker.aux_loss(alpha=0.001)
    torch.testing.assert_close(loss, torch.tensor(0.001 * (0.5 - 0.15) ** 2))
    loss.backward()
    assert tucker.cores.grad is not None and tucker.cores.grad.abs().sum() > 0
    with torch.no_grad():
        tucker.cores.copy_(torch.diag(torch.tensor([1.0, 0.1])).view(1, 1, 2, 2))
    assert tucker.aux_loss(alpha=0.001).item() == 0.0
    assert TuckerCores(heads=1, rank=1, num_cores=1).aux_loss(alpha=1.0).item() == 0.0


def test_rank_scores_of_a_shared_query_equal_the_per_head_einsum():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 1, 8, generator=gen, dtype=torch.float64)
    keys = torch.randn(3, 5, 8, 2, generator=gen, dtype=torch.float64)
    shared = rank_scores(q, keys)
    per_head = rank_scores(q.expand(4, 3, 8), keys)
    torch.testing.assert_close(shared, per_head)
    torch.testing.assert_close(shared[2, 1, 4, 1], q[2, 0] @ keys[1, 4, :, 1])


def test_tdqkr_scores_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(3)
    s_row = torch.randn(2, 2, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    s_col = torch.randn(2, 2, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    cores = torch.rand(2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.ones(2, 2, dtype=torch.float64) / 2**0.5

    def f(a, b, c):
        return tdqkr_topk(a, b, c, u, u, 3)[1]

    assert torch.autograd.gradcheck(f, (s_row, s_col, cores))


@pytest.mark.parametrize("h", [1, 2])
def test_core_scores_equal_a_per_core_loop(h):
    gen = torch.Generator().manual_seed(h)
    a = torch.randn(2, 3, 4, 2, generator=gen)
    b = torch.randn(2, 3, 4, 2, generator=gen)
    cores = torch.randn(h, 3, 2, 2, generator=gen)
    out = core_scores(a, b, cores)
    for c in range(h):
        expect = torch.einsum("thjr,hrs,thjs->thj", a, cores[c], b)
        torch.testing.assert_close(out[..., c], expect)
