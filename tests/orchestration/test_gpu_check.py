"""`make gpu-check` (bench/gpu_check.py): the comparison that decides whether a device run matches the
CPU reference, and the exits for a machine that cannot run the check. The full check starts shard
processes and trains 4-6 runs (about 2 minutes on 2 busy cores), so the suite leaves it to
`make gpu-check DEVICE=cpu`."""

from __future__ import annotations

import importlib.util
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
