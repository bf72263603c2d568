"""The inference engine (model_workers/engine.py): same tokens as `generate`, batching, slots, errors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.engine import (
    Engine,
    EngineBusyError,
    EngineClosedError,
    EngineConfig,
    InvalidRequestError,
    SamplingParams,
    StepStats,
)
from model_workers.layers import KVCache
from model_workers.model import LanguageModel, ModelConfig
from model_workers.ultramem import MemoryConfig
from model_workers.values import LocalBackend

MEM = MemoryConfig(num_keys=8, d_k=16, d_v=32, heads=2, topk=4, placement="0:1", num_partitions=4)
CFG = ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, memory=MEM)
MODEL = LanguageModel(CFG).eval()


def reference(prompt: list[int], n: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[int]:
    ctx = torch.tensor([prompt[-CFG.max_seq_len:]])
    out = MODEL.generate(ctx, n, temperature=temperature, top_p=top_p, generator=torch.Generator().manual_seed(seed))
    return out[0, ctx.shape[1]:].tolist()


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = Engine(MODEL, EngineConfig(max_batch=8, batch_wait_ms=2)).start()
    try:
        yield eng
    finally:
        eng.stop()


prompts = st.lists(st.integers(0, CFG.vocab_size - 1), min_size=1, max_size=24)  # past max_seq_len too


@settings(max_examples=15, deadline=None)
@given(prompt=prompts, n=st.integers(1, 30))
def test_greedy_engine_decoding_equals_generate(prompt: list[int], n: int) -> None:
    eng = Engine(MODEL, EngineConfig(max_batch=4, batch_wait_ms=0)).start()
    try:
        assert eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0)).result(30) == reference(prompt, n)
    finally:
        eng.stop()


def test_sampling_with_a_seed_equals_generate_with_that_seed(engine: Engine) -> None:
    prompt = [5, 9, 2, 33]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.8, seed=7)
    assert engine.submit(prompt, params).result(30) == reference(prompt, 20, 0.9, 0.8, seed=7)


@settings(max_examples=5, deadline=None)
@given(batch=st.lists(st.tuples(prompts, st.integers(1, 25)), min_size=2, max_size=8))
def test_requests_decoded_together_get_the_tokens_they_get_alone(batch: list[tuple[list[int], int]]) -> None:
    eng = Engine(MODEL, EngineConfig(max_batch=8, batch_wait_ms=0)).start()
    try:
        reqs = [eng.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in batch]
        assert [r.result(30) for r in reqs] == [reference(p, n) for p, n in batch]
    finally:
        eng.stop()


def test_requests_arriving_within_the_wait_start_in_one_step() -> None:
    steps: list[StepStats] = []
    eng = Engine(MODEL, EngineConfig(max_batch=8, batch_wait_ms=300), on_step=steps.append).start()
    try:
        reqs = [eng.submit([i + 1, i + 2], SamplingParams(max_tokens=3, temperature=0)) for i in range(5)]
        for r in reqs:
            r.result(30)
        eng.stop()  # joins the decode thread: every step has been reported
        assert steps[0].batch == 5 and steps[0].prefills == 5
        assert len(steps) == 3  # 5 requests x 3 tokens in 3 steps
    finally:
        eng.stop()


def test_more_requests_than_rows_wait_for_a_free_row() -> None:
    eng = Engine(MODEL, EngineConfig(max_batch=2, batch_wait_ms=0)).start()
    try:
        reqs = [eng.submit([i + 1], SamplingParams(max_tokens=4, temperature=0)) for i in range(5)]
        assert [r.result(30) for r in reqs] == [reference([i + 1], 4) for i in range(5)]
        assert eng.active_count == 0
    finally:
        eng.stop()


def test_cancelled_sequence_frees_its_row(engine: Engine, wait_until) -> None:
    keep = engine.submit([3, 4], SamplingParams(max_tokens=60, temperature=0))
    gone = engine.submit([1, 2], SamplingParams(max_tokens=4000, temperature=0))
    gone.next_token(10)
    gone.cancel()
    assert keep.result(30) == reference([3, 4], 60)  # the other sequence is not disturbed
    wait_until(lambda: engine.active_count == 0, what="the engine to free the cancelled row at its next step")
    assert gone.finish_reason == "cancelled"
    assert len(gone.tokens) < 4000


@pytest.mark.parametrize(("prompt", "params"), [
    ([], SamplingParams()),
    ([CFG.vocab_size], SamplingParams()),
    ([1], SamplingParams(max_tokens=0)),
    ([1], SamplingParams(max_tokens=10**6)),
    ([1], SamplingParams(temperature=-0.5)),
    ([1], SamplingParams(top_p=0.0)),
    ([1], SamplingParams(top_p=float("nan"))),
])
def test_out_of_range_request_is_refused_before_queueing(engine: Engine, prompt: list[int],
                                                         params: SamplingParams) -> None:
    with pytest.raises(InvalidRequestError):
        engine.submit(prompt, params)
    assert engine.queued_count == 0


def test_full_queue_raises_busy_and_stopped_engine_raises_closed() -> None:
    eng = Engine(MODEL, EngineConfig(max_batch=1, max_queue=2))  # not started: nothing drains the queue
    eng.submit([1])
    eng.submit([2])
    with pytest.raises(EngineBusyError):
        eng.submit([3])
    eng.stop()
    with pytest.raises(EngineClosedError):
        eng.submit([1])


class _FailingBackend(LocalBackend):
    def fetch_rows(self, table: str, rows: torch.Tensor) -> torch.Tensor:
        raise ConnectionError("shard unreachable")


def test_backend_failure_fails_the_running_requests_and_the_engine_keeps_serving() -> None:
    model = LanguageModel(CFG).eval()
    good = model.backend
    model.set_backend(_FailingBackend(model.memory_tables()))
    eng = Engine(model, EngineConfig(max_batch=4, batch_wait_ms=0)).start()
    try:
        req = eng.submit([1, 2], SamplingParams(max_tokens=3, temperature=0))
        with pytest.raises(ConnectionError):
            req.result(10)
        assert req.finish_reason == "error" and eng.active_count == 0
        model.set_backend(good)  # type: ignore[arg-type]
        assert eng.submit([1, 2], SamplingParams(max_tokens=3, temperature=0)).result(10) == reference([1, 2], 3)
    finally:
        eng.stop()


def test_per_row_positions_decode_like_separate_caches() -> None:
    """KVCache.positions: rows at different positions decode as if each had its own cache."""
    seqs = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    singles, caches = [], []
    for s in seqs:
        c = MODEL.new_cache(1)
        MODEL(torch.tensor([s]), cache=c)
        caches.append(c)
        singles.append(MODEL(torch.tensor([[s[-1]]]), cache=c).logits[0, -1])
    batched = MODEL.new_cache(len(seqs))
    for i, s in enumerate(seqs):  # refill row i with the prefix, then decode all rows at once
        MODEL(torch.tensor([s]), cache=KVCache([k[i:i + 1] for k in batched.keys],
                                                [v[i:i + 1] for v in batched.values]))
    batched.positions = torch.tensor([len(s) for s in seqs])
    logits = MODEL(torch.tensor([[s[-1]] for s in seqs]), cache=batched).logits[:, -1]
    torch.testing.assert_close(logits, torch.stack(singles), rtol=1e-5, atol=1e-5)
    assert batched.positions.tolist() == [len(s) + 1 for s in seqs]
