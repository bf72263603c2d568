"""Skip-layer overlap (issue 7, DESIGN §3.1): a memory read at block i is requested there and
waited for only after block j, so blocks i+1..j compute while the values travel."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from model_workers.model import LanguageModel
from orchestration.config import load_config


class HeldLookups:
    """Wraps a backend: every async fetch is answered on another thread once `release` is set (or
    after a deadline, so a model that waits for the answer first fails the test instead of hanging);
    records the order."""

    def __init__(self, inner) -> None:
        self.inner, self.events, self.release = inner, [], threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fetch_rows_async(self, table, rows) -> Future:
        self.events.append(("requested", table))
        done: Future = Future()

        def answer() -> None:
            self.release.wait(10)
            self.events.append(("answered", table))
            done.set_result(self.inner.fetch_rows(table, rows))

        threading.Thread(target=answer, daemon=True).start()
        return done


def test_dense_blocks_between_read_and_add_run_while_the_lookup_is_in_flight():
    cfg = load_config(preset="tiny", overrides=['model.memory.placement="0:1"']).model
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    want = model(tokens).logits  # the synchronous in-process path

    slow = HeldLookups(model.backend)
    for layer in model.memories:
        layer.backend = slow
    block1 = model.blocks[1]
    original = block1.forward

    def traced(*args, **kw):  # block 1 runs while the lookup is still unanswered, then lets it answer
        slow.events.append(("block 1", None))
        slow.release.set()
        return original(*args, **kw)

    block1.forward = traced
    got = model(tokens).logits
    assert [e[0] for e in slow.events] == ["requested", "block 1", "answered"]  # block 1 overlapped it
    torch.testing.assert_close(got, want)
