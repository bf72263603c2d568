"""Damaged checkpoints (issue: verify what the manifest promises): the CLI never loads one silently.

A tiny `--local` run writes step-10 and step-20; each test copies it and damages step-20 the way
disks and interrupted copies do. `--checkpoint RUN` / `--resume RUN` must fall back to step-10
with a warning naming step-20 and why; naming step-20 itself must fail in one line with exit 2;
`ultramem checkpoint verify` must say which is which; and a run resumed after the fallback must end
exactly where the undamaged run ended (the tiny preset trains in exact fp32).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model_workers import checkpoint_io
from orchestration.cli import main
from storage.checkpoint import table_path
from storage.table_store import open_table

TABLE = "tables/mem0.values"


def _delete(path: Path) -> None:
    path.unlink()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[64:128] = bytes(b ^ 0xFF for b in data[64:128])  # 64 bytes, same size
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _garble(path: Path) -> None:
    path.write_text('{"format": ')


# name -> (file of step-20 it damages, how, what the reason must say)
DAMAGES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "value chunk deleted": (f"{TABLE}/values/c/1/0/0", _delete, "values/c/1/0/0: missing"),
    "value chunk bytes flipped": (f"{TABLE}/values/c/1/0/0", _flip, "values/c/1/0/0: sha256 mismatch"),
    "value chunk truncated": (f"{TABLE}/values/c/1/0/0", _truncate, "values/c/1/0/0: 1024 bytes"),
    "zstd optimizer chunk truncated": (f"{TABLE}/exp_avg/c/1/0/0", _truncate, "exp_avg/c/1/0/0: "),
    "manifest unparsable": ("manifest.json", _garble, "corrupt manifest"),
    "manifest deleted": ("manifest.json", _delete, "no manifest.json"),
    "dense.pt truncated": ("dense.pt", _truncate, "dense.pt: "),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny --local run with complete checkpoints step-10 and step-20 (never modified)."""
    run = tmp_path_factory.mktemp("damage") / "run"
    assert main(["train", "--local", "--preset", "tiny", "--max-steps", "20", "--out", str(run), "--no-progress",
                 "--set", "train.checkpoint_every=10", "--set", "train.keep_checkpoints=0",
                 "--set", "train.eval_every=0"]) == 0
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-10", "step-20"]
    return run


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request: pytest.FixtureRequest, pristine: Path, tmp_path: Path) -> tuple[Path, str]:
    """(a copy of the run with step-20 damaged one way, the reason verification must give)."""
    rel, damage, reason = DAMAGES[request.param]
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    damage(run / "checkpoints" / "step-20" / rel)
    return run, reason


def _generate(checkpoint: Path, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(["generate", "--checkpoint", str(checkpoint), "--max-tokens", "8", "--seed", "3", "The Congress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_every_checkpoint_of_a_fresh_run_verifies_and_lists_dense_pt_with_a_sha256(pristine: Path) -> None:
    for step in (10, 20):
        manifest = checkpoint_io.verify(pristine / "checkpoints" / f"step-{step}")
        dense = next(f for f in manifest["files"] if f["path"] == "dense.pt")
        assert len(dense["sha256"]) == 64
        assert all("sha256" in f for f in manifest["files"])


def test_generate_from_the_run_falls_back_to_the_newest_valid_checkpoint_with_a_warning(
        damaged: tuple[Path, str], pristine: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    run, reason = damaged
    expected = _generate(pristine / "checkpoints" / "step-10", capsys)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = _generate(run, capsys)
    assert got[0] == 0 and got[1] == expected[1]  # exactly what step-10 generates
    warned = _warnings(caplog)
    assert "step-20" in warned and reason in warned and "step-10" in warned


def test_generate_from_the_damaged_step_itself_exits_2_with_one_line(damaged: tuple[Path, str],
                                                                     capsys: pytest.CaptureFixture) -> None:
    run, reason = damaged
    code, out, err = _generate(run / "checkpoints" / "step-20", capsys)
    assert code == 2 and out == ""
    assert err.startswith("ultramem: error: cannot load checkpoint") and reason in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_serve_of_the_damaged_step_itself_exits_2_before_starting_anything(damaged: tuple[Path, str],
                                                                          capsys: pytest.CaptureFixture) -> None:
    run, reason = damaged
    assert main(["serve", "--checkpoint", str(run / "checkpoints" / "step-20"), "--in-process", "--port", "0"]) == 2
    out = capsys.readouterr()
    assert "listening" not in out.out and reason in out.err and out.err.count("\n") == 1


def test_checkpoint_verify_names_the_damage_and_fails_when_the_newest_is_invalid(
        damaged: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    run, reason = damaged
    assert main(["checkpoint", "verify", str(run)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["step-20", "invalid"] and reason in lines[0]
    assert lines[1].split() == ["step-10", "valid"]
    assert "step-10 is the newest valid one" in lines[2]
    assert main(["checkpoint", "verify", str(run / "checkpoints" / "step-10")]) == 0


def test_checkpoint_verify_of_a_healthy_run_exits_0_and_of_nothing_exits_2(pristine: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    assert main(["checkpoint", "verify", str(pristine)]) == 0
    assert capsys.readouterr().out.split() == ["step-20", "valid", "step-10", "valid"]
    assert main(["checkpoint", "verify", str(tmp_path)]) == 2
    assert "no checkpoint directories" in capsys.readouterr().err


def _state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    dense = checkpoint_io.read_dense(ckpt)
    flat = {f"model/{k}": v for k, v in dense["model"].items()}
    for i, s in dense["optimizer"]["state"].items():
        flat.update({f"adam/{i}/{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    tables = {}
    for name in checkpoint_io.read_manifest(ckpt)["tables"]:
        store = open_table(table_path(ckpt, name))
        for p in range(store.spec.num_partitions):
            tables.update({f"{name}/{p}/{k}": a for k, a in store.read_partition(p).items()})
    return flat, tables


@pytest.mark.slow
def test_resume_after_a_fallback_ends_exactly_where_the_undamaged_run_ended(
        damaged: tuple[Path, str], pristine: Path, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    run, reason = damaged
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--local", "--resume", str(run), "--no-progress"]) == 0
    assert "steps:          20" in capsys.readouterr().out
    assert reason in _warnings(caplog)
    ckpts = run / "checkpoints"
    dense_a, tables_a = _state(ckpts / "step-20")  # written again by the resumed run, from step-10
    dense_b, tables_b = _state(pristine / "checkpoints" / "step-20")
    assert dense_a.keys() == dense_b.keys() and tables_a.keys() == tables_b.keys()
    for k in dense_a:
        assert torch.equal(dense_a[k], dense_b[k]), k
    for k in tables_a:
        np.testing.assert_array_equal(tables_a[k], tables_b[k], err_msg=k)
    # the damaged step-20 was set aside (or, without a manifest, replaced): the next resume is clean
    assert main(["checkpoint", "verify", str(run)]) == 0
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--local", "--resume", str(run), "--max-steps", "21", "--no-progress"]) == 0
    assert _warnings(caplog) == ""
    assert checkpoint_io.find_checkpoint(run).name == "step-21"
