"""The inference engine (DESIGN §6): KV-cache decoding with dynamic batching over one model.

One background thread owns the model. Requests (`Engine.submit`) wait in a bounded queue; when the
engine is idle it waits up to `batch_wait_ms` after the first arrival so that requests arriving
together start together, and while it is busy new requests join at the next step (continuous
batching). Every step the engine:

  1. prefills each newly admitted prompt into a free row of one shared KV cache [max_batch, ...],
  2. samples one token for every running sequence (greedy rows at once, others one by one with
     their own seeded generator) and hands it to the request's stream,
  3. frees the rows of finished or cancelled sequences (the last row moves into the hole, so the
     running rows stay 0..n-1 and the cache is used through views, without copies),
  4. decodes the next position of all running rows in one forward (`KVCache.positions`: each row
     at its own position), or re-prefills a row whose context is full, as `LanguageModel.generate`.

A single sequence takes exactly the path of `LanguageModel.generate` (same prefill, same cache
layout, same sampling call), so greedy decoding through the engine gives the tokens of
`ultramem generate` from the same checkpoint. Memory lookups go wherever the model's ValueBackend
points: the engine never sees it. Serving builds the model with `serving_config`, which switches the
memory layers to pooled lookups (DESIGN §6: shards answer partial sums [T, E, d_v], never raw rows).
The engine decodes in eval mode without autograd, so the memory layers take their decode path:
sub-keys and whitening factor cached between steps (model_workers/eval_cache.py), TDQKR without the
full score tensors (`tdqkr.tdqkr_topk_decode`), and pooled lookups overlapping the dense blocks
between a layer's read and add blocks (`RemoteBackend.pooled_async`).
"""

from __future__ import annotations

import io
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from model_workers.layers import KVCache
from model_workers.model import LanguageModel, ModelConfig, sample

logger = logging.getLogger(__name__)

DENSE = "dense.pt"  # the dense part of a checkpoint (model_workers/checkpoint_io.py)


class EngineError(Exception):
    """Base of the errors the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request parameter is out of range; the message names it."""


class EngineBusyError(EngineError, RuntimeError):
    """The request queue is full; try again later."""


class EngineClosedError(EngineError, RuntimeError):
    """The engine is stopped (or stopping) and takes no requests."""


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches."""

    max_batch: int = 64  # sequences decoded together (rows of the shared KV cache)
    batch_wait_ms: float = 5.0  # an idle engine waits this long after a first request for more
    max_queue: int = 1024  # requests waiting for a row before submit raises EngineBusyError
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_tokens_limit < 1:
            raise InvalidRequestError("engine.max_batch, max_queue and max_tokens_limit must be >= 1")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise InvalidRequestError(f"engine.batch_wait_ms must be in [0, 1000], got {self.batch_wait_ms}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (validated by `Engine.submit`)."""

    max_tokens: int = 16  # new tokens to generate (>= 1)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    seed: int | None = None  # seeds this request's sampler; None = 0 (as `ultramem generate`)


@dataclass(frozen=True)
class StepStats:
    """What one decode step did (handed to `Engine(on_step=...)`, e.g. for Prometheus)."""

    batch: int  # sequences that got a token this step
    seconds: float  # wall time of the step (prefills, sampling, decode forward)
    prefills: int  # prompts (or full contexts) prefilled this step


_DONE = object()  # end-of-stream marker in a request's token queue


class Request:
    """A submitted request: iterate it for its tokens; `cancel()` frees its row at the next step."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams) -> None:
        self.id = rid
        self.prompt = prompt
        self.params = params
        self.tokens: list[int] = []  # generated so far (filled by the engine thread)
        self.finish_reason: str | None = None  # "length", "cancelled" or "error"
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating; the engine frees the row (or drops the queued request) at its next step."""
        self._cancelled.set()

    def next_token(self, timeout: float | None = None) -> int | None:
        """The next token id, or None at the end of the stream; raises queue.Empty after `timeout`.

        Raises the engine's error if the request failed (e.g. a shard went away).
        """
        event = self._events.get(timeout=timeout)
        if event is _DONE:
            self._events.put(_DONE)  # later calls see the end too
            if self.error is not None:
                raise self.error
            return None
        assert isinstance(event, int)
        return event

    def __iter__(self) -> Iterator[int]:
        while (token := self.next_token()) is not None:
            yield token

    def result(self, timeout: float | None = None) -> list[int]:
        """Block until the request ends; returns every generated token."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.next_token(None if deadline is None else max(deadline - time.monotonic(), 0)) is not None:
            pass
        return list(self.tokens)

    # engine side
    def _emit(self, token: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.tokens.append(token)
        self._events.put(token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._events.put(_DONE)


@dataclass
class _Seq:
    """A running sequence: its request, its whole history (for re-prefill) and next-token logits."""

    request: Request
    history: list[int]
    generator: torch.Generator
    logits: torch.Tensor | None = None  # [V] for the next token
    done: bool = field(default=False)


class Engine:
    """Dynamic-batching decoder over one `LanguageModel` (see the module docstring)."""

    def __init__(self, model: LanguageModel, config: EngineConfig | None = None, *,
                 on_step: Callable[[StepStats], None] | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.on_step = on_step
        self._cache = model.new_cache(self.config.max_batch)
        self._positions = torch.zeros(self.config.max_batch, dtype=torch.long)
        self._seqs: list[_Seq] = []  # row i of the cache belongs to self._seqs[i]
        self._pending: deque[Request] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._closed = False
        self._thread: threading.Thread | None = None
        self.steps = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Engine:
        """Start the decode thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new requests, cancel the running ones, and join the decode thread."""
        with self._cond:
            self._closed = True
            for req in self._pending:
                req._finish("cancelled")
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for seq in self._seqs:
            seq.request._finish("cancelled")
        self._seqs.clear()

    @property
    def is_running(self) -> bool:
        """Whether the decode thread is up and taking requests."""
        return self._thread is not None and self._thread.is_alive() and not self._closed

    @property
    def active_count(self) -> int:
        """Sequences holding a row of the cache now."""
        return len(self._seqs)

    @property
    def queued_count(self) -> int:
        """Requests waiting for a row."""
        with self._cond:
            return len(self._pending)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], params: SamplingParams | None = None) -> Request:
        """Queue a prompt (token ids, non-empty) for decoding; returns its `Request` stream.

        Raises InvalidRequestError for out-of-range input, EngineBusyError when the queue is full,
        EngineClosedError after `stop`.
        """
        params = params or SamplingParams()
        self._validate(prompt, params)
        req = Request(next(self._ids), [int(t) for t in prompt], params)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is stopped")
            if len(self._pending) >= self.config.max_queue:
                raise EngineBusyError(f"request queue full ({self.config.max_queue} waiting)")
            self._pending.append(req)
            self._cond.notify_all()
        return req

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        vocab, limit = self.model.cfg.vocab_size, self.config.max_tokens_limit
        if not prompt:
            raise InvalidRequestError("prompt must hold at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise InvalidRequestError(f"prompt token ids must be ints in [0, {vocab})")
        if isinstance(params.max_tokens, bool) or not isinstance(params.max_tokens, int) \
                or not 1 <= params.max_tokens <= limit:
            raise InvalidRequestError(f"max_tokens must be an integer in [1, {limit}], got {params.max_tokens!r}")
        if not params.temperature >= 0 or params.temperature > 100:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {params.temperature!r}")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p!r}")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            admitted = self._admit()
            if admitted is None:
                return
            if not self._seqs and not admitted:
                continue
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    batch, prefills = self._step(admitted)
            except Exception as err:  # a backend failure (shard down): fail these requests, keep serving
                logger.exception("engine step failed; failing %d requests", len(self._seqs) + len(admitted))
                for seq in self._seqs:
                    seq.request._finish("error", err)
                for req in admitted:
                    req._finish("error", err)
                self._seqs.clear()
                continue
            self.steps += 1
            if self.on_step is not None and batch:
                self.on_step(StepStats(batch, time.perf_counter() - started, prefills))

    def _admit(self) -> list[Request] | None:
        """New requests for free rows (None when stopping). Idle: block, then wait batch_wait_ms."""
        free = self.config.max_batch - len(self._seqs)
        with self._cond:
            if not self._seqs:
                while not self._pending and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    return None
                deadline = time.monotonic() + self.config.batch_wait_ms / 1000
                while len(self._pending) < free and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if self._closed:
                return None
            out = []
            while self._pending and len(out) < free:
                req = self._pending.popleft()
                if req.cancelled:
                    req._finish("cancelled")
                else:
                    out.append(req)
            return out

    def _step(self, admitted: list[Request]) -> tuple[int, int]:
        """One engine step (module docstring, steps 1-4); returns (sequences sampled, prefills)."""
        prefills = 0
        for req in admitted:  # 1. prefill into the next free row
            row = len(self._seqs)
            ctx = req.prompt[-self.model.cfg.max_seq_len:]
            gen = torch.Generator().manual_seed(req.params.seed if req.params.seed is not None else 0)
            seq = _Seq(req, list(req.prompt), gen)
            self._seqs.append(seq)
            seq.logits = self._prefill(row, ctx)
            prefills += 1
        batch = len(self._seqs)
        self._sample_all()  # 2.
        self._free_finished()  # 3.
        prefills += self._advance()  # 4.
        return batch, prefills

    def _row_cache(self, row: int, pos: int) -> KVCache:
        """Row `row` of the shared cache as a one-sequence cache (views, no copy)."""
        c = self._cache
        return KVCache([k[row:row + 1] for k in c.keys], [v[row:row + 1] for v in c.values], pos=pos)

    def _prefill(self, row: int, ctx: list[int]) -> torch.Tensor:
        """Fill row `row` with ctx from position 0 (as generate's prefill) -> next-token logits [V]."""
        tokens = torch.tensor([ctx], dtype=torch.long)
        logits = self.model(tokens, cache=self._row_cache(row, 0)).logits[0, -1]
        self._positions[row] = len(ctx)
        return logits

    def _sample_all(self) -> None:
        greedy = [s for s in self._seqs if s.request.params.temperature == 0 and not s.request.cancelled]
        if greedy:
            picks = torch.stack([s.logits for s in greedy]).argmax(-1).tolist()  # type: ignore[misc]
            for seq, token in zip(greedy, picks, strict=True):
                self._emit(seq, int(token))
        for seq in self._seqs:
            p = seq.request.params
            if p.temperature != 0 and not seq.request.cancelled:
                assert seq.logits is not None
                token = sample(seq.logits.unsqueeze(0), p.temperature, p.top_p, seq.generator)
                self._emit(seq, int(token))

    def _emit(self, seq: _Seq, token: int) -> None:
        seq.history.append(token)
        seq.request._emit(token)
        if len(seq.request.tokens) >= seq.request.params.max_tokens:
            seq.done = True
            seq.request._finish("length")

    def _free_finished(self) -> None:
        """Drop finished/cancelled rows; the last row moves into each hole (rows stay 0..n-1)."""
        for row in range(len(self._seqs) - 1, -1, -1):
            seq = self._seqs[row]
            if not (seq.done or seq.request.cancelled):
                continue
            if seq.request.cancelled:
                seq.request._finish("cancelled")
            last = len(self._seqs) - 1
            if row != last:
                used = int(self._positions[last])
                for k in (*self._cache.keys, *self._cache.values):
                    k[row, :, :used] = k[last, :, :used]
                self._positions[row] = self._positions[last]
                self._seqs[row] = self._seqs[last]
            self._seqs.pop()

    def _advance(self) -> int:
        """Next-token logits for every running row: one batched decode, re-prefills for full rows."""
        limit = self.model.cfg.max_seq_len
        window = max(limit // 2, 1)
        full = [r for r in range(len(self._seqs)) if int(self._positions[r]) >= limit]
        for row in full:  # as generate: the context is full, re-prefill the recent window
            self._seqs[row].logits = self._prefill(row, self._seqs[row].history[-window:])
        rows = [r for r in range(len(self._seqs)) if r not in set(full)]
        if rows:
            last = torch.tensor([[self._seqs[r].history[-1]] for r in rows], dtype=torch.long)  # (n, 1)
            logits = self._decode(rows, last)
            for i, r in enumerate(rows):
                self._seqs[r].logits = logits[i]
        return len(full)

    def _decode(self, rows: list[int], last: torch.Tensor) -> torch.Tensor:
        """last tokens [n, 1] at rows' own positions -> logits [n, V]."""
        if len(rows) == 1:  # exactly generate's decode path
            row = rows[0]
            cache = self._row_cache(row, int(self._positions[row]))
            out = self.model(last, cache=cache).logits[:, -1]
            self._positions[row] += 1
            return out
        c, n = self._cache, len(rows)
        if rows == list(range(n)):  # the common case: running rows are 0..n-1, use views
            cache = KVCache([k[:n] for k in c.keys], [v[:n] for v in c.values], positions=self._positions[:n])
            return self.model(last, cache=cache).logits[:, -1]
        index = torch.tensor(rows, dtype=torch.long)  # rare: some rows re-prefilled this step
        cache = KVCache([k[index] for k in c.keys], [v[index] for v in c.values],
                        positions=self._positions[index].clone())
        out = self.model(last, cache=cache).logits[:, -1]
        for full, part in zip((*c.keys, *c.values), (*cache.keys, *cache.values), strict=True):
            full[index] = part
        self._positions[index] = cache.positions  # type: ignore[assignment]
        return out


def serving_config(model_cfg: ModelConfig) -> ModelConfig:
    """`model_cfg` with pooled memory lookups (DESIGN §6); the weights and tables are unchanged."""
    if not model_cfg.has_memory:
        return model_cfg
    return replace(model_cfg, memory=replace(model_cfg.memory, lookup="pooled"))


def load_dense(checkpoint: str | Path, model: LanguageModel) -> dict:
    """Load `checkpoint/dense.pt`'s model state into `model` (π and TDQKR filters included).

    The tables stay where they are (shards or a LocalBackend); returns the saved train state.
    """
    path = Path(checkpoint) / DENSE
    dense = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    model.load_state_dict(dense["model"])
    return dict(dense.get("train") or {})
