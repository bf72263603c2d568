"""Pooled mode (DESIGN §4.2, §3.1 step 6): the backend pools, the worker never sees a raw row.

The oracle is rows mode: fetch the selected rows, pool them with autograd, push the row gradients.
Pooled mode must give the same outputs, score gradients and table updates to float tolerance, in
process (LocalBackend) and through real gRPC shards (RemoteBackend, sync), over 20 training steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.engine import serving_config
from model_workers.ive import pooled_lookup, pooled_sum
from model_workers.model import LanguageModel, ModelConfig
from model_workers.remote import RemoteBackend
from model_workers.trainer import TrainConfig, make_optimizer, train_step
from model_workers.ultramem import MemoryConfig, ModelConfigError
from model_workers.values import InvalidRowsError, LocalBackend, PooledStepError
from orchestration.config import load_config
from param_server.client import Client
from param_server.scratch import ScratchPool
from param_server.server import create_server
from param_server.shard import Shard
from storage.layout import TableSpec

STEPS = 20


def table_spec(optimizer: str = "sgd", dim: int = 8) -> TableSpec:
    return TableSpec(name="t", rows=23, dim=dim, num_partitions=4, optimizer=optimizer, init_std=0.5, seed=5)


def lookup_args(seed: int, n: int, num_tokens: int, e: int, h: int, rows: int = 23):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, rows, (n,), generator=g), torch.randint(0, e, (n,), generator=g),
            torch.randint(0, num_tokens, (n,), generator=g), torch.randn(n, h, generator=g))


def rows_mode(backend: LocalBackend, rows, projector, token, scores, num_tokens: int, e: int):
    """The oracle: gathered rows as a leaf, pooled per (token, projector) with autograd -> (o [T, E, d_v], leaf)."""
    unique, inverse = torch.unique(rows, return_inverse=True)
    leaf = backend.fetch_rows("t", unique).requires_grad_(True)
    v = leaf[inverse]  # (n, d_v)
    n, d_v = v.shape
    h = scores.shape[1]
    weighted = (v.view(n, h, d_v // h) * scores.unsqueeze(-1)).view(n, d_v)
    out = torch.zeros(num_tokens * e, d_v).index_add(0, token * e + projector, weighted)
    return out.view(num_tokens, e, d_v), unique, leaf


# --------------------------------------------------------------------------- config and plumbing


def test_lookup_must_be_rows_or_pooled_and_rows_is_the_default():
    assert MemoryConfig().lookup == "rows"
    with pytest.raises(ModelConfigError, match="lookup"):
        MemoryConfig(lookup="bytes")  # type: ignore[arg-type]


def test_serving_config_switches_memory_to_pooled_and_leaves_dense_models_alone():
    cfg = load_config(preset="tiny").model
    assert serving_config(cfg).memory.lookup == "pooled"
    assert serving_config(cfg).memory == replace(cfg.memory, lookup="pooled")
    dense = ModelConfig(ffn_kind="dense")
    assert serving_config(dense) is dense


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 40), num_tokens=st.integers(1, 6),
       e=st.integers(1, 4), h=st.sampled_from([1, 2, 4]))
def test_local_pooled_equals_pooling_the_fetched_rows(seed, n, num_tokens, e, h):
    backend = LocalBackend([table_spec()])
    rows, projector, token, scores = lookup_args(seed, n, num_tokens, e, h)
    got = backend.pooled("t", rows, projector, token, scores, num_tokens, e)
    want, _, _ = rows_mode(backend, rows, projector, token, scores, num_tokens, e)
    assert got.shape == (num_tokens, e, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "adagrad"])
def test_local_pooled_backward_gives_autograd_score_grads_and_the_pushed_update(optimizer):
    rows, projector, token, scores = lookup_args(7, 30, 5, 3, 2, rows=6)  # rows repeat a lot
    grad_out = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(8))
    oracle, pooled = LocalBackend([table_spec(optimizer)]), LocalBackend([table_spec(optimizer)])
    s = scores.clone().requires_grad_(True)
    out, unique, leaf = rows_mode(oracle, rows, projector, token, s, 5, 3)
    out.backward(grad_out)
    oracle.push_grads("t", unique, leaf.grad, lr=0.05, step=3)

    pooled.begin_step(3, 0.05)
    grad_scores = pooled.pooled_backward("t", rows, projector, token, scores, grad_out)
    torch.testing.assert_close(grad_scores, s.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled.state_dict()["t"]["values"], oracle.state_dict()["t"]["values"],
                               rtol=1e-5, atol=1e-6)
    for key, state in oracle.state_dict()["t"]["state"].items():
        np.testing.assert_allclose(pooled.state_dict()["t"]["state"][key], state, rtol=1e-5, atol=1e-6)


def test_pooled_backward_before_begin_step_raises_and_changes_nothing():
    backend = LocalBackend([table_spec()])
    before = backend.state_dict()["t"]["values"]
    rows, projector, token, scores = lookup_args(1, 10, 2, 2, 2)
    with pytest.raises(PooledStepError, match="begin_step"):
        backend.pooled_backward("t", rows, projector, token, scores, torch.ones(2, 2, 8))
    np.testing.assert_array_equal(backend.state_dict()["t"]["values"], before)


def test_pooled_backward_with_nonfinite_grad_out_is_refused_and_changes_nothing():
    backend = LocalBackend([table_spec()])
    backend.begin_step(0, 0.1)
    before = backend.state_dict()["t"]["values"]
    rows, projector, token, scores = lookup_args(1, 10, 2, 2, 2)
    with pytest.raises(InvalidRowsError, match="non-finite"):
        backend.pooled_backward("t", rows, projector, token, scores, torch.full((2, 2, 8), float("nan")))
    with pytest.raises(InvalidRowsError, match="token ids"):
        backend.pooled("t", rows, projector, token + 5, scores, 2, 2)
    np.testing.assert_array_equal(backend.state_dict()["t"]["values"], before)


class NoRowsBackend(LocalBackend):
    """A LocalBackend that refuses to hand out rows: pooled mode must never ask."""

    def fetch_rows(self, table, rows):
        raise AssertionError("pooled mode fetched raw rows")

    def push_grads(self, table, rows, grads, lr, step):
        raise AssertionError("pooled mode pushed row gradients")


def test_pooled_layer_reaches_values_only_through_pooled_calls():
    cfg = tiny_config("pooled")
    model = LanguageModel(cfg, backend=NoRowsBackend(LanguageModel(cfg).memory_tables()))
    train = TrainConfig(max_steps=2, warmup_steps=1, autocast="off")
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    res = train_step(model, make_optimizer(model, train), tokens[:, :-1], tokens[:, 1:], step=0, cfg=train,
                     max_steps=2)
    assert np.isfinite(res.loss)


def test_pooled_lookup_is_differentiable_in_the_scores_only():
    backend = LocalBackend([table_spec()])
    backend.begin_step(0, 0.0)  # lr 0: the table stays, so autograd can be compared with the rows path
    rows = torch.randint(0, 23, (3, 4), generator=torch.Generator().manual_seed(2))
    projector = torch.randint(0, 2, (3, 4), generator=torch.Generator().manual_seed(3))
    scores = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(4), requires_grad=True)
    out = pooled_lookup(backend, "t", rows, projector, scores, 2)
    (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    ref_scores = scores.detach().clone().requires_grad_(True)
    ref = pooled_sum(backend.fetch_rows("t", rows.reshape(-1)).view(3, 4, 8), projector, ref_scores, 2)
    (ref * torch.arange(ref.numel()).view(ref.shape)).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.grad, ref_scores.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 20 training steps


def tiny_config(lookup: str) -> ModelConfig:
    cfg = load_config(preset="tiny").model
    return replace(cfg, memory=replace(cfg.memory, lookup=lookup))


def train_20(model: LanguageModel, steps: int = STEPS) -> list[float]:
    """`steps` sync steps on one fixed random batch (fp32, so it is learnt), returns the losses."""
    train = TrainConfig(max_steps=steps, warmup_steps=2, autocast="off")
    opt = make_optimizer(model, train)
    tokens = torch.randint(0, model.cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(steps):
        losses.append(train_step(model, opt, tokens[:, :-1], tokens[:, 1:], step=step, cfg=train,
                                 max_steps=steps).loss)
    return losses


def assert_same_training(a: LanguageModel, b: LanguageModel, tables_a: dict, tables_b: dict) -> None:
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if p.dtype.is_floating_point:
            torch.testing.assert_close(q, p, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert tables_a.keys() == tables_b.keys()
    for name in tables_a:
        np.testing.assert_allclose(tables_b[name], tables_a[name], rtol=1e-4, atol=2e-5, err_msg=name)


def local_tables(model: LanguageModel) -> dict[str, np.ndarray]:
    return {name: entry["values"] for name, entry in model.backend.state_dict().items()}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def local_rows_run() -> tuple[LanguageModel, list[float]]:
    torch.manual_seed(0)
    model = LanguageModel(tiny_config("rows"))
    return model, train_20(model)


def test_twenty_sync_steps_in_process_pooled_match_rows(local_rows_run):
    rows_model, rows_losses = local_rows_run
    torch.manual_seed(0)
    pooled_model = LanguageModel(tiny_config("pooled"))
    pooled_losses = train_20(pooled_model)
    np.testing.assert_allclose(pooled_losses, rows_losses, rtol=1e-5)
    assert rows_losses[-1] < rows_losses[0] - 0.3  # it did learn, so the comparison means something
    assert_same_training(rows_model, pooled_model, local_tables(rows_model), local_tables(pooled_model))


class Shards:
    """Two in-process gRPC shards holding the initial tables of a model config (partitions p % 2)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.specs = LanguageModel(cfg).memory_tables()
        initial = LocalBackend(self.specs)
        self.shards = [Shard(shard_id=i) for i in range(2)]
        for spec in self.specs:
            parts = initial.export_partitions(spec.name)
            for i, shard in enumerate(self.shards):
                shard.add_table(spec, {p: a for p, a in parts.items() if p % 2 == i})
        self.servers = [create_server(shard)[0].start() for shard in self.shards]
        self.client = Client([s.address for s in self.servers])

    def tables(self) -> dict[str, np.ndarray]:
        out = {}
        for spec in self.specs:
            parts = {p: a for shard in self.shards for p, a in shard.export_partitions(spec.name).items()}
            values = np.zeros((spec.rows, spec.dim), np.float32)
            for p, arrays in parts.items():
                values[p :: spec.num_partitions] = arrays["values"][: spec.valid_rows(p)]
            out[spec.name] = values
        return out

    def close(self) -> None:
        self.client.close()
        for server in self.servers:
            server.stop(0)
        for shard in self.shards:
            shard.close()


@pytest.fixture
def shards_for() -> Iterator:
    made: list[Shards] = []

    def make(lookup: str) -> Shards:
        made.append(Shards(tiny_config(lookup)))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_rows_answers_reuse_a_kept_buffer_only_once_nothing_references_the_last_one(shards_for):
    """Rows-mode answers land in kept buffers: a held answer is never overwritten by the next
    lookup, and its buffer is taken again once it is dropped."""
    shards = shards_for("rows")
    pool = ScratchPool(64 << 20, min_bytes=0)  # every answer pooled, however small
    backend = RemoteBackend(shards.client, shards.specs, consistency="sync", answer_pool=pool)
    spec = shards.specs[0]
    table = shards.tables()[spec.name]
    rng = np.random.default_rng(0)
    first_rows, second_rows = rng.choice(spec.rows, 40), rng.choice(spec.rows, 40)
    first = backend.fetch_rows(spec.name, torch.from_numpy(first_rows))
    second = backend.fetch_rows(spec.name, torch.from_numpy(second_rows))  # while `first` is held
    assert pool.fresh == 2 and pool.reused == 0
    assert first.data_ptr() != second.data_ptr()
    np.testing.assert_array_equal(first.numpy(), table[first_rows])  # not overwritten
    np.testing.assert_array_equal(second.numpy(), table[second_rows])
    first_ptr = first.data_ptr()
    del first
    third = backend.fetch_rows(spec.name, torch.from_numpy(second_rows[:30]))
    assert pool.reused == 1 and third.data_ptr() == first_ptr
    np.testing.assert_array_equal(third.numpy(), table[second_rows[:30]])
    np.testing.assert_array_equal(second.numpy(), table[second_rows])


@pytest.mark.slow
def test_twenty_sync_steps_through_grpc_shards_pooled_match_rows(shards_for, local_rows_run):
    runs = {}
    for lookup in ("rows", "pooled"):
        shards = shards_for(lookup)
        backend = RemoteBackend(shards.client, shards.specs, consistency="sync")
        torch.manual_seed(0)
        model = LanguageModel(tiny_config(lookup), backend=backend)
        losses = train_20(model)
        backend.flush()
        runs[lookup] = (model, losses, shards.tables())
        for shard in shards.shards:  # every step reached every shard, so min_step lookups could pass
            assert all(shard.applied_step(0, spec.name) == STEPS - 1 for spec in shards.specs)
    (rows_model, rows_losses, rows_tables), (pooled_model, pooled_losses, pooled_tables) = runs.values()
    np.testing.assert_allclose(pooled_losses, rows_losses, rtol=1e-5)
    assert_same_training(rows_model, pooled_model, rows_tables, pooled_tables)
    local_model, local_losses = local_rows_run  # and one worker in sync mode == local training
    np.testing.assert_allclose(pooled_losses, local_losses, rtol=1e-5)
    assert_same_training(local_model, pooled_model, local_tables(local_model), pooled_tables)


def test_two_pooled_v2_layers_through_grpc_shards_in_sync_match_local_training():
    # tiny_v2: a memory layer in each of the two blocks, each with pre-values scored on the shards.
    # Each layer's pooled backward waits only for the previous step's updates, never for the update
    # the other layer's backward has just sent in the same step (which would wait forever)
    cfg = load_config(preset="tiny_v2").model
    cfg = replace(cfg, memory=replace(cfg.memory, lookup="pooled"))
    shards = Shards(cfg)
    try:
        backend = RemoteBackend(shards.client, shards.specs, consistency="sync")
        torch.manual_seed(0)
        remote = LanguageModel(cfg, backend=backend)
        remote_losses = train_20(remote, steps=4)
        backend.flush()
        remote_tables = shards.tables()
    finally:
        shards.close()
    torch.manual_seed(0)
    local = LanguageModel(cfg)
    local_losses = train_20(local, steps=4)
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-5)
    assert_same_training(local, remote, local_tables(local), remote_tables)
    assert {"mem0.pre_values", "mem1.pre_values"} <= set(remote_tables)


def test_remote_pooled_lookup_in_bfloat16_is_close_to_float32(shards_for):
    shards = shards_for("pooled")
    spec = shards.specs[0]
    rows, projector, token, scores = lookup_args(3, 64, 8, 4, 2, rows=spec.rows)
    exact = LocalBackend(shards.specs).pooled(spec.name, rows, projector, token, scores, 8, 4)
    for wire_dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        backend = RemoteBackend(shards.client, shards.specs, wire_dtype=wire_dtype)
        got = backend.pooled(spec.name, rows, projector, token, scores, 8, 4)
        torch.testing.assert_close(got, exact, rtol=tol, atol=tol)
    assert backend.lookups == 1 and backend.rows_fetched == 64
