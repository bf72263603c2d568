"""The quality experiment's `[sweep]` (issue 9): config parsing, one compute-matched experiment per point, report."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestration import cmd_experiment, cmd_report
from orchestration import experiment as ex
from orchestration.cli import build_parser
from orchestration.config import PRESET_DIR
from orchestration.errors import ConfigError

SWEEP_PRESET = PRESET_DIR / "quality_sweep.toml"
QUICK = (PRESET_DIR / "quality_quick.toml").read_text()


@given(st.lists(st.integers(1, 10**7), min_size=1, max_size=6, unique=True),
       st.lists(st.integers(1, 10**7), min_size=1, max_size=3, unique=True))
def test_cli_sweep_strings_parse_to_the_same_axes_as_the_toml_table(keys: list[int], tokens: list[int]) -> None:
    axes = ex.parse_sweep([f"num_keys={','.join(map(str, keys))}", f"tokens={','.join(map(str, tokens))}"])
    assert axes == (("num_keys", tuple(keys)), ("tokens", tuple(tokens)))


@pytest.mark.parametrize("item", ["num_keys=32,zero", "num_keys=0,32", "num_keys=32,32", "num_keys=",
                                  "d_model=64,128", "num_keys 32"])
def test_a_malformed_sweep_axis_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError, match="sweep"):
        ex.parse_sweep([item])


def test_the_same_axis_twice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="twice"):
        ex.parse_sweep(["num_keys=32", "num_keys=64"])


def test_sweep_preset_makes_one_experiment_per_memory_size_with_only_num_keys_changed() -> None:
    exp = ex.load_experiment(SWEEP_PRESET)
    assert exp.sweep == (("num_keys", (32, 64, 128, 256)),)
    points = ex.sweep_points(exp)
    assert [name for name, _, _ in points] == ["num_keys-32", "num_keys-64", "num_keys-128", "num_keys-256"]
    base = exp.run_config()
    for _, point, sub in points:
        run = sub.run_config()
        assert run.model.memory.num_keys == point["num_keys"]
        assert run.model.memory == ex.dataclasses.replace(base.model.memory, num_keys=point["num_keys"])
        assert (run.train, run.data, sub.tokens, sub.seeds, sub.sweep) == (base.train, base.data, exp.tokens,
                                                                          exp.seeds, ())


def test_every_sweep_point_is_compute_matched_and_the_memory_grows_as_k_squared() -> None:
    exp = ex.load_experiment(SWEEP_PRESET)
    ultramem_flops, ratios = [], []
    for _, point, sub in ex.sweep_points(exp):
        by = {v.name: v for v in ex.plan_variants(sub)}
        k, um, pkm = point["num_keys"], by["ultramem"], by["pkm"]
        for v in by.values():
            assert abs(v.flops / um.flops - 1) <= exp.flops_tolerance, (k, v.name)
        layers = len(um.model.memory.placements)
        assert um.params["sparse"] == layers * k * k * um.model.memory.value_dim(um.model.d_model)
        # PKM's (one-layer, D-wide) table holds UltraMem's sparse parameters at every point
        assert abs(pkm.params["sparse"] / um.params["sparse"] - 1) < 0.05
        assert by["dense"].params["sparse"] == 0
        ultramem_flops.append(um.flops)
        ratios.append(um.params["sparse"] / um.params["dense"])
    assert ultramem_flops == sorted(ultramem_flops)  # key scoring grows with K ...
    assert ultramem_flops[-1] / ultramem_flops[0] < 1.6  # ... far slower than the table (64x)
    assert ratios[0] < 0.5 and ratios[-1] > 10  # from a small memory to the paper's ~10x sparse:dense


def test_a_tokens_axis_sets_each_points_budget(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(QUICK + "\n[sweep]\ntokens = [3_840, 7_680]\n")
    points = ex.sweep_points(ex.load_experiment(cfg))
    assert [(name, sub.steps()) for name, _, sub in points] == [("tokens-3840", 15), ("tokens-7680", 30)]


def test_two_axes_make_the_full_grid_in_axis_order(tmp_path: Path) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(QUICK)
    exp = ex.dataclasses.replace(ex.load_experiment(cfg), sweep=ex.parse_sweep(["num_keys=8,4", "tokens=3840,7680"]))
    grid = [(name, sub.run_config().model.memory.num_keys, sub.steps()) for name, _, sub in ex.sweep_points(exp)]
    assert grid == [("num_keys-8_tokens-3840", 8, 15), ("num_keys-8_tokens-7680", 8, 30),
                    ("num_keys-4_tokens-3840", 4, 15), ("num_keys-4_tokens-7680", 4, 30)]


def test_a_sweep_point_the_backbone_cannot_take_fails_at_load(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(QUICK + "\n[sweep]\nnum_keys = [8, 2]\n")  # topk = 4 > 2 keys
    with pytest.raises(ConfigError, match="sweep point"):
        ex.load_experiment(cfg)


@given(st.dictionaries(st.integers(0, 9), st.tuples(st.floats(1, 9), st.floats(1, 9)), min_size=1, max_size=5),
       st.integers(10, 12))
def test_paired_delta_averages_same_seed_differences_and_skips_unpaired_seeds(
        losses: dict[int, tuple[float, float]], lone_seed: int) -> None:
    results = [{"variant": v, "seed": s, "val_loss": pair[i]} for s, pair in losses.items()
               for i, v in enumerate(("dense", "ultramem"))]
    results.append({"variant": "ultramem", "seed": lone_seed, "val_loss": 100.0})  # no dense partner
    mean, std, n = ex.paired_delta(results, "ultramem")
    diffs = [b - a for a, b in losses.values()]
    assert n == len(losses)
    assert mean == pytest.approx(sum(diffs) / n)
    assert (std == 0.0) if n == 1 else std == pytest.approx(
        math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)), abs=1e-9)
    assert ex.paired_delta(results, "pkm")[2] == 0


@pytest.mark.slow
def test_cli_sweep_trains_every_point_then_reports_a_row_per_point_and_variant(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, out = tmp_path / "q.toml", tmp_path / "sweep"
    cfg.write_text(QUICK)  # no [sweep] in the file: the --sweep flag makes it one
    args = build_parser().parse_args(["experiment", "quality", "--config", str(cfg), "--seeds", "1",
                                      "--out", str(out), "--sweep", "num_keys=4,8"])
    assert cmd_experiment.quality(args) == 0
    assert json.loads((out / ex.SWEEP).read_text())["points"] == [
        {"name": "num_keys-4", "values": {"num_keys": 4}}, {"name": "num_keys-8", "values": {"num_keys": 8}}]
    for k in (4, 8):
        plan = json.loads((out / f"num_keys-{k}" / "experiment.json").read_text())
        assert plan["experiment"]["base"]["model"]["memory"]["num_keys"] == k
        assert ex.read_result(out / f"num_keys-{k}" / "ultramem" / "seed-1")["params"]["sparse"] == k * k * 32
        assert (out / f"num_keys-{k}" / "summary.md").is_file()
    rows = json.loads((out / "sweep_summary.json").read_text())
    assert [(r["point"], r["variant"]) for r in rows] == [
        ("num_keys-4", "dense"), ("num_keys-4", "ultramem"), ("num_keys-8", "dense"), ("num_keys-8", "ultramem")]
    for r in rows:
        if r["variant"] == "ultramem":
            dense = next(d for d in rows if d["point"] == r["point"] and d["variant"] == "dense")
            assert r["delta_dense"] == pytest.approx(r["val_loss"] - dense["val_loss"])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| num_keys-8 | ultramem | 1 |" in capsys.readouterr().out

    # `ultramem report` of the sweep directory redraws the same table (nothing retrained)
    stamp = (out / "num_keys-8" / "ultramem" / "seed-1" / "result.json").stat().st_mtime_ns
    assert cmd_report.report(argparse.Namespace(run_dir=str(out))) == 0
    assert "| num_keys-4 | dense | 1 |" in capsys.readouterr().out
    assert (out / "num_keys-8" / "ultramem" / "seed-1" / "result.json").stat().st_mtime_ns == stamp
