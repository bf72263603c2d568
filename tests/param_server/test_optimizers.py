"""The sparse optimizers (DESIGN §4.4) against per-row numpy references and torch.optim.AdamW."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server.errors import ConfigError
from param_server.optimizers import SparseOptimizerConfig, make_optimizer, sum_duplicates
from storage.layout import TableSpec, state_layout

# --- per-row references: one row at a time, the textbook formulas ---------------------------------


def ref_adamw(p, m, v, t, g, lr, cfg):
    t = t + 1
    p = p * (1 - lr * cfg.weight_decay)
    m = cfg.beta1 * m + (1 - cfg.beta1) * g
    v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
    m_hat = m / (1 - cfg.beta1**t)
    v_hat = v / (1 - cfg.beta2**t)
    return p - lr * m_hat / (np.sqrt(v_hat) + cfg.eps), m, v, t


def ref_adagrad(p, acc, g, lr, cfg):
    acc = acc + np.mean(g * g)
    return p * (1 - lr * cfg.weight_decay) - lr * g / (np.sqrt(acc) + cfg.eps), acc


def ref_sgd(p, g, lr, cfg):
    return p * (1 - lr * cfg.weight_decay) - lr * g


def new_state(name: str, n: int, d: int) -> dict[str, np.ndarray]:
    spec = TableSpec(name="t", rows=n, dim=d, optimizer=name)
    return {k: np.zeros((n, *shape), dtype=dt) for k, (shape, dt) in state_layout(spec).items()}


# --- sum_duplicates ----------------------------------------------------------------------------------


@given(rows=st.lists(st.integers(0, 20), min_size=0, max_size=40), d=st.integers(1, 5))
def test_sum_duplicates_matches_a_per_row_sum(rows, d):
    rows = np.array(rows, dtype=np.int64)
    grads = np.random.default_rng(len(rows)).standard_normal((rows.shape[0], d)).astype(np.float32)
    uniq, summed = sum_duplicates(rows, grads)
    assert uniq.tolist() == sorted(set(rows.tolist()))
    assert summed.dtype == np.float32 and summed.shape == (uniq.shape[0], d)
    for i, r in enumerate(uniq):
        np.testing.assert_allclose(summed[i], grads[rows == r].sum(axis=0), rtol=1e-5, atol=1e-5)


def test_naive_fancy_update_loses_repeated_rows_but_summed_update_does_not():
    table = np.zeros((3, 2), np.float32)
    rows, grads = np.array([1, 1, 1]), np.ones((3, 2), np.float32)
    naive = table.copy()
    naive[rows] -= grads  # DESIGN §8: last write wins
    uniq, summed = sum_duplicates(rows, grads)
    table[uniq] -= summed
    assert naive[1, 0] == -1.0 and table[1, 0] == -3.0


# --- each optimizer against its reference, rows with repeats over several steps -------------------


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["adamw", "adagrad", "sgd"]),
    steps=st.lists(st.lists(st.integers(0, 9), min_size=0, max_size=12), min_size=1, max_size=4),
    d=st.integers(1, 6),
    lr=st.floats(1e-4, 0.5),
    wd=st.sampled_from([0.0, 0.1]),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_optimizer_matches_per_row_reference(name, steps, d, lr, wd, dtype):
    cfg = SparseOptimizerConfig(name=name, weight_decay=wd)
    opt = make_optimizer(cfg)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(7)
    values = rng.standard_normal((10, d)).astype(np_dtype)
    state = new_state(name, 10, d)
    ref_p = values.astype(np.float32).astype(np.float64)
    ref_m, ref_v = np.zeros((10, d)), np.zeros((10, d))
    ref_t, ref_acc = np.zeros(10, int), np.zeros(10)
    for step_rows in steps:
        rows = np.array(step_rows, dtype=np.int64)
        grads = rng.standard_normal((rows.shape[0], d)).astype(np.float32)
        uniq, summed = sum_duplicates(rows, grads)
        opt.step(values, state, uniq, summed, lr)
        for r in set(step_rows):
            g = grads[rows == r].sum(axis=0).astype(np.float64)
            if name == "adamw":
                ref_p[r], ref_m[r], ref_v[r], ref_t[r] = ref_adamw(ref_p[r], ref_m[r], ref_v[r], ref_t[r], g, lr, cfg)
            elif name == "adagrad":
                ref_p[r], ref_acc[r] = ref_adagrad(ref_p[r], ref_acc[r], g, lr, cfg)
            else:
                ref_p[r] = ref_sgd(ref_p[r], g, lr, cfg)
        ref_p = ref_p.astype(np_dtype).astype(np.float64)  # the table rounds to its dtype every step
    tol = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
    np.testing.assert_allclose(values.astype(np.float32), ref_p, rtol=tol, atol=tol)
    if name == "adamw":
        np.testing.assert_array_equal(state["step"], ref_t)  # per-row step counts
        np.testing.assert_allclose(state["exp_avg_sq"], ref_v, rtol=1e-4, atol=1e-6)
    if name == "adagrad":
        np.testing.assert_allclose(state["sum_sq"], ref_acc, rtol=1e-4, atol=1e-6)


def test_untouched_rows_and_their_state_do_not_change():
    opt = make_optimizer(SparseOptimizerConfig(name="adamw", weight_decay=0.1))
    values = np.ones((5, 3), np.float32)
    state = new_state("adamw", 5, 3)
    opt.step(values, state, np.array([1, 3]), np.ones((2, 3), np.float32), 0.1)
    for r in (0, 2, 4):
        assert np.all(values[r] == 1.0) and state["step"][r] == 0 and np.all(state["exp_avg"][r] == 0)
    assert np.all(values[[1, 3]] < 1.0) and list(state["step"][[1, 3]]) == [1, 1]


def test_lazy_adamw_matches_torch_adamw_on_rows_touched_every_step():
    torch.manual_seed(0)
    p0 = torch.randn(6, 16)
    param = torch.nn.Parameter(p0.clone())
    tor = torch.optim.AdamW([param], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = make_optimizer(SparseOptimizerConfig(name="adamw", beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1))
    values, state, rows = p0.numpy().copy(), new_state("adamw", 6, 16), np.arange(6)
    for i in range(20):
        g = torch.randn(6, 16) * (1 + i)
        lr = 3e-2 * (1 - i / 40)  # the LR travels with each step
        for group in tor.param_groups:
            group["lr"] = lr
        param.grad = g.clone()
        tor.step()
        opt.step(values, state, rows, g.numpy(), lr)
    np.testing.assert_allclose(values, param.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["exp_avg"], tor.state[param]["exp_avg"].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state["exp_avg_sq"], tor.state[param]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-7)


def test_config_from_spec_reads_optimizer_and_args():
    spec = TableSpec(name="t", rows=4, dim=2, optimizer="adagrad",
                     optimizer_args=(("eps", 1e-6), ("weight_decay", 0.1)))
    cfg = SparseOptimizerConfig.from_spec(spec)
    assert (cfg.name, cfg.eps, cfg.weight_decay, cfg.beta2) == ("adagrad", 1e-6, 0.1, 0.95)


@pytest.mark.parametrize("args", [(("momentum", 0.9),), (("beta1", 1.0),), (("eps", 0.0),), (("weight_decay", -1.0),)])
def test_config_rejects_unknown_or_out_of_range_args(args):
    spec = TableSpec(name="t", rows=4, dim=2, optimizer="adamw", optimizer_args=args)
    with pytest.raises(ConfigError):
        SparseOptimizerConfig.from_spec(spec)
