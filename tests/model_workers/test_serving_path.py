"""The decode fast path of the memory layer (issue 6, DESIGN §6): eval-time caches, the decode TDQKR
and the overlapped pooled lookup give the results of the plain path, and every cache is dropped
as soon as the parameters it came from change (optimizer step, load_state_dict, in-place edits,
running statistics, the TDQKR filter refresh, train())."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.eval_cache import EvalCache, EvalCached
from model_workers.model import LanguageModel
from model_workers.tdqkr import DecodeKeys, rank_scores, tdqkr_topk, tdqkr_topk_decode
from model_workers.ultramem import MemoryConfig, MemoryLayer
from model_workers.values import LocalBackend
from orchestration.config import load_config
from storage.layout import TableSpec

D = 16


def layer_of(seed: int = 0, **kw) -> MemoryLayer:
    cfg = MemoryConfig(**{"num_keys": 8, "d_k": 8, "d_v": 8, "heads": 2, "topk": 3, "placement": "0:1",
                          "query_norm": "whiten", **kw})  # whitening: its Cholesky factor is cached too
    layer = MemoryLayer(cfg, D, index=0, num_memory_layers=1, seed=seed)
    spec = TableSpec(name=layer.table, rows=cfg.physical_rows, dim=layer.d_v, optimizer="sgd", init_std=0.3)
    layer.backend = LocalBackend([spec])
    return layer


def plain_output(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's eval output computed with every cache and the decode path switched off."""
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(EvalCache, "usable", staticmethod(lambda owner, sources: False))
        return layer(x)


def eval_output(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return layer.eval()(x)


def fresh_output(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """The eval output of a copy of the layer that starts with empty caches (bit-comparable)."""
    clone = copy.deepcopy(layer)
    for module in clone.modules():
        if isinstance(module, EvalCached):
            module.eval_cache.clear()
    clone.backend = layer.backend
    return eval_output(clone, x)


def inputs(seed: int, tokens: int = 5) -> torch.Tensor:
    return torch.randn(1, tokens, D, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), qk_norm=st.booleans(), share_query=st.booleans())
def test_cached_key_scores_equal_freshly_computed_ones_bit_for_bit(seed: int, qk_norm: bool, share_query: bool):
    layer = layer_of(seed, qk_norm=qk_norm, share_query=share_query).eval()
    q_row, q_col = layer.query(inputs(seed).reshape(-1, D))
    with torch.no_grad():
        first = layer.key_scores(q_row, q_col)  # fills the cache
        again = layer.key_scores(q_row, q_col)  # served from it
        layer.eval_cache.clear()
        fresh = layer.train().key_scores(q_row, q_col)  # training never uses the cache
    assert len(layer.eval_cache) == 0
    for a, b, c in zip(first, again, fresh, strict=True):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_eval_whitening_reuses_one_cholesky_factor_and_matches_a_fresh_one():
    layer = layer_of(1)
    layer(inputs(1, 40))  # a training forward moves the running statistics off the identity
    layer.eval()
    q = torch.randn(7, layer.q_stats.running_cov.shape[0])
    with torch.no_grad():
        cached = [layer.q_stats(q) for _ in range(3)]
    assert layer.q_stats.eval_cache.misses == 1
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(EvalCache, "usable", staticmethod(lambda owner, sources: False))
        fresh = layer.q_stats(q)
    assert all(torch.equal(c, fresh) for c in cached)


def decode(layer: MemoryLayer, x: torch.Tensor) -> torch.Tensor:
    """A forward without autograd that leaves the mode alone (eval()/train() would clear the caches)."""
    with torch.no_grad():
        return layer(x)


def test_running_statistics_update_is_seen_by_the_next_eval_forward():
    layer = layer_of(2)
    x = inputs(2)
    before = eval_output(layer, x)
    layer.train()(inputs(3, 40))  # lerp_ on running_mean / running_cov
    after = eval_output(layer, x)
    assert not torch.equal(before, after)
    assert torch.equal(after, fresh_output(layer, x))
    with torch.no_grad():  # still in eval mode: only the version of running_cov tells the cache
        layer.q_stats.running_cov.mul_(2.0)
    edited = decode(layer, x)
    assert not torch.equal(edited, after)
    assert torch.equal(edited, fresh_output(layer, x))


def test_optimizer_step_in_eval_mode_invalidates_the_cached_keys_and_filters():
    layer = layer_of(3).eval()  # stays in eval mode throughout: no train()/eval() clears the caches
    x = inputs(4)
    before = decode(layer, x)
    misses = layer.eval_cache.misses
    assert torch.equal(decode(layer, x), before) and layer.eval_cache.misses == misses  # a cache hit
    opt = torch.optim.AdamW(layer.parameters(), lr=0.05)
    layer(inputs(5, 20)).pow(2).sum().backward()  # eval with autograd: the cache is not used
    opt.step()  # in place: the versions of keys and cores move
    layer.after_optimizer_step()  # the TDQKR filter refresh writes filter_u / filter_v in place
    got = decode(layer, x)
    assert layer.eval_cache.misses > misses
    assert not torch.equal(got, before)
    assert torch.equal(got, fresh_output(layer, x))
    torch.testing.assert_close(got, plain_output(layer, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["keys_row", "keys_col", "k_norm_row.weight", "k_norm_col.weight",
                                  "tucker.filter_u", "tucker.filter_v"])
def test_in_place_edit_of_a_source_is_seen_by_the_next_decode_step(name: str):
    layer = layer_of(7).eval()
    x = inputs(11)
    before = decode(layer, x)
    with torch.no_grad():
        layer.get_buffer(name).mul_(-1.0) if name.startswith("tucker") else layer.get_parameter(name).mul_(-1.0)
    edited = decode(layer, x)
    assert not torch.equal(edited, before)
    assert torch.equal(edited, fresh_output(layer, x))


def test_replaced_parameter_data_is_seen_by_the_next_decode_step():
    layer = layer_of(8).eval()
    x = inputs(12)
    before = decode(layer, x)
    layer.keys_row.data = torch.randn_like(layer.keys_row)  # a new tensor: the storage address changes
    edited = decode(layer, x)
    assert not torch.equal(edited, before)
    assert torch.equal(edited, fresh_output(layer, x))


def test_load_state_dict_makes_the_layer_answer_like_the_layer_it_was_loaded_from():
    source, target = layer_of(10), layer_of(11)
    target.backend = source.backend  # the same table: only the dense parameters differ
    x = inputs(6)
    eval_output(target, x)  # target's own keys cached
    target.load_state_dict(source.state_dict())
    assert len(target.eval_cache) == 0
    assert torch.equal(eval_output(target, x), eval_output(source, x))


def test_train_mode_clears_the_cache_and_does_not_fill_it():
    layer = layer_of(4)
    eval_output(layer, inputs(7))
    assert len(layer.eval_cache) > 0 and len(layer.q_stats.eval_cache) > 0
    layer.train()
    assert len(layer.eval_cache) == 0 and len(layer.q_stats.eval_cache) == 0
    layer(inputs(8, 10))
    assert len(layer.eval_cache) == 0


def test_eval_with_autograd_keeps_gradients_to_the_keys():
    layer = layer_of(5).eval()
    layer(inputs(9)).sum().backward()  # grad enabled: the cache (which has no graph) is not used
    assert layer.keys_row.grad is not None and layer.keys_row.grad.abs().sum() > 0
    assert len(layer.eval_cache) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 9), keys=st.sampled_from([4, 8, 16]),
       topk=st.integers(1, 4), heads=st.integers(1, 3), rank=st.integers(1, 3), signed=st.booleans())
def test_decode_tdqkr_selects_what_the_training_path_selects(seed, tokens, keys, topk, heads, rank, signed):
    gen = torch.Generator().manual_seed(seed)
    d_k = 8
    k_row = torch.nn.functional.normalize(torch.randn(heads, keys, d_k, rank, generator=gen), dim=2)
    k_col = torch.nn.functional.normalize(torch.randn(heads, keys, d_k, rank, generator=gen), dim=2)
    q_row, q_col = torch.randn(tokens, 1, d_k, generator=gen), torch.randn(tokens, 1, d_k, generator=gen)
    cores = torch.rand(2, heads, rank, rank, generator=gen)
    u, v = torch.randn(heads, rank, generator=gen), torch.randn(heads, rank, generator=gen)
    want_index, want_scores = tdqkr_topk(rank_scores(q_row, k_row), rank_scores(q_col, k_col), cores, u, v, topk,
                                         signed=signed)
    got_index, got_scores = tdqkr_topk_decode(q_row[:, 0], q_col[:, 0], DecodeKeys.make(k_row, u),
                                              DecodeKeys.make(k_col, v), cores, topk, signed=signed)
    assert torch.equal(got_index, want_index)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tdqkr_filter", ["top", "signed"])
def test_layer_decode_path_selects_the_training_paths_slots_with_either_filter(tdqkr_filter: str):
    layer = layer_of(11, num_keys=16, topk=3, tdqkr_filter=tdqkr_filter).eval()
    x = inputs(12, tokens=9)
    with torch.no_grad():
        q_row, q_col = layer.query(x.reshape(-1, D))
        want_index, want_scores = layer.retrieve(*layer.key_scores(q_row, q_col))
        got_index, got_scores = layer.retrieve_decode(q_row, q_col)
    assert torch.equal(got_index, want_index)
    torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_output(layer, x), plain_output(layer, x), rtol=1e-5, atol=1e-6)


def test_signed_layer_reads_slots_the_top_filter_cannot_reach():
    top, signed = layer_of(13, num_keys=16, topk=3), layer_of(13, num_keys=16, topk=3, tdqkr_filter="signed")
    x = inputs(14, tokens=64)
    with torch.no_grad():
        picked = [layer.eval().retrieve_decode(*layer.query(x.reshape(-1, D)))[0] for layer in (top, signed)]
    assert not torch.equal(picked[0], picked[1])  # same weights, the signed grid finds other winners


def test_layer_takes_the_decode_path_only_in_eval_without_autograd():
    layer = layer_of(6)
    calls = []
    original = layer.retrieve_decode
    layer.retrieve_decode = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    x = inputs(10)
    layer(x)  # training
    layer.eval()(x)  # eval with autograd
    assert calls == []
    eval_output(layer, x)
    assert calls == [1]


class AsyncPooled(LocalBackend):
    """A LocalBackend that also answers pooled lookups on another thread, like RemoteBackend."""

    def __init__(self, specs) -> None:
        super().__init__(specs)
        self.async_calls = 0

    def pooled_async(self, table, rows, projector, token, scores, num_tokens, num_projectors) -> Future:
        self.async_calls += 1
        done: Future = Future()
        threading.Thread(target=lambda: done.set_result(
            self.pooled(table, rows, projector, token, scores, num_tokens, num_projectors))).start()
        return done


def test_pooled_decoding_through_an_async_backend_gives_the_synchronous_logits():
    cfg = load_config(preset="tiny", overrides=['model.memory.lookup="pooled"']).model
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(tokens).logits
    backend = AsyncPooled(model.memory_tables())
    for spec in model.memory_tables():
        backend.import_partitions(spec, model.backend.export_partitions(spec.name))
    model.set_backend(backend)
    with torch.no_grad():
        got = model(tokens).logits
    assert backend.async_calls == len(model.memories)
    assert torch.equal(got, want)
    model(tokens)  # with autograd the pooled lookup stays synchronous (its backward needs the graph)
    assert backend.async_calls == len(model.memories)
