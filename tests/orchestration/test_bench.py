"""`ultramem bench` plumbing (DESIGN §7.1): a benchmark run writes its JSON and a PNG; bad names exit 2.

The real `wire --quick` run goes through the CLI in a subprocess (the contract scripts rely on);
the `all` behaviour is checked in-process with stand-in benchmarks in a temporary bench directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration import cmd_bench

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "orchestration.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_bench_wire_quick_writes_json_and_png(tmp_path: Path) -> None:
    res = _run("bench", "wire", "--quick", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "wire.json").read_text())
    assert result["regimes"]["1"]["ratio_lookup_bf16"] > 0
    # UltraMemV2: the shared projector's answer is one [d_v] sum per shard, not E (smaller pooled
    # lookups than v1), while rows mode also fetches the pre-value rows (larger than v1's)
    v1, v2 = result["regimes"]["1"]["bytes_per_token"], result["v2"]["regimes"]["1"]["bytes_per_token"]
    assert v2["pooled_lookup/bfloat16"] < 0.8 * v1["pooled_lookup/bfloat16"]
    assert v2["rows_lookup/bfloat16"] > 1.2 * v1["rows_lookup/bfloat16"]
    assert result["v2"]["regimes"]["1"]["ratio_lookup_bf16"] < result["regimes"]["1"]["ratio_lookup_bf16"]
    assert (tmp_path / "wire.png").read_bytes()[:8] == PNG_MAGIC
    assert "plotted" in res.stdout


def test_unknown_bench_name_exits_2_with_one_line() -> None:
    res = _run("bench", "no-such-bench", timeout=60)
    assert res.returncode == 2
    assert "no-such-bench" in res.stderr
    assert res.stdout == ""


_GOOD = '''
import json
from pathlib import Path
def run(out_dir, quick=False):
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    result = {"quick": quick, "x": {"ratio_to_local": 0.5}}
    (Path(out_dir) / "lookup.json").write_text(json.dumps(result))
    return result
'''
_BROKEN = "def run(out_dir, quick=False):\n    raise RuntimeError('broken on purpose')\n"


@pytest.fixture
def fake_bench_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A bench directory with a working `lookup`, a failing `train` and the real plots module."""
    d = tmp_path / "bench"
    d.mkdir()
    (d / "lookup.py").write_text(_GOOD)
    (d / "train.py").write_text(_BROKEN)
    shutil.copy(REPO / "bench" / "plots.py", d / "plots.py")
    monkeypatch.setattr(cmd_bench, "BENCH_DIR", d)
    return d


def test_bench_all_runs_the_rest_after_a_failure_and_exits_1(fake_bench_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cmd_bench.bench(argparse.Namespace(which="all", out=str(out), quick=True))
    assert code == 1
    assert json.loads((out / "lookup.json").read_text())["quick"] is True
    assert (out / "lookup.png").read_bytes()[:8] == PNG_MAGIC  # not lookup's layout: the generic plot of "ratio" fields


def test_bench_one_missing_from_this_build_is_a_usage_error(fake_bench_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(cmd_bench.UsageError, match="not available"):
        cmd_bench.bench(argparse.Namespace(which="serve", out=str(tmp_path), quick=True))


def test_bench_one_failing_propagates_its_error(fake_bench_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="broken on purpose"):
        cmd_bench.bench(argparse.Namespace(which="train", out=str(tmp_path), quick=True))


@pytest.mark.parametrize(("top25", "ratio", "over_floor", "expected"), [
    (0.75, 0.5, 9.0, ("skewed", True)),  # skewed from 75% on: judged on the ratio alone, the floor does not count
    (0.97, 0.49, 1.0, ("skewed", False)),
    (0.74, 0.1, 2.0, ("floor", True)),  # below 75%: judged on the floor alone, the ratio does not count
    (0.51, 1.0, 2.01, ("floor", False)),
    (0.36, 1.0, None, ("floor", False)),  # no floor measured: not met
])
def test_beyond_ram_judges_skewed_windows_on_the_ratio_and_others_on_the_floor(
        top25: float, ratio: float, over_floor: float | None, expected: tuple[str, bool]) -> None:
    from bench._beyond_ram_train import judge

    assert judge(top25, ratio, over_floor, target_skewed=0.5, target_floor=2.0) == expected


def test_beyond_ram_skew_of_a_short_uniform_window_is_its_uniform_baseline() -> None:
    import numpy as np

    from bench.beyond_ram import skew
    from storage.layout import TableSpec

    spec = TableSpec(name="t", rows=4096, dim=8, num_partitions=4)
    rng = np.random.default_rng(5)
    hot = [rng.integers(0, 512, 4096) for _ in range(4)]  # every lookup on 1/8 of the rows
    flat = [rng.integers(0, 4096, 4096) for _ in range(4)]  # 4 lookups per row: top 25% take ~45%, not 25%
    s_hot, s_flat = skew(hot, spec, chunk_rows=64), skew(flat, spec, chunk_rows=64)
    assert s_hot["top25_rows_share"] == 1.0 and s_hot["unique_rows_per_step"] <= 512
    assert abs(s_flat["top25_rows_share"] - s_flat["top25_rows_share_uniform"]) < 0.03
    assert 0.3 < s_flat["top25_rows_share_uniform"] < 0.6


@pytest.mark.slow
def test_bench_memory_path_quick_writes_the_issue_keys(tmp_path: Path) -> None:
    res = _run("bench", "memory-path", "--quick", "--out", str(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "memory_path.json").read_text())
    calls = {"gather", "pooled_gather", "pooled_backward", "optimizer_step"}
    for layer in ("paper", "small"):
        shard = r["shard_cpu_s_per_m_selections"][layer]
        assert set(shard) == calls and all(v >= 0 for v in shard.values())
        floor = r["floor_cpu_s_per_m_selections"][layer]
        assert floor > 0
        for call in calls - {"gather"}:
            assert r["ratio_to_floor"][layer][call] == pytest.approx(shard[call] / floor)
        gather_floor = r["floor_gather_cpu_s_per_m_rows"][layer]  # Gather's own work: a gather of its rows
        assert gather_floor > 0
        assert r["ratio_to_floor"][layer]["gather"] == pytest.approx(shard["gather"] / gather_floor)
        assert r["ratio_to_floor"][layer]["gather_to_lookup_floor"] == pytest.approx(shard["gather"] / floor)
        for call, work in (("pooled_backward", "backward"), ("optimizer_step", "optimizer")):  # their own work's floors
            work_floor = r[f"floor_{work}_cpu_s_per_m_selections"][layer]
            assert math.isfinite(work_floor) and work_floor > 0
            assert r[f"{call}_ratio_to_{work}_floor"][layer] == pytest.approx(shard[call] / work_floor)
        assert set(r["tokens_per_s"][layer]) == {f"{s} shards/{t} tokens" for s in (1, 2) for t in (1, 64)}
        assert all(v > 0 for v in r["tokens_per_s"][layer].values())
    assert r["gather_vs_socket"] > 0
    assert "target met" in res.stdout or "MISSED" in res.stdout
    # UltraMemV2 legs (shared projector, pre-values scored on the shards), the same keys under "v2"
    v2 = r["v2"]
    for layer, d_v in (("paper_v2", 384), ("small_v2", 128)):
        assert v2["layers"][layer]["d_p"] == d_v // 3 and v2["layers"][layer]["shared_projector"] is True
        shard = v2["shard_cpu_s_per_m_selections"][layer]
        assert set(shard) == calls and all(math.isfinite(v) and v >= 0 for v in shard.values())
        assert shard["pooled_gather"] > 0 and shard["pooled_backward"] > 0  # measured, not clipped to 0
        floor = v2["floor_cpu_s_per_m_selections"][layer]
        backward_floor = v2["floor_backward_cpu_s_per_m_selections"][layer]
        assert math.isfinite(floor) and floor > 0 and math.isfinite(backward_floor) and backward_floor > 0
        for call in calls - {"gather"}:
            assert v2["ratio_to_floor"][layer][call] == pytest.approx(shard[call] / floor)
        gather_floor = v2["floor_gather_cpu_s_per_m_rows"][layer]
        assert gather_floor > 0
        assert v2["ratio_to_floor"][layer]["gather"] == pytest.approx(shard["gather"] / gather_floor)
        assert v2["pooled_backward_ratio_to_backward_floor"][layer] == pytest.approx(
            shard["pooled_backward"] / backward_floor)
        optimizer_floor = v2["floor_optimizer_cpu_s_per_m_selections"][layer]
        assert math.isfinite(optimizer_floor) and optimizer_floor > 0
        assert v2["optimizer_step_ratio_to_optimizer_floor"][layer] == pytest.approx(
            shard["optimizer_step"] / optimizer_floor)
        assert set(v2["tokens_per_s"][layer]) == {f"{s} shards/{t} tokens" for s in (1, 2) for t in (1, 64)}
        assert all(math.isfinite(v) and v > 0 for v in v2["tokens_per_s"][layer].values())
        assert v2["worker_cpu_s_per_token"][layer] > 0
    assert v2["gather_vs_socket"] > 0
    assert "UltraMemV2" in res.stdout and "the backward floor" in res.stdout and "the optimizer floor" in res.stdout


def test_v2_floor_does_the_shards_pooled_work() -> None:
    """memory-path's V2 floor computes what a shard computes (forward sums, dL/ds, dL/dq_p) and the
    row gradients of V and P_tab that the shard's update applies (float64 autograd oracle)."""
    import numpy as np
    import torch

    from bench._floors import bag_layout, v2_backward, v2_forward
    from bench.memory_path import Layer, step_inputs, table_specs
    from param_server.shard import Shard, ShardConfig
    from storage.layout import init_partition_values, init_table_values

    lay = Layer("t_v2", 64, 12, 2, 3, 4, 2, d_p=4, shared_projector=True)
    x = step_inputs(lay, 5, 0)
    x["rows"][:4] = 7  # duplicate rows, summed by the backward
    x["grad_out"] *= 1e3  # ~1, so that the tolerances below are tight
    bag_layout(x, lay)
    specs = table_specs(lay)
    v, pre = (init_table_values(s) for s in specs)
    with Shard(ShardConfig()) as shard:
        for spec in specs:
            shard.add_table(spec, {p: {"values": init_partition_values(spec, p)} for p in range(spec.num_partitions)})
        touched = np.arange(5)
        _, sums = shard.pooled_gather(lay.name, x["rows"], x["projector"], x["token"], x["scores"], 1,
                                      pre_table=lay.pre_table, q_p=x["q_p"], tokens_touched=touched)
        grad_s, grad_q, _ = shard.pooled_backward_pre(lay.name, lay.pre_table, 0, 1, 0, 0.0, x["rows"],
                                                      x["projector"], x["token"], x["scores"], x["q_p"],
                                                      x["grad_out"], touched, 1)
    for how in ("numpy", "embedding_bag"):
        np.testing.assert_allclose(v2_forward(v, pre, x, lay, how), sums[:, 0], rtol=1e-4, atol=1e-7)
    got_s, got_q, unique, got_v, got_pre = v2_backward(v, pre, x, lay)
    np.testing.assert_allclose(got_s, grad_s, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_q, grad_q, rtol=1e-4, atol=1e-7)
    tv, tp = torch.tensor(v, dtype=torch.float64, requires_grad=True), torch.tensor(pre, dtype=torch.float64,
                                                                                  requires_grad=True)
    rows, h = torch.from_numpy(x["rows"]), lay.cores
    a = (tp[rows] * torch.tensor(x["q_p"], dtype=torch.float64)[torch.from_numpy(x["token"])]).sum(1)
    w = (a[:, None] * torch.tensor(x["scores"], dtype=torch.float64)).repeat_interleave(lay.d_v // h, dim=1)
    o = torch.zeros(5, lay.d_v, dtype=torch.float64).index_add(0, torch.from_numpy(x["token"]), w * tv[rows])
    (o * torch.tensor(x["grad_out"][:, 0], dtype=torch.float64)).sum().backward()
    np.testing.assert_array_equal(unique, np.unique(x["rows"]))
    np.testing.assert_allclose(got_v, tv.grad[unique], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got_pre, tp.grad[unique], rtol=1e-4, atol=1e-7)


def test_v1_backward_floors_do_the_shards_backward_work() -> None:
    """memory-path's v1 backward floors (index_add_ and embedding_bag's backward) compute the shard's
    dL/ds and the duplicate-summed row gradients its update applies (float64 autograd oracle)."""
    import numpy as np
    import torch

    from bench._floors import v1_backward, v1_backward_embedding_bag
    from bench.memory_path import Layer, step_inputs, table_specs
    from param_server.shard import Shard, ShardConfig
    from storage.layout import init_partition_values, init_table_values

    lay = Layer("t", 64, 12, 2, 3, 4, 2)
    x = step_inputs(lay, 5, 0)
    x["rows"][:4] = 7  # duplicate rows, summed by the backward
    x["grad_out"] *= 1e3  # ~1, so that the tolerances below are tight
    (spec,) = table_specs(lay)
    v = init_table_values(spec)
    with Shard(ShardConfig()) as shard:
        shard.add_table(spec, {p: {"values": init_partition_values(spec, p)} for p in range(spec.num_partitions)})
        grad_s = shard.pooled_backward(lay.name, 0, 1, 0, 0.0, x["rows"], x["projector"], x["token"], x["scores"],
                                       x["grad_out"], np.arange(5), lay.expansion)
    tv = torch.tensor(v, dtype=torch.float64, requires_grad=True)
    c = lay.d_v // lay.cores
    w = torch.tensor(x["scores"], dtype=torch.float64).repeat_interleave(c, dim=1)  # (n, d_v): s_c per slice
    slot = torch.from_numpy(x["token"] * lay.expansion + x["projector"])
    rows_t = torch.from_numpy(x["rows"])
    o = torch.zeros(5 * lay.expansion, lay.d_v, dtype=torch.float64).index_add(0, slot, w * tv[rows_t])
    (o * torch.tensor(x["grad_out"].reshape(-1, lay.d_v), dtype=torch.float64)).sum().backward()
    assert tv.grad is not None
    for got_s, unique, got_v in (v1_backward(v, x, lay), v1_backward_embedding_bag(v, x, lay)()):
        np.testing.assert_allclose(got_s, grad_s, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(unique, np.unique(x["rows"]))
        np.testing.assert_allclose(got_v, tv.grad[unique], rtol=1e-4, atol=1e-7)


def test_optimizer_floor_steps_rows_as_the_shards_lazy_adamw() -> None:
    """memory-path's optimizer floor (torch ops on gathered rows) gives the shard's lazy AdamW, each row
    with its own step count, and leaves the rows it was not given untouched."""
    import numpy as np

    from bench._floors import adamw_library
    from param_server.kernels import adamw_rows
    from param_server.optimizers import SparseOptimizerConfig

    rng = np.random.default_rng(4)
    cfg = SparseOptimizerConfig(weight_decay=0.1)
    p = rng.standard_normal((32, 8), dtype=np.float32)
    m, v = rng.standard_normal((32, 8), dtype=np.float32) * 0.1, rng.random((32, 8), dtype=np.float32) * 0.01
    t = rng.integers(0, 5, 32).astype(np.int32)
    ours, floor = [a.copy() for a in (p, m, v, t)], [a.copy() for a in (p, m, v, t)]
    for _ in range(3):
        rows = np.sort(rng.choice(32, 10, replace=False)).astype(np.int64)
        grads = rng.standard_normal((10, 8), dtype=np.float32)
        adamw_rows(*ours, rows, grads, 1e-2, cfg.beta1, cfg.beta2, cfg.eps, 1.0 - 1e-2 * cfg.weight_decay)
        adamw_library(*floor, rows, grads, 1e-2, cfg)
    for a, b in zip(ours, floor, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    assert not np.array_equal(ours[0], p)


def test_serve_ratios_put_the_v2_leg_beside_v1s_and_check_its_hop(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/serve.py's ratios and checks with stand-in round timings: V2's remote/local tokens/s and
    hop come out per batch beside v1's, as medians of per-round ratios."""
    # bench/serve.py sets OMP_WAIT_POLICY at its first import; monkeypatch restores it afterwards
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    from bench import serve


    step_s = {serve.SMALL: 0.010, serve.MID: 0.010, serve.MID_ONE: 0.009, "local-2^20": 0.008, "moe-local": 0.020,
              serve.V2_REMOTE: 0.012, serve.V2_LOCAL: 0.009}  # seconds per decode step, every round and batch
    per_round = {(name, b): [[s] * 4, [s] * 4] for name, s in step_s.items() for b in serve.BATCHES}
    ratios = serve._ratios({name: {} for name in step_s}, per_round)
    for b in map(str, serve.BATCHES):
        assert ratios[f"tokens/s {serve.V2_REMOTE} / {serve.V2_LOCAL}"][b] == pytest.approx(0.75)
        assert ratios[f"tokens/s {serve.MID} / local-2^20"][b] == pytest.approx(0.8)
        assert ratios[f"tokens/s {serve.V2_REMOTE} / {serve.MID}"][b] == pytest.approx(0.833, abs=1e-3)
        assert ratios[f"hop ms per token per memory layer (p50 {serve.V2_REMOTE} - {serve.V2_LOCAL})"][b] == \
            pytest.approx(3.0)
    checks = serve._checks(ratios)
    v2_hop = checks["UltraMemV2 remote hop per token per memory layer at batch 1, ms (target < 2)"]["2 shards"]
    assert v2_hop == {"ms": pytest.approx(3.0), "met": False}
    reported = checks["tokens/s remote / local at batch 1 / 16 / 64 (reported)"]
    assert reported["v2"]["1"] == pytest.approx(0.75) and reported["v1"]["1"] == pytest.approx(0.8)


@pytest.mark.slow
def test_bench_serve_quick_serves_a_v2_model_remotely_beside_v1(tmp_path: Path) -> None:
    res = _run("bench", "serve", "--quick", "--out", str(tmp_path), timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "serve.json").read_text())
    assert r["model"]["v2"]["d_p"] == r["model"]["d_v"] // 3
    for leg in ("remote-v2-2^20", "local-v2-2^20", "remote-2^20", "local-2^20"):
        tps = [r["configs"][leg]["batches"][b]["tokens_per_s"] for b in ("1", "16", "64")]
        assert all(math.isfinite(v) and v > 0 for v in tps), (leg, tps)
    assert r["configs"]["remote-v2-2^20"]["shards"] == 2
    for name in ("tokens/s remote-v2-2^20 / local-v2-2^20", "tokens/s remote-2^20 / local-2^20"):
        assert all(math.isfinite(v) and v > 0 for v in r["ratios"][name].values()), name
    hop = r["checks"]["UltraMemV2 remote hop per token per memory layer at batch 1, ms (target < 2)"]["2 shards"]
    assert math.isfinite(hop["ms"]) and isinstance(hop["met"], bool)
    assert (tmp_path / "serve.png").read_bytes()[:8] == PNG_MAGIC


def test_beyond_ram_replays_each_stream_on_its_own_shards(tmp_path) -> None:
    """A busy stream larger than the cache and a small hot set: replayed on shared shards, the busy
    rows (more frequent) would evict the hot ones between passes; each stream on its own cached
    shard, the hot set's timed passes hit the row cache every time and move no chunk bytes."""
    import numpy as np

    from bench.beyond_ram import _replay_legs
    from param_server.partitions import partition_nbytes
    from storage.layout import TableSpec

    spec = TableSpec(name="t", rows=4096, dim=128, num_partitions=4, optimizer="adamw")  # the `small` preset's
    budget = partition_nbytes(spec) * spec.num_partitions // 4
    rng = np.random.default_rng(0)
    busy = rng.permutation(spec.rows)[: spec.rows * 3 // 4]  # more rows than the cache holds, each read 4x a pass
    streams = {"scan": [busy] * 4, "hot": [rng.choice(spec.rows, 64, replace=False) for _ in range(2)]}
    out, _, _ = _replay_legs(spec, tmp_path, streams, budget, rounds=2, tokens_per_step=64, n_steps=2)
    hot = out["hot"]["cached"]
    assert hot["row_hit_rate"] == 1.0 and hot["io_read_bytes_per_step"] == 0 == hot["io_write_bytes_per_step"]
    assert out["scan"]["cached"]["row_hit_rate"] < 0.5 and out["scan"]["cached"]["io_read_bytes_per_step"] > 0
