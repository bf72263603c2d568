"""Learning-rate schedules (DESIGN §3.1 step 8): warmup + cosine, and the value-LR multiplier."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_workers.schedule import lr_at, value_lr_multiplier
from model_workers.ultramem import MemoryConfig


def test_warmup_rises_linearly_to_the_base_lr():
    lrs = [lr_at(s, base_lr=1.0, warmup_steps=4, max_steps=100) for s in range(4)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_reaches_the_floor_at_max_steps_and_stays_there():
    kw = {"base_lr": 2.0, "warmup_steps": 10, "max_steps": 110, "min_lr_ratio": 0.1}
    assert lr_at(10, **kw) == pytest.approx(2.0)
    assert lr_at(60, **kw) == pytest.approx(0.2 + 0.5 * 1.8)  # half way: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(0.2)
    assert lr_at(10_000, **kw) == pytest.approx(0.2)


@given(warmup=st.integers(0, 50), extra=st.integers(1, 500), ratio=st.floats(0.0, 1.0))
def test_lr_never_increases_after_warmup_and_stays_within_bounds(warmup, extra, ratio):
    kw = {"base_lr": 1e-3, "warmup_steps": warmup, "max_steps": warmup + extra, "min_lr_ratio": ratio}
    lrs = [lr_at(s, **kw) for s in range(warmup, warmup + extra + 3)]
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(lrs))
    assert all(1e-3 * ratio - 1e-15 <= x <= 1e-3 + 1e-15 for x in lrs)


def test_bad_schedule_arguments_are_rejected():
    with pytest.raises(ValueError, match="min_lr_ratio"):
        lr_at(0, base_lr=1.0, warmup_steps=0, max_steps=10, min_lr_ratio=2.0)


def test_value_multiplier_decays_linearly_from_4x_to_1x_over_the_run():
    cfg = MemoryConfig()
    assert value_lr_multiplier(0, cfg, 100) == 4.0
    assert value_lr_multiplier(50, cfg, 100) == pytest.approx(2.5)
    assert value_lr_multiplier(100, cfg, 100) == 1.0
    assert value_lr_multiplier(1000, cfg, 100) == 1.0


def test_value_multiplier_uses_its_own_decay_length_when_set():
    cfg = MemoryConfig(value_lr_mult=10.0, value_lr_mult_final=2.0, value_lr_decay_steps=8)
    assert value_lr_multiplier(4, cfg, max_steps=1_000_000) == pytest.approx(6.0)
    assert value_lr_multiplier(8, cfg, None) == 2.0


def test_equal_start_and_final_multiplier_is_constant_and_needs_no_run_length():
    cfg = MemoryConfig.pkm()
    assert {value_lr_multiplier(s, cfg, None) for s in (0, 5, 10**6)} == {cfg.value_lr_mult}


def test_decay_without_any_length_is_an_error():
    with pytest.raises(ValueError, match="max_steps"):
        value_lr_multiplier(3, MemoryConfig(), None)
    assert math.isclose(value_lr_multiplier(3, MemoryConfig(value_lr_decay_steps=0), None), 1.0)
