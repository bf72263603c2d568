"""Value backends (docs/internals.md model_workers/values.py): LocalBackend against references."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.values import InvalidRowsError, LocalBackend, UnknownTableError, ValueBackend
from param_server.optimizers import SparseOptimizerConfig, make_optimizer, sum_duplicates
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table


def spec(**kw) -> TableSpec:
    base = {"name": "mem0.values", "rows": 37, "dim": 4, "num_partitions": 8, "init_std": 0.5, "seed": 3}
    return TableSpec(**{**base, **kw})


def test_local_backend_is_a_value_backend_serving_its_specs():
    backend = LocalBackend([spec(), spec(name="mem1.values", rows=9)])
    assert isinstance(backend, ValueBackend)
    assert {n: s.rows for n, s in backend.tables().items()} == {"mem0.values": 37, "mem1.values": 9}


def test_initial_rows_equal_the_partitioned_table_layout():
    s = spec()
    got = LocalBackend([s]).fetch_rows(s.name, torch.arange(s.rows))
    for r in (0, 5, 8, 36):  # row r = local row r // NP of partition r % NP
        np.testing.assert_array_equal(got[r].numpy(), init_partition_values(s, r % 8)[r // 8])


def test_initial_tables_equal_a_table_created_on_disk_from_the_same_spec(tmp_path):
    s = spec()
    store = create_table(tmp_path / s.name, s, initialize=True)
    exported = LocalBackend([s]).export_partitions(s.name)
    for p in range(s.num_partitions):
        np.testing.assert_array_equal(exported[p]["values"], store.read_partition(p)["values"])


def test_seed_argument_overrides_every_spec_seed():
    a = LocalBackend([spec()], seed=11).fetch_rows("mem0.values", torch.arange(5))
    b = LocalBackend([spec(seed=11)]).fetch_rows("mem0.values", torch.arange(5))
    c = LocalBackend([spec()]).fetch_rows("mem0.values", torch.arange(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fetched_rows_are_float32_copies_even_for_bfloat16_tables():
    s = spec(dtype="bfloat16")
    backend = LocalBackend([s])
    rows = backend.fetch_rows(s.name, torch.tensor([3, 1]))
    assert rows.dtype == torch.float32 and rows.shape == (2, 4)
    rows.add_(100.0)
    again = backend.fetch_rows(s.name, torch.tensor([3, 1]))
    assert again.abs().max() < 50
    assert backend.state_dict()[s.name]["values"].dtype == np.dtype(ml_dtypes.bfloat16)


@settings(max_examples=30, deadline=None)
@given(rows=st.lists(st.integers(0, 36), min_size=1, max_size=30), lr=st.floats(1e-3, 1.0))
def test_sgd_push_sums_duplicate_rows_before_the_update(rows, lr):
    s = spec(optimizer="sgd")
    backend = LocalBackend([s])
    before = backend.fetch_rows(s.name, torch.arange(37)).numpy().copy()
    r = torch.tensor(rows)
    g = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(len(rows)))
    backend.push_grads(s.name, r, g, lr=lr, step=0)
    after = backend.fetch_rows(s.name, torch.arange(37)).numpy()
    expect = before.copy()
    for i, row in enumerate(rows):  # the textbook rule on the summed gradient
        expect[row] -= np.float32(lr) * g[i].numpy()
    np.testing.assert_allclose(after, expect, rtol=1e-5, atol=1e-5)


def test_adamw_push_applies_param_servers_optimizer_to_the_summed_gradients():
    s = spec(optimizer_args=(("beta2", 0.95), ("weight_decay", 0.1)))
    backend = LocalBackend([s])
    ref_values = backend.state_dict()[s.name]["values"].copy()
    ref_state = {k: v.copy() for k, v in backend.state_dict()[s.name]["state"].items()}
    opt = make_optimizer(SparseOptimizerConfig.from_spec(s))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        rows = torch.tensor([4, 9, 4, 30, 9, 9])
        grads = torch.randn(6, 4, generator=gen)
        backend.push_grads(s.name, rows, grads, lr=0.01, step=step)
        u, summed = sum_duplicates(rows.numpy(), grads.numpy())
        opt.step(ref_values, ref_state, u, summed, 0.01)
    got = backend.state_dict()[s.name]
    np.testing.assert_array_equal(got["values"], ref_values)
    for k, want in ref_state.items():
        np.testing.assert_array_equal(got["state"][k], want)
    assert got["state"]["step"][[4, 9, 30, 0]].tolist() == [3, 3, 3, 0]


def test_bad_pushes_raise_typed_errors_and_change_nothing():
    s = spec()
    backend = LocalBackend([s])
    before = backend.state_dict()
    with pytest.raises(InvalidRowsError):
        backend.push_grads(s.name, torch.tensor([1, 37]), torch.ones(2, 4), lr=1.0, step=0)
    with pytest.raises(InvalidRowsError):
        backend.push_grads(s.name, torch.tensor([1, 2]), torch.ones(3, 4), lr=1.0, step=0)
    with pytest.raises(InvalidRowsError):
        backend.push_grads(s.name, torch.tensor([1]), torch.full((1, 4), float("nan")), lr=1.0, step=0)
    with pytest.raises(InvalidRowsError):
        backend.fetch_rows(s.name, torch.tensor([-1]))
    with pytest.raises(UnknownTableError) as err:
        backend.fetch_rows("nope", torch.tensor([0]))
    assert isinstance(err.value, KeyError)
    after = backend.state_dict()
    np.testing.assert_array_equal(before[s.name]["values"], after[s.name]["values"])


def _trained(s: TableSpec) -> LocalBackend:
    backend = LocalBackend([s])
    backend.push_grads(s.name, torch.tensor([0, 5, 36]), torch.ones(3, 4), lr=0.1, step=0)
    return backend


def _assert_same(a: LocalBackend, b: LocalBackend) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name]["spec"] == sb[name]["spec"]
        np.testing.assert_array_equal(sa[name]["values"], sb[name]["values"])
        for k in sa[name]["state"]:
            np.testing.assert_array_equal(sa[name]["state"][k], sb[name]["state"][k])


def test_state_dict_round_trip_restores_values_and_optimizer_state():
    s = spec()
    trained = _trained(s)
    fresh = LocalBackend([s])
    fresh.load_state_dict(trained.state_dict())
    _assert_same(fresh, trained)


def test_partitions_round_trip_through_a_table_store(tmp_path):
    s = spec()
    trained = _trained(s)
    store = create_table(tmp_path / s.name, s, initialize=False)
    for p, arrays in trained.export_partitions(s.name).items():
        store.write_partition(p, arrays)
    restored = LocalBackend()
    restored.import_partitions(s, {p: store.read_partition(p) for p in range(s.num_partitions)})
    _assert_same(restored, trained)


def test_import_with_missing_partitions_is_rejected():
    s = spec()
    parts = LocalBackend([s]).export_partitions(s.name)
    del parts[3]
    with pytest.raises(InvalidRowsError, match="partitions"):
        LocalBackend().import_partitions(s, parts)
