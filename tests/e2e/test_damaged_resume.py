"""A damaged checkpoint on the Ray path (docs/reliability.md §7): resume falls back past it, the shards
load the checkpoint the driver chose (not the newest on disk), and the result equals the local run;
a Ray-trained run resumes with --local too."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from model_workers import checkpoint_io
from orchestration.cli import main
from orchestration.distributed import train_distributed

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[64:128] = bytes(b ^ 0xFF for b in data[64:128])
    path.write_bytes(bytes(data))


def test_ray_resume_past_a_flipped_chunk_matches_local_and_local_resume_of_a_ray_run_works(
        ray_session, e2e, local_tiny_run, tmp_path, caplog):
    cfg = e2e.tiny_config(shards=2, consistency="sync")
    run = tmp_path / "ray"
    first = train_distributed(cfg, run, progress=False)
    assert [s for s, _ in checkpoint_io.list_checkpoints(run / "checkpoints")] == [10, 20]
    assert first.checkpoint is not None and checkpoint_io.check(first.checkpoint).valid  # shards' digests agree

    # same size, other bytes: the manifest still parses, so only the sha256 tells
    _flip(run / "checkpoints" / "step-20" / "tables" / "mem0.values" / "values" / "c" / "1" / "0" / "0")
    with caplog.at_level("WARNING"):
        resumed = train_distributed(cfg, run, resume=run, progress=False)
    assert "values/c/1/0/0: sha256 mismatch" in caplog.text
    assert resumed.steps == e2e.STEPS
    assert (run / "checkpoints" / "step-20.damaged").is_dir()
    e2e.assert_same_state(resumed.checkpoint, local_tiny_run)  # shards loaded step-10, not the damaged step-20

    # a checkpoint written on Ray holds no torch RNG state: --local resumes it all the same
    local = tmp_path / "local"
    shutil.copytree(Path(local_tiny_run).parent.parent, local)
    assert main(["train", "--local", "--resume", str(run), "--max-steps", "22", "--no-progress"]) == 0
    assert main(["train", "--local", "--resume", str(local), "--max-steps", "22", "--no-progress"]) == 0
    e2e.assert_same_state(run / "checkpoints" / "step-22", local / "checkpoints" / "step-22")
