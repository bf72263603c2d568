"""A training step reads the device only through model_workers/transfer.py: one device-to-host copy
per memory layer and direction, plus one read of the step's scalars, into reused host buffers.

Device-independent: on the CPU a stray `.cpu()` costs nothing, so besides counting the choke point
(`transfer.device_to_host`) the test watches, with a torch function mode, every call that reads a
tensor on the host (`.cpu()`, `.item()`, `float()`, `.numpy()`, `.tolist()`, `.to("cpu")`, ...)
made by worker code outside the host side (the value backends and transfer.py itself)."""

from __future__ import annotations

import sys
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from torch.overrides import TorchFunctionMode

import model_workers
from model_workers import transfer
from model_workers.model import LanguageModel
from model_workers.trainer import TrainConfig, make_optimizer, train_step
from model_workers.transfer import HostStaging
from model_workers.ultramem import MemoryLayer
from orchestration.config import load_config

REPO = Path(model_workers.__file__).resolve().parent.parent
# code that only ever sees host tensors: the value backends, the choke point, the servers' side
HOST_SIDE = tuple(str(REPO / p) for p in ("model_workers/values.py", "model_workers/remote.py",
                                          "model_workers/transfer.py", "param_server", "storage"))
TORCH = str(Path(torch.__file__).resolve().parent)
_READS = {torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.__array__}


def _to_host(func, args, kwargs) -> bool:
    """A `.to(...)` / `.to(device=...)` call naming the CPU."""
    if func is not torch.Tensor.to:
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(str(t).startswith("cpu") for t in targets if isinstance(t, (str, torch.device)))


class HostReads(TorchFunctionMode):
    """Records each host read of a tensor called from worker code (not torch, not the host side)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS or _to_host(func, args, kwargs):
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.endswith(("torch/overrides.py", "torch/_tensor.py")):
                frame = frame.f_back  # the dispatch of Python-level Tensor methods
            path = frame.f_code.co_filename if frame is not None else ""
            if not path.startswith(TORCH) and not path.startswith(HOST_SIDE):
                self.calls.append(f"{func.__name__} at {Path(path).name}:{frame.f_lineno}")
        return func(*args, **kwargs)


@pytest.fixture
def copies(monkeypatch):
    """Counts the calls through the choke point."""
    calls: list[int] = []
    original = transfer.device_to_host

    def counted(parts, out):
        calls.append(len(parts))
        return original(parts, out)

    monkeypatch.setattr(transfer, "device_to_host", counted)
    return calls


def _setup(lookup: str):
    cfg = load_config(preset="tiny", overrides=[f'model.memory.lookup="{lookup}"']).model
    model = LanguageModel(cfg)
    train_cfg = TrainConfig(max_steps=10, warmup_steps=1, autocast="off")
    optimizer = make_optimizer(model, train_cfg)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (2, 16), generator=gen) for _ in range(2))

    def step(k: int) -> None:
        train_step(model, optimizer, x, y, step=k, cfg=train_cfg, max_steps=10)

    return model, step


@pytest.mark.parametrize("lookup", ["rows", "pooled"])
def test_a_step_copies_once_per_layer_and_direction_and_reads_nothing_else(lookup, copies):
    model, step = _setup(lookup)
    step(0)  # warm-up: staging buffers reach their sizes
    copies.clear()
    with HostReads() as reads:
        step(1)
    layers = len(model.memories)
    assert layers >= 1
    assert len(copies) == 2 * layers + 1  # forward + backward per layer, and the step's scalars
    assert reads.calls == []  # no other host read in the worker's code


def test_a_stray_host_read_in_the_step_is_caught(copies, monkeypatch):
    """The watch can fail: one extra `.cpu()` per layer in the memory path shows up, with its place."""
    model, step = _setup("rows")
    original = MemoryLayer.finish

    def finish_with_a_stray_read(self, read):
        read.unique.cpu()  # the kind of sync this test exists to catch
        return original(self, read)

    monkeypatch.setattr(MemoryLayer, "finish", finish_with_a_stray_read)
    step(0)
    with HostReads() as reads:
        step(1)
    assert len(reads.calls) == len(model.memories)
    assert all(c.startswith("cpu at test_host_syncs.py") for c in reads.calls)


def test_staging_buffers_are_reused_and_grow_only_when_a_step_needs_more(copies):
    staging = HostStaging()
    rows = torch.arange(10, dtype=torch.int64)
    (a,) = staging.to_host("lookup", rows)
    (b,) = staging.to_host("lookup", rows[:4])  # smaller: the same buffer, an exact-size view
    assert staging.allocations == 1 and b.shape == (4,) and b.data_ptr() == a.data_ptr()
    (c,) = staging.to_host("lookup", torch.arange(100, dtype=torch.int64))  # bigger: grows once
    assert staging.allocations == 2 and torch.equal(c, torch.arange(100))
    staging.to_host("lookup", rows)
    assert staging.allocations == 2 and len(copies) == 4


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([torch.int64, torch.float32, torch.int32, torch.bfloat16]),
                          st.lists(st.integers(0, 5), min_size=0, max_size=3)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_packed_copies_return_every_part_unchanged(parts_spec, seed):
    gen = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(shape, generator=gen) * 100).to(dtype) for dtype, shape in parts_spec]
    staging = HostStaging()
    for _ in range(2):  # and again into the reused buffer
        got = staging.to_host("k", *parts)
        for want, have in zip(parts, got, strict=True):
            assert have.dtype == want.dtype and have.shape == want.shape and torch.equal(have, want)


def test_step_scalars_are_read_in_one_copy(copies):
    got = transfer.read_scalars(torch.tensor(1.5), torch.tensor(2, dtype=torch.int64), torch.tensor([3.0]))
    assert got == [1.5, 2.0, 3.0] and len(copies) == 1
