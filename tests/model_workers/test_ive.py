"""IVE + MCS + pooling (DESIGN §3.1 steps 4-6) against an explicitly materialised virtual table."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.ive import make_permutation, mcs_weight, pool, pooled_sum, split_virtual


def test_permutation_is_a_seeded_bijection_and_identity_when_ive_is_off():
    p = make_permutation(48, seed=7)
    assert torch.equal(p.sort().values, torch.arange(48))
    assert torch.equal(p, make_permutation(48, seed=7))
    assert not torch.equal(p, make_permutation(48, seed=8))
    assert torch.equal(make_permutation(48, seed=7, identity=True), torch.arange(48))


def test_every_physical_row_backs_exactly_e_virtual_slots_one_per_projector():
    e, rows = 4, 9
    perm = make_permutation(e * rows, seed=3)
    row, proj = split_virtual(torch.arange(e * rows), perm, rows)
    assert torch.equal(row, perm % rows) and torch.equal(proj, perm // rows)
    pairs = set(zip(row.tolist(), proj.tolist()))
    assert pairs == {(r, q) for r in range(rows) for q in range(e)}


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    e=st.integers(1, 4),
    h=st.sampled_from([1, 2, 4]),
    t=st.integers(1, 4),
    j=st.integers(1, 6),
)
def test_pooling_equals_the_materialised_virtual_table_in_forward_and_gradients(seed, e, h, t, j):
    gen = torch.Generator().manual_seed(seed)
    rows, d_v, d = 5, 4, 3
    perm = make_permutation(e * rows, seed=seed)
    values = torch.randn(rows, d_v, generator=gen, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(d, e * d_v, generator=gen, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(t, j, h, generator=gen, dtype=torch.float64, requires_grad=True)
    virtual = torch.randint(0, e * rows, (t, j), generator=gen)

    row, proj = split_virtual(virtual, perm, rows)
    o = pooled_sum(values[row], proj, scores, e)  # (T, E, d_v)
    y = o.reshape(t, e * d_v) @ w_out.T
    grads = torch.autograd.grad(y.pow(2).sum(), (values, w_out, scores))

    # reference: virtual value g' is V[g' mod P] · W_{g' div P}, slice c weighted by s_c (MCS)
    y_ref = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        for jj in range(j):
            g = int(perm[virtual[ti, jj]])
            blk = w_out[:, (g // rows) * d_v : (g // rows + 1) * d_v]  # W_p: (D, d_v)
            weighted = torch.cat([values[g % rows].view(h, -1)[c] * scores[ti, jj, c] for c in range(h)])
            y_ref[ti] = y_ref[ti] + blk @ weighted
    ref_grads = torch.autograd.grad(y_ref.pow(2).sum(), (values, w_out, scores))
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_mcs_weights_each_value_slice_by_its_core_score():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 3, 6, generator=gen)
    scores = torch.randn(2, 3, 3, generator=gen)
    out = mcs_weight(values, scores)
    for c in range(3):
        torch.testing.assert_close(
            out[..., 2 * c : 2 * c + 2], values[..., 2 * c : 2 * c + 2] * scores[..., c : c + 1]
        )


def test_fused_pooled_sum_equals_mcs_then_scatter_pool():
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(4, 5, 8, generator=gen)
    scores = torch.randn(4, 5, 2, generator=gen)
    proj = torch.randint(0, 3, (4, 5), generator=gen)
    torch.testing.assert_close(pooled_sum(values, proj, scores, 3), pool(mcs_weight(values, scores), proj, 3))


def test_pooled_sum_passes_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(3, 4, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    proj = torch.randint(0, 2, (3, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda v, s: pooled_sum(v, proj, s, 2), (values, scores))
