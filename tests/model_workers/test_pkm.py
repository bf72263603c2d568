"""Additive product keys (the PKM baseline, DESIGN §3.2 row 1) against brute-force search."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.pkm import brute_force_product_keys, product_key_topk
from model_workers.ultramem import MemoryConfig, MemoryLayer
from model_workers.values import LocalBackend
from storage.layout import TableSpec


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    t=st.integers(1, 6),
    heads=st.integers(1, 3),
    n_row=st.integers(1, 10),
    n_col=st.integers(1, 10),
    m=st.integers(1, 10),
)
def test_product_key_search_equals_brute_force_over_every_slot(seed, t, heads, n_row, n_col, m):
    m = min(m, n_row, n_col)
    gen = torch.Generator().manual_seed(seed)
    s_row = torch.randn(t, heads, n_row, generator=gen, dtype=torch.float64)
    s_col = torch.randn(t, heads, n_col, generator=gen, dtype=torch.float64)
    found, scores = product_key_topk(s_row, s_col, m)
    ref, ref_scores = brute_force_product_keys(s_row, s_col, m)
    assert torch.equal(found, ref)  # same order: best first
    torch.testing.assert_close(scores, ref_scores)


def test_pkm_layer_output_equals_softmax_over_brute_force_product_keys():
    cfg = MemoryConfig.pkm(num_keys=6, d_k=8, heads=2, topk=3)
    d_model = 16
    layer = MemoryLayer(cfg, d_model, index=0, num_memory_layers=1, seed=5).double()
    spec = TableSpec(name=layer.table, rows=cfg.physical_rows, dim=d_model, init_std=1.0, seed=2)
    backend = LocalBackend([spec])
    layer.backend = backend
    x = torch.randn(2, 3, d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = layer(x)
    table = backend.fetch_rows(layer.table, torch.arange(cfg.physical_rows)).double()  # (P, D)
    # reference: per head, every slot (i, j) scores q_row·k_i + q_col·k_j with the batch-normed query
    # (the PKM paper's, over the batch's tokens in training); softmax over the top 3
    q = x.reshape(6, d_model) @ layer.w_q.weight.T  # per-head queries: (N, H*2*d_k)
    q = (q - q.mean(0)) / torch.sqrt(q.var(0, unbiased=False) + layer.q_stats.eps)  # PKM's query batchnorm
    q = q.view(6, 2, 2, 8)
    expect = torch.zeros(6, d_model, dtype=torch.float64)
    for n in range(6):
        for h in range(2):
            grid = (q[n, h, 0] @ layer.keys_row[h, :, :, 0].T).unsqueeze(1) + (
                q[n, h, 1] @ layer.keys_col[h, :, :, 0].T
            )
            top = grid.flatten().topk(3)
            w = torch.softmax(top.values, 0)
            expect[n] += (w.unsqueeze(1) * table[top.indices]).sum(0)
    torch.testing.assert_close(y.view(6, d_model), expect)
