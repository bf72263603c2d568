"""The compiled pooled backward (param_server.pooling.pooled_backward) against a plain float64 numpy
reference: repeated rows summed, the table read in place or as a gathered copy, bfloat16 / float16
tables; the pooled sum and the sort it uses likewise. The optimizer kernels are checked per row in
test_optimizers.py."""

from __future__ import annotations

import platform

import ml_dtypes
import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server import kernels
from param_server.kernels import pooled_sum_into, pre_value_scores_into
from param_server.pooling import pooled_backward, pooled_sum, pre_value_scores, stable_argsort


def reference(table, rows, projector, token_pos, scores, grad_out):
    """float64, one entry at a time: dL/ds [n, h], unique rows, dL/dV [U, d_v]."""
    n, h = scores.shape
    d_v = grad_out.shape[2]
    k = d_v // h
    v = table.astype(np.float64)
    g = grad_out.astype(np.float64)
    grad_scores = np.zeros((n, h))
    unique = np.unique(rows)
    grad_rows = np.zeros((unique.shape[0], d_v))
    for j in range(n):
        go = g[token_pos[j], projector[j]]
        u = np.searchsorted(unique, rows[j])
        for c in range(h):
            sl = slice(c * k, (c + 1) * k)
            grad_scores[j, c] = go[sl] @ v[rows[j], sl]
            grad_rows[u, sl] += float(scores[j, c]) * go[sl]
    return grad_scores, unique, grad_rows


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40),
    num_rows=st.integers(1, 12),  # few rows: many repeats
    tokens=st.integers(1, 5),
    e=st.integers(1, 3),
    h=st.sampled_from([1, 2, 4]),
    k=st.integers(1, 9),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
    in_place=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pooled_backward_matches_a_float64_reference(n, num_rows, tokens, e, h, k, dtype, in_place, seed):
    rng = np.random.default_rng(seed)
    d_v = h * k
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    table = rng.standard_normal((num_rows, d_v)).astype(np_dtype)
    rows = rng.integers(0, num_rows, n, dtype=np.int64)
    projector = rng.integers(0, e, n, dtype=np.int64)
    token_pos = rng.integers(0, tokens, n, dtype=np.int64)
    scores = rng.standard_normal((n, h)).astype(np.float32)
    grad_out = rng.standard_normal((tokens, e, d_v)).astype(np.float32)
    if in_place:
        got = pooled_backward(table, rows, projector, token_pos, scores, grad_out, flat=rows)
    else:
        got = pooled_backward(table[rows], rows, projector, token_pos, scores, grad_out)
    want = reference(table, rows, projector, token_pos, scores, grad_out)
    assert got[0].dtype == np.float32 and got[0].shape == (n, h)
    np.testing.assert_array_equal(got[1], want[1])
    assert got[2].dtype == np.float32 and got[2].shape == (want[1].shape[0], d_v)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4)


def test_pooled_backward_sums_a_row_repeated_by_every_entry():
    table = np.ones((3, 4), np.float32)
    rows = np.array([2, 2, 2, 2], np.int64)
    grad_out = np.ones((1, 1, 4), np.float32)
    zeros = np.zeros(4, np.int64)
    scores = np.array([[1.0, 2.0]] * 4, np.float32)
    grad_scores, unique, grad_rows = pooled_backward(table, rows, zeros, zeros, scores, grad_out, flat=rows)
    assert unique.tolist() == [2]
    np.testing.assert_array_equal(grad_rows, [[4.0, 4.0, 8.0, 8.0]])  # summed, not last-write-wins
    np.testing.assert_array_equal(grad_scores, [[2.0, 2.0]] * 4)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), tokens=st.integers(1, 6), e=st.integers(1, 3), h=st.sampled_from([1, 2]),
       dense=st.booleans(), seed=st.integers(0, 2**16))
def test_pooled_sum_matches_a_float64_reference(n, tokens, e, h, dense, seed):
    """Entries in any order; `dense`: every token uses every projector (the sums need no scatter)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((10, 2 * h)).astype(np.float32)
    token, projector = rng.integers(0, tokens, n) * 3, rng.integers(0, e, n)  # token ids with gaps
    if dense:
        token = np.concatenate([np.repeat(np.arange(tokens) * 3, e), token])
        projector = np.concatenate([np.tile(np.arange(e), tokens), projector])
    rows = rng.integers(0, 10, token.shape[0])
    scores = rng.standard_normal((token.shape[0], h)).astype(np.float32)
    got_tokens, got = pooled_sum(table, projector, token, scores, e, flat=rows)
    want_tokens = np.unique(token)
    want = np.zeros((want_tokens.shape[0], e, 2 * h))
    for j in range(token.shape[0]):
        t = np.searchsorted(want_tokens, token[j])
        for c in range(h):
            want[t, projector[j], 2 * c:2 * c + 2] += float(scores[j, c]) * table[rows[j], 2 * c:2 * c + 2]
    np.testing.assert_array_equal(got_tokens, want_tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 70_000), max_size=50), st.sampled_from([1, 16, 1 << 16]))
def test_stable_argsort_is_numpys_stable_argsort(keys, scale):
    keys = np.array(keys, dtype=np.int64) // scale  # small ranges (the uint16 radix path) and wide ones
    np.testing.assert_array_equal(stable_argsort(keys), np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("bad", ["flat", "token_pos", "projector"])
def test_the_pooled_sum_kernel_refuses_an_index_out_of_range_and_writes_nothing(bad):
    """The compiled loop does not check indices; its wrapper does, before any write."""
    table, out = np.ones((4, 2), np.float32), np.zeros((2, 3, 2), np.float32)
    idx = {"flat": np.array([0, 3]), "token_pos": np.array([1, 0]), "projector": np.array([2, 0])}
    idx[bad] = idx[bad].copy()
    idx[bad][1] = {"flat": 4, "token_pos": 2, "projector": -1}[bad]
    with pytest.raises(ValueError, match=bad):
        pooled_sum_into(table, idx["flat"], idx["token_pos"], idx["projector"], np.ones((2, 1), np.float32), out)
    assert not out.any()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 50), d_p=st.integers(1, 40), h=st.sampled_from([1, 2]), bf16=st.booleans(),
       seed=st.integers(0, 2**16))
def test_pre_value_scores_read_in_place_match_a_float64_reference(n, d_p, h, bf16, seed):
    """P_tab read in place through `flat` (or, for bfloat16, converted row by row) gives the weights
    a_j = <q_p[q_pos_j], P_tab[row_j]> and s'_j = a_j * s_j of a float64 reference."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((12, d_p)).astype(np.float32)
    if bf16:
        table = table.astype(ml_dtypes.bfloat16)
    q_p = rng.standard_normal((5, d_p)).astype(np.float32)
    rows, q_pos = rng.integers(0, 12, n), rng.integers(0, 5, n)
    scores = rng.standard_normal((n, h)).astype(np.float32)
    a, weighted = pre_value_scores(table, q_p, q_pos, scores, flat=rows)
    want_a = np.einsum("nd,nd->n", q_p[q_pos].astype(np.float64), table[rows].astype(np.float64))
    np.testing.assert_allclose(a, want_a, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weighted, want_a[:, None] * scores, rtol=1e-4, atol=1e-4)
    gathered_a, gathered_weighted = pre_value_scores(table[rows], q_p, q_pos, scores)  # the rows given
    np.testing.assert_array_equal(gathered_a, a)
    np.testing.assert_array_equal(gathered_weighted, weighted)


@pytest.mark.parametrize("bad", ["flat", "q_pos"])
def test_the_pre_value_kernel_refuses_an_index_out_of_range_and_writes_nothing(bad):
    pre, q_p, scores = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32), np.ones((2, 1), np.float32)
    idx = {"flat": np.array([0, 2]), "q_pos": np.array([1, 0])}
    idx[bad] = np.array([0, 3 if bad == "flat" else -1])
    a, weighted = np.zeros(2, np.float32), np.zeros((2, 1), np.float32)
    with pytest.raises(ValueError, match=bad):
        pre_value_scores_into(pre, idx["flat"], q_p, idx["q_pos"], scores, a, weighted)
    assert not a.any() and not weighted.any()


def test_the_row_reading_kernels_are_compiled_with_prefetch_hints():
    """The pooled kernels ask for the rows of entries a few places ahead (llvm.prefetch, named for
    llvmlite's pointer mode). Without the hints they give the same answers 10-17% slower, which no
    other test would notice."""
    machine = platform.machine().lower()
    mnemonic = {"x86_64": "prefetch", "amd64": "prefetch", "aarch64": "prfm", "arm64": "prfm"}.get(machine)
    if mnemonic is None:
        pytest.skip(f"no prefetch mnemonic known for {machine}")
    kernels.warm_up()  # the signatures the shard uses
    for kernel in (kernels._pooled_sum, kernels._pooled_backward, kernels._pre_value_scores):
        # code loaded from numba's on-disk cache cannot be listed: compile a fresh copy, same options
        options = {k: v for k, v in kernel.targetoptions.items() if k not in ("cache", "nopython")}
        fresh = numba.njit(cache=False, **options)(kernel.py_func)
        assert kernel.signatures, kernel.__name__
        for signature in kernel.signatures:
            fresh.compile(signature)
        for listing in fresh.inspect_asm().values():
            assert mnemonic in listing.lower(), f"{kernel.__name__} has no {mnemonic} instruction"
