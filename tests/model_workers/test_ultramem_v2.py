"""The UltraMemV2 layer (DESIGN §3.3): its switches, the reference math, pooled = rows, local training.

The oracles: an explicitly materialised virtual table (value and pre-value of every virtual slot,
pooled by loops), the pre-value weight as plain dot products, gradcheck in float64, and rows mode
for pooled mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers import checkpoint_io
from model_workers.engine import serving_config
from model_workers.model import LanguageModel, ModelConfig
from model_workers.prevalues import pre_value_std, pre_value_weight, weight_scores
from model_workers.schedule import value_lr_multiplier
from model_workers.trainer import LocalTrainer, evaluate
from model_workers.ultramem import MemoryConfig, MemoryLayer, ModelConfigError
from model_workers.values import LocalBackend, ValueBackend
from orchestration.config import load_config, save_config, to_dict
from storage.layout import TableSpec

V2 = {"num_keys": 6, "d_k": 8, "d_v": 12, "heads": 2, "topk": 3, "expansion": 4}  # d_p = 4
D = 16


class TensorBackend(ValueBackend):
    """float64 tables that keep the autograd graph, so gradcheck differentiates through the fetches."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.tensors = tables

    def tables(self):
        return {n: TableSpec(name=n, rows=t.shape[0], dim=t.shape[1]) for n, t in self.tensors.items()}

    def fetch_rows(self, table, rows):
        return self.tensors[table][rows.clone()]  # rows are valid for the call only

    def push_grads(self, table, rows, grads, lr, step):
        raise AssertionError("not used")


def v2_layer(seed: int = 0, **overrides) -> MemoryLayer:
    """A V2 layer over a LocalBackend holding its value and pre-value tables (SGD)."""
    cfg = MemoryConfig.ultramem_v2(**{**V2, **overrides})
    layer = MemoryLayer(cfg, D, index=0, num_memory_layers=1, seed=seed)
    specs = [TableSpec(name=layer.table, rows=cfg.physical_rows, dim=layer.d_v, optimizer="sgd", init_std=0.3,
                       num_partitions=4, seed=1)]
    if layer.pre_table is not None:
        specs.append(TableSpec(name=layer.pre_table, rows=cfg.physical_rows, dim=cfg.d_p, optimizer="sgd",
                               init_std=0.5, num_partitions=4, seed=2))
    layer.backend = LocalBackend(specs)
    return layer


def whole(layer: MemoryLayer, table: str | None) -> torch.Tensor:
    assert table is not None and layer.backend is not None
    return layer.backend.fetch_rows(table, torch.arange(layer.cfg.physical_rows)).double()


def reference_output(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """DESIGN §3.3 by loops over an explicitly materialised virtual table: slot g holds the value
    V[π(g) mod P] and the pre-value P_tab[π(g) mod P]; y = W_out Σ_j ⟨x·W_p, P_virt[g_j]⟩ s_c[j] V_virt[g_j]_c."""
    cfg, n = layer.cfg, x.shape[0] * x.shape[1]
    xf = x.reshape(n, D)
    physical = layer.permutation % cfg.physical_rows  # (E·P,) virtual slot -> physical row
    v_virt = whole(layer, layer.table)[physical]  # (E·P, d_v): the virtual value table
    p_virt = whole(layer, layer.pre_table)[physical]  # (E·P, d_p): the virtual pre-value table
    virtual, scores = layer.retrieve(*layer.key_scores(*layer.query(xf)))  # [N, H, m], [N, H, m, h]
    h = scores.shape[-1]
    virtual, scores = virtual.reshape(n, -1), scores.reshape(n, -1, h).double()  # [N, J], [N, J, h]
    assert layer.w_p is not None and layer.w_out is not None
    q_p = xf.double() @ layer.w_p.weight.double().T  # (N, d_p)
    width = layer.d_v // h
    o = torch.zeros(n, layer.d_v, dtype=torch.float64)
    for t in range(n):
        for j, g in enumerate(virtual[t].tolist()):
            a = sum(q_p[t, k] * p_virt[g, k] for k in range(cfg.d_p))
            for c in range(h):
                o[t, c * width:(c + 1) * width] += a * scores[t, j, c] * v_virt[g, c * width:(c + 1) * width]
    return (o @ layer.w_out.weight.double().T).view(*x.shape[:2], D)


# --------------------------------------------------------------------------- config


def test_kind_ultramem_v2_turns_the_v2_switches_on_and_each_can_be_set_by_hand():
    v2 = MemoryConfig(kind="ultramem_v2", d_v=12)
    assert (v2.placement, v2.shared_projector, v2.d_p) == ("full", True, 4)  # d_p : d_v = 1 : 3
    assert (v2.value_lr_schedule, v2.value_lr_mult, v2.aux_loss_alpha) == ("constant", 1.0, 0.0)
    v1 = MemoryConfig()
    assert (v1.placement, v1.shared_projector, v1.d_p) == ("1:2", False, 0)
    assert (v1.value_lr_schedule, v1.value_lr_mult) == ("linear_decay", 4.0)
    mixed = MemoryConfig(kind="ultramem_v2", placement="0:1", shared_projector=False, d_p=0,
                         value_lr_schedule="linear_decay")
    assert (mixed.placement, mixed.shared_projector, mixed.d_p, mixed.value_lr_mult) == ("0:1", False, 0, 4.0)
    assert MemoryConfig(shared_projector=True, d_p=5).pool_blocks == 1 and MemoryConfig().pool_blocks == 4


@pytest.mark.parametrize(("kw", "field"), [
    ({"d_p": -1}, "memory.d_p"),
    ({"value_lr_schedule": "cosine"}, "memory.value_lr_schedule"),
    ({"kind": "ultramem_v3"}, "memory.kind"),
    ({"placement": "full:1"}, "memory.placement"),
])
def test_invalid_v2_fields_name_the_field(kw, field):
    with pytest.raises(ModelConfigError, match=field):
        MemoryConfig(**kw)


def test_full_placement_puts_a_memory_layer_beside_every_block():
    cfg = ModelConfig(n_layers=3, ffn_kind="ultramem_v2", memory=MemoryConfig.ultramem_v2(**V2))
    assert cfg.placements == ((0, 0), (1, 1), (2, 2))
    with pytest.raises(ModelConfigError, match="ModelConfig.placements"):
        _ = cfg.memory.placements  # the block count lives in the model config
    with pytest.raises(ModelConfigError, match="memory.kind='ultramem_v2'"):
        ModelConfig(ffn_kind="ultramem_v2", memory=MemoryConfig(**V2))


def test_tiny_v2_preset_resolves_to_concrete_values_that_round_trip(tmp_path: Path):
    cfg = load_config(preset="tiny_v2")
    mem = cfg.model.memory
    assert cfg.model.ffn_kind == "ultramem_v2" and cfg.model.placements == ((0, 0), (1, 1))
    assert (mem.d_p, mem.shared_projector, mem.value_lr_schedule, mem.value_lr_mult) == (10, True, "constant", 1.0)
    assert cfg.model.ffn_mult < load_config(preset="tiny").model.ffn_mult  # the narrower FFN
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(path=tmp_path / "config.toml") == cfg


def test_constant_value_lr_schedule_holds_the_multiplier_and_linear_decay_still_decays():
    constant = MemoryConfig(value_lr_schedule="constant", value_lr_mult=2.0)
    assert [value_lr_multiplier(s, constant, 100) for s in (0, 50, 100, 500)] == [2.0] * 4
    assert value_lr_multiplier(7, MemoryConfig.ultramem_v2(), None) == 1.0  # needs no run length
    decay = MemoryConfig()
    assert [value_lr_multiplier(s, decay, 100) for s in (0, 50, 100)] == [4.0, 2.5, 1.0]


# --------------------------------------------------------------------------- reference math


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 4), j=st.integers(1, 5), d_p=st.integers(1, 6), h=st.integers(1, 3), seed=st.integers(0, 99))
def test_pre_value_weight_is_the_dot_product_of_the_projected_query_and_the_row(t, j, d_p, h, seed):
    g = torch.Generator().manual_seed(seed)
    q_p, pre = torch.randn(t, d_p, generator=g), torch.randn(t, j, d_p, generator=g)
    scores = torch.randn(t, j, h, generator=g)
    a = pre_value_weight(q_p, pre)
    direct = torch.tensor([[float(np.dot(q_p[i].numpy(), pre[i, k].numpy())) for k in range(j)] for i in range(t)])
    torch.testing.assert_close(a, direct)
    weighted = weight_scores(scores, a)
    for i in range(t):
        for k in range(j):
            torch.testing.assert_close(weighted[i, k], direct[i, k] * scores[i, k])


def test_v2_layer_output_equals_the_materialised_virtual_table_by_loops():
    layer = v2_layer(seed=3)
    assert layer.w_out is not None and layer.w_out.in_features == 12  # one shared projector: d_v -> D
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y.double(), reference_output(layer, x), rtol=1e-4, atol=1e-6)


def test_shared_projector_equals_e_projectors_that_are_all_the_same():
    # v1 with W_out = [W; W; W; W] pools per projector and projects: the same as one sum times W
    shared = v2_layer(seed=4, d_p=0)
    per_block = v2_layer(seed=4, d_p=0, shared_projector=False)
    assert per_block.w_out is not None and shared.w_out is not None
    with torch.no_grad():
        per_block.w_out.weight.copy_(shared.w_out.weight.repeat(1, 4))  # (D, E·d_v)
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(shared(x), per_block(x), rtol=1e-5, atol=1e-6)


def test_v2_lookup_passes_gradcheck_in_float64():
    cfg = MemoryConfig.ultramem_v2(**V2)
    layer = MemoryLayer(cfg, D, index=0, num_memory_layers=1, seed=5).double()
    g = torch.Generator().manual_seed(6)
    values = torch.randn(cfg.physical_rows, cfg.d_v, dtype=torch.float64, generator=g, requires_grad=True)
    pre = torch.randn(cfg.physical_rows, cfg.d_p, dtype=torch.float64, generator=g, requires_grad=True)
    assert layer.pre_table is not None
    layer.backend = TensorBackend({layer.table: values, layer.pre_table: pre})
    x = torch.randn(1, 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    names = ("w_q.weight", "keys_row", "keys_col", "tucker.cores", "w_out.weight", "w_p.weight",
             "q_norm_row.weight", "k_norm_row.weight", "k_norm_col.weight")
    params = dict(layer.named_parameters())

    def f(x_, values_, pre_, *tensors):
        layer.backend.tensors = {layer.table: values_, layer.pre_table: pre_}
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x_,))

    inputs = (x, values, pre, *(params[n].detach().clone().requires_grad_(True) for n in names))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


def test_pending_grads_of_both_tables_are_the_gradients_of_the_whole_tables():
    layer = v2_layer(seed=7)
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(8))
    layer(x).pow(2).sum().backward()
    got = {table: (rows.clone(), grads.clone()) for table, rows, grads in layer.pending_table_grads()}
    assert set(got) == {layer.table, layer.pre_table} and layer.pending_table_grads() == []
    tensors = {t: whole(layer, t).float().requires_grad_(True) for t in got}
    layer.backend = TensorBackend(tensors)
    layer(x).pow(2).sum().backward()
    for table, (rows, grads) in got.items():
        dense = torch.zeros_like(tensors[table]).index_add(0, rows, grads)
        torch.testing.assert_close(dense, tensors[table].grad)


# --------------------------------------------------------------------------- pooled = rows


def test_pooled_v2_equals_rows_in_output_gradients_and_table_updates():
    rows_layer, pooled_layer = v2_layer(seed=9), v2_layer(seed=9, lookup="pooled")
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(10))
    lr = 0.1
    pooled_layer.backend.begin_step(0, lr)  # pooled backward updates the value rows at once
    outs = []
    for layer in (rows_layer, pooled_layer):
        y = layer(x)
        y.pow(2).sum().backward()
        for table, rows, grads in layer.pending_table_grads():  # rows: values + pre-values; pooled: pre-values
            layer.backend.push_grads(table, rows, grads, lr, 0)
        outs.append(y.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for name in ("w_p.weight", "w_q.weight", "w_out.weight", "keys_row", "tucker.cores"):
        a, b = dict(rows_layer.named_parameters())[name].grad, dict(pooled_layer.named_parameters())[name].grad
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for table in (rows_layer.table, rows_layer.pre_table):
        torch.testing.assert_close(whole(rows_layer, table), whole(pooled_layer, table), rtol=1e-5, atol=1e-6)
    rows_layer.eval()
    pooled_layer.eval()
    with torch.no_grad():  # decoding: the pooled lookup in flight (pooled_async)
        torch.testing.assert_close(rows_layer(x), pooled_layer(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- init


def test_ffn_matched_sigma_counts_the_pre_value_weights_in():
    # the calibration's expectation over the tables against one drawn pair: P = 256 rows keep the draw's
    # own spread small (measured over 12 draws: ratio 1.05 ± 0.06; at P = 36 it is ± 0.2)
    layer = v2_layer(seed=11, num_keys=16)
    sigma = layer.calibrate_value_std(1e-4)
    assert layer.pre_value_std == pytest.approx(pre_value_std(4)) == 0.5
    spec = TableSpec(name=layer.table, rows=layer.cfg.physical_rows, dim=layer.d_v, init_std=sigma, seed=12)
    pre = TableSpec(name=layer.pre_table, rows=layer.cfg.physical_rows, dim=4, init_std=layer.pre_value_std, seed=13)
    layer.backend = LocalBackend([spec, pre])
    with torch.no_grad():
        y = layer(torch.randn(4, 512, D, generator=torch.Generator().manual_seed(14)))
    assert y.pow(2).mean().item() == pytest.approx(1e-4, rel=0.35)


def test_model_lists_a_pre_value_table_beside_each_value_table():
    cfg = load_config(preset="tiny_v2").model
    model = LanguageModel(cfg)
    specs = {s.name: s for s in model.memory_tables()}
    assert sorted(specs) == ["mem0.pre_values", "mem0.values", "mem1.pre_values", "mem1.values"]
    for k in range(cfg.n_layers):
        v, p = specs[f"mem{k}.values"], specs[f"mem{k}.pre_values"]
        assert (p.rows, p.num_partitions, p.dtype, p.optimizer, p.optimizer_args) == (
            v.rows, v.num_partitions, v.dtype, v.optimizer, v.optimizer_args)
        assert p.dim == cfg.memory.d_p == 10 and p.init_std == pytest.approx(10**-0.5)
        assert v.init_std is not None and 0 < v.init_std < 0.1  # ffn_matched, not the reference's 0.02 rule
    assert len({s.seed for s in specs.values()}) == 4
    assert set(model.backend.tables()) == set(specs)


# --------------------------------------------------------------------------- training and the backends


@pytest.mark.slow  # trains 8 steps, evaluates twice, saves and reloads a checkpoint: ~5 s of CPU (under the
# existing tiny training test's cost), the one end-to-end proof that the V2 layer learns in-process
def test_tiny_v2_trains_locally_and_its_checkpoint_generates_through_pooled_lookups(tmp_path: Path):
    # the session's token cache: tiny_v2 reads the same corpus as tiny, so it is built once per run
    cfg = load_config(preset="tiny_v2", overrides=["train.max_steps=8", "train.eval_every=0",
                                                    "train.checkpoint_every=0"])
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, tmp_path / "run", config=to_dict(cfg), progress=False)
    before = evaluate(trainer.model, trainer.corpus, trainer.data_cfg, max_batches=2, device=trainer.device)
    pre_before = trainer.backend.state_dict()["mem1.pre_values"]["values"]
    result = trainer.run()
    assert result.val_loss < before["val_loss"] - 0.3
    changed = np.any(trainer.backend.state_dict()["mem1.pre_values"]["values"] != pre_before, axis=1)
    assert changed.sum() > 0  # the pre-value rows learn
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 8 and all(r["value_lr"] == pytest.approx(r["lr"]) for r in train)  # constant 1x
    # the checkpoint, loaded into a serving (pooled) model, gives the trained model's logits
    served = LanguageModel(serving_config(cfg.model))
    checkpoint_io.load_checkpoint(result.checkpoint, served, backend=served.backend)
    tokens = torch.randint(0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    served.eval()
    with torch.no_grad():
        torch.testing.assert_close(served(tokens).logits, trainer.model(tokens).logits, rtol=1e-4, atol=1e-5)
