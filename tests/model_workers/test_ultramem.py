"""The UltraMem/PKM memory layer (DESIGN §3.1): config switches, the lookup, training hooks, metrics."""

from __future__ import annotations

import math

import pytest
import torch

from model_workers.ive import pooled_sum
from model_workers.ultramem import MemoryConfig, MemoryLayer, ModelConfigError, parse_placement
from model_workers.values import LocalBackend, ValueBackend
from storage.layout import TableSpec

SMALL = {"num_keys": 6, "d_k": 8, "d_v": 8, "heads": 2, "topk": 3, "placement": "0:1"}


class TensorBackend(ValueBackend):
    """A float64 table that keeps the autograd graph, so gradcheck can differentiate through fetches."""

    def __init__(self, name: str, table: torch.Tensor) -> None:
        self.name, self.table = name, table

    def tables(self):
        return {self.name: TableSpec(name=self.name, rows=self.table.shape[0], dim=self.table.shape[1])}

    def fetch_rows(self, table, rows):
        return self.table[rows.clone()]  # autograd keeps the index; rows are valid for the call only

    def push_grads(self, table, rows, grads, lr, step):
        raise AssertionError("not used")


def layer_of(cfg: MemoryConfig, d_model: int = 16, seed: int = 0) -> MemoryLayer:
    layer = MemoryLayer(cfg, d_model, index=0, num_memory_layers=1, seed=seed)
    spec = TableSpec(name=layer.table, rows=cfg.physical_rows, dim=layer.d_v, optimizer="sgd", init_std=0.3)
    layer.backend = LocalBackend([spec])
    return layer


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"topk": 9, "num_keys": 8}, "topk"),
        ({"tucker_rank": 0, "cores": 2}, "cores"),
        ({"d_v": 7, "cores": 2}, "d_v"),
        ({"kind": "pkm"}, "pkm"),
        ({"placement": "3:1"}, "placement"),
        ({"placement": "a:b"}, "placement"),
        ({"heads": 0}, "heads"),
        ({"aux_loss_alpha": -1.0}, "aux_loss_alpha"),
    ],
)
def test_invalid_memory_config_names_the_field(kw, field):
    with pytest.raises(ModelConfigError, match=field):
        MemoryConfig(**kw)


def test_placement_strings_parse_to_read_and_add_blocks():
    assert parse_placement("2:5/6:9/10:13/14:17") == ((2, 5), (6, 9), (10, 13), (14, 17))
    assert parse_placement("3") == ((3, 3),)


def test_virtual_sub_keys_per_side_cover_e_times_p_slots():
    for e in (1, 2, 4, 6, 9):
        cfg = MemoryConfig(num_keys=4, topk=4, expansion=e)
        n_row, n_col = cfg.side_keys
        assert n_row * n_col == e * cfg.physical_rows
    assert MemoryConfig(num_keys=4, topk=4, expansion=4).side_keys == (8, 8)  # n = √E·K


def test_value_init_choices_fixed_legacy_and_ffn_matched():
    legacy = MemoryConfig(expansion=4, topk=16, heads=2, value_init="legacy")
    assert legacy.value_init_std(num_memory_layers=2, d_model=256) == pytest.approx(math.sqrt(4 / (2 * 16 * 2 * 2)))
    assert MemoryConfig.pkm(value_init="legacy").value_init_std(1, d_model=256) == pytest.approx(256**-0.5)
    assert MemoryConfig(value_init="fixed", value_std=0.02).value_init_std(2, 256) == 0.02
    assert MemoryConfig().value_init == "ffn_matched" and MemoryConfig().value_init_std(2, 256) is None
    with pytest.raises(ModelConfigError, match="memory.value_init"):
        MemoryConfig(value_init="paper")
    with pytest.raises(ModelConfigError, match="memory.value_std"):
        MemoryConfig(value_init="fixed", value_std=0.0)


@pytest.mark.parametrize("query_norm", ["none", "batchnorm", "whiten"])
def test_ffn_matched_sigma_gives_the_target_output_variance_on_gaussian_inputs(query_norm):
    # the calibration's analytic E_V[y²] for the chosen σ against a measured forward with a table
    # drawn at that σ (a fresh probe, not the calibration's); fixed/legacy ignore the target
    cfg = MemoryConfig(**{**SMALL, "query_norm": query_norm})
    layer = MemoryLayer(cfg, 16, index=0, num_memory_layers=1, seed=5)
    sigma = layer.calibrate_value_std(1e-4)
    spec = TableSpec(name=layer.table, rows=cfg.physical_rows, dim=layer.d_v, init_std=sigma, seed=9)
    layer.backend = LocalBackend([spec])
    with torch.no_grad():
        y = layer(torch.randn(4, 512, 16, generator=torch.Generator().manual_seed(11)))
    assert y.pow(2).mean().item() == pytest.approx(1e-4, rel=0.35)
    fixed = MemoryLayer(MemoryConfig(**{**SMALL, "value_init": "fixed", "value_std": 0.05}), 16, 0, 1, seed=5)
    assert fixed.calibrate_value_std(1e-4) == 0.05


def test_layer_output_equals_step_by_step_reference():
    cfg = MemoryConfig(**SMALL)
    layer = layer_of(cfg)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    q_row, q_col = layer.query(x.view(6, 16))
    virtual, scores = layer.retrieve(*layer.key_scores(q_row, q_col))
    assert virtual.shape == (6, 2, 3) and scores.shape == (6, 2, 3, 2)  # [T, H, m], [T, H, m, h]
    g = layer.permutation[virtual.view(6, 6)]
    table = layer.backend.fetch_rows(layer.table, torch.arange(cfg.physical_rows))
    o = pooled_sum(table[g % cfg.physical_rows], g // cfg.physical_rows, scores.view(6, 6, 2), cfg.expansion)
    torch.testing.assert_close(y.view(6, 16), o.view(6, -1) @ layer.w_out.weight.T)


def test_memory_lookup_passes_gradcheck_in_float64():
    cfg = MemoryConfig(**SMALL)
    layer = MemoryLayer(cfg, 16, index=0, num_memory_layers=1, seed=3).double()
    table = torch.randn(cfg.physical_rows, cfg.d_v, dtype=torch.float64, requires_grad=True)
    layer.backend = TensorBackend(layer.table, table)
    x = torch.randn(
        1, 2, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True
    )

    names = ("w_q.weight", "keys_row", "keys_col", "tucker.cores", "w_out.weight", "q_norm_row.weight",
             "k_norm_row.weight", "k_norm_col.weight")
    params = dict(layer.named_parameters())

    def f(x_, table_, *tensors):
        layer.backend.table = table_
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x_,))

    inputs = (x, table, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_pending_grads_are_the_gradients_of_the_fetched_rows():
    cfg = MemoryConfig(**SMALL)
    layer = layer_of(cfg)
    x = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(2))
    layer(x).pow(2).sum().backward()
    layer(x[:1]).sum().backward()  # a second micro-batch before the push
    rows, grads = layer.pending_grads()
    assert layer.pending_grads() is None  # handed over once
    # reference: differentiate w.r.t. the whole table
    table = layer.backend.fetch_rows(layer.table, torch.arange(cfg.physical_rows)).requires_grad_(True)
    ref = TensorBackend(layer.table, table)
    layer.backend = ref
    (layer(x).pow(2).sum() + layer(x[:1]).sum()).backward()
    dense = torch.zeros(cfg.physical_rows, cfg.d_v).index_add(0, rows, grads)
    torch.testing.assert_close(dense, table.grad)


def test_no_rows_are_kept_for_a_forward_without_grad():
    layer = layer_of(MemoryConfig(**SMALL))
    with torch.no_grad():
        layer(torch.randn(1, 2, 16))
    assert layer.pending_grads() is None


def test_softmax_switch_normalizes_the_m_scores_of_each_head():
    layer = layer_of(MemoryConfig(**{**SMALL, "softmax": True}))
    q = layer.query(torch.randn(5, 16))
    _, scores = layer.retrieve(*layer.key_scores(*q))
    torch.testing.assert_close(scores.sum(2), torch.ones(5, 2, 2))


def test_share_query_switch_sets_the_query_width():
    assert layer_of(MemoryConfig(**SMALL)).w_q.out_features == 2 * 8
    assert layer_of(MemoryConfig(**{**SMALL, "share_query": False})).w_q.out_features == 2 * 2 * 8


def test_no_projection_means_values_live_in_model_space():
    cfg = MemoryConfig.pkm(num_keys=6, d_k=8, topk=3, heads=2)
    layer = layer_of(cfg, d_model=16)
    assert layer.w_out is None and layer.d_v == 16 and layer.tucker is None
    assert layer(torch.randn(1, 3, 16)).shape == (1, 3, 16)


def test_metrics_report_coverage_kl_top1_std_and_exact_pkm_recall_then_reset():
    layer = layer_of(MemoryConfig.pkm(num_keys=6, d_k=8, topk=3, heads=2), d_model=16)
    layer.train()
    layer(torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(0)))
    m = layer.metrics(reset=True)
    assert set(m) == {"coverage", "kl_uniform", "top1_score", "output_std", "tdqkr_recall"}
    assert 0 < m["coverage"] <= 1 and m["kl_uniform"] >= 0 and m["output_std"] > 0
    assert m["tdqkr_recall"] == 1.0  # additive product keys are an exact search
    assert 0 < m["top1_score"] <= 1  # softmax weights
    assert layer.metrics() == {}


def test_uniform_hits_have_zero_kl_and_full_coverage():
    layer = layer_of(MemoryConfig(**SMALL))
    layer.hits.fill_(3)
    m = layer.metrics()
    assert m["coverage"] == 1.0 and m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_tdqkr_recall_metric_is_below_one_when_the_filter_misses():
    layer = layer_of(MemoryConfig(**{**SMALL, "tucker_rank": 1, "cores": 1}))
    s = torch.tensor([-5.0, 1.0, 2.0] + [0.0] * (layer.n_row - 3)).view(1, 1, -1, 1).expand(1, 2, -1, 1)
    found, _ = layer.retrieve(s, s)
    layer._sample = (s, s, found)
    assert layer.metrics()["tdqkr_recall"] < 1.0


def test_permutation_is_a_persistent_buffer_made_from_the_seed():
    a, b = layer_of(MemoryConfig(**SMALL), seed=1), layer_of(MemoryConfig(**SMALL), seed=1)
    assert "permutation" in a.state_dict() and "tucker.filter_u" in a.state_dict()
    assert torch.equal(a.permutation, b.permutation)
    assert not torch.equal(a.permutation, layer_of(MemoryConfig(**SMALL), seed=2).permutation)
