"""`ultramem bench` plumbing (DESIGN §7.1): a benchmark run writes its JSON and a PNG; bad names exit 2.

The real `wire --quick` run goes through the CLI in a subprocess (the contract scripts rely on);
the `all` behaviour is checked in-process with stand-in benchmarks in a temporary bench directory.
"""

from __future__ import annotations

import argparse
import json
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
        for call in calls:
            assert r["ratio_to_floor"][layer][call] == pytest.approx(shard[call] / floor)
        assert set(r["tokens_per_s"][layer]) == {f"{s} shards/{t} tokens" for s in (1, 2) for t in (1, 64)}
        assert all(v > 0 for v in r["tokens_per_s"][layer].values())
    assert r["gather_vs_socket"] > 0
    assert "target met" in res.stdout or "MISSED" in res.stdout
