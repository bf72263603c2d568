"""`make gpu-check` (bench/gpu_check.py): the comparison that decides whether a device run matches the
CPU reference, the exits for a machine that cannot run the check, and the whole check run on the CPU
with fewer steps (shard processes, rows and pooled mode; `make gpu-check DEVICE=cpu` runs 20)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ultramem_gpu_check", REPO / "bench" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # its dataclass looks its module up
_spec.loader.exec_module(gpu_check)


def _run(name: str = "rows/cuda/fp32", loss_shift: float = 0.0, table_scale: float = 1.0):
    """A run whose table ended at `table_scale` x the reference's; training moved the table by 10%."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((64, 32)).astype(np.float32)
    w = torch.linspace(-1, 1, 100)
    return gpu_check.RunResult(
        name, [6.25 - 0.01 * s + (loss_shift if s == 7 else 0.0) for s in range(20)],
        {"w": w}, {"mem0.values": table * table_scale},
        start={"dense/w": w * 0.9, "table/mem0.values": table * 0.9})


def test_a_run_equal_to_the_reference_matches():
    assert gpu_check.compare(_run(), _run("reference"), "fp32") == []


def test_a_loss_off_by_more_than_the_fp32_tolerance_at_one_step_is_reported_with_its_step():
    problems = gpu_check.compare(_run(loss_shift=0.01), _run("reference"), "fp32")
    assert len(problems) == 1 and "step 7" in problems[0]
    assert gpu_check.compare(_run(loss_shift=0.01), _run("reference"), "bf16") == []  # within bf16's


def test_a_table_off_by_more_than_the_tolerance_of_its_training_change_is_reported_by_name():
    # off by 1% of its values, 10% of the change training made: beyond fp32's, within bf16's tolerance
    problems = gpu_check.compare(_run(table_scale=1.01), _run("reference"), "fp32")
    assert len(problems) == 1 and "table mem0.values" in problems[0]
    assert gpu_check.compare(_run(table_scale=1.01), _run("reference"), "bf16") == []
    assert gpu_check.worst_distance(_run(table_scale=1.01), _run("reference")) == pytest.approx(0.1, rel=1e-5)


def test_nan_losses_and_missing_tensors_never_match():
    run = _run()
    run.losses[3] = float("nan")
    del run.dense["w"]
    problems = gpu_check.compare(run, _run("reference"), "bf16")
    assert any("step 3" in p for p in problems) and any("dense names differ" in p for p in problems)


def test_a_machine_without_a_needed_package_exits_2_before_starting_anything(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "_environment_problems", lambda: ["missing Python packages: zarr"])
    assert gpu_check.main(["--device", "cpu"]) == 2
    assert "zarr" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_cuda_without_a_cuda_device_exits_2(capsys):
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "DEVICE=cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu_and_its_runs_match_exactly():
    """What `make gpu-check DEVICE=cpu` runs, shortened: the worker on the CPU against 2 `ultramem shard
    serve` processes, rows and pooled mode, each against its own CPU reference (bit-equal there)."""
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--shards",
                          "processes", "--steps", "6"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    lines = res.stdout.splitlines()
    for mode in ("rows", "pooled"):
        runs = [line.split() for line in lines if line.strip().startswith(f"{mode}/cpu/fp32")]
        assert [r[-1] for r in runs] == ["reference", "match"], runs
        assert runs[1][3:5] == ["0.0e+00", "0.0e+00"]  # max |dloss| and max distance: none on the CPU
    assert lines[-1] == "gpu-check: every run matches the CPU reference"
