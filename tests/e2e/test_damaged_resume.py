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


def test_a_dead_worker_fails_the_job_in_one_line_and_the_shutdown_does_not_warn(ray_session, e2e, tmp_path, caplog):
    import os
    import signal
    import time

    import ray

    from orchestration.distributed import DistributedTrainer, WorkerFailedError
    from orchestration.errors import describe

    trainer = DistributedTrainer(e2e.tiny_config(shards=2, consistency="sync", on_worker_failure="fail"), tmp_path,
                                 progress=False)
    try:
        worker = trainer.workers[0]
        os.kill(ray.get(worker.pid.remote(), timeout=60), signal.SIGKILL)
        deadline = time.monotonic() + 180
        while True:  # poll the observable state: the actor answers (or hangs) until Ray has seen it die
            try:
                ray.get(worker.pid.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:  # a busy machine: Ray has not noticed the death yet
                pass
            assert time.monotonic() < deadline, "the killed worker still answers"
        with pytest.raises(WorkerFailedError) as failed:
            trainer.run()
    finally:
        caplog.clear()
        with caplog.at_level("INFO"):
            trainer.close()
    code, message = describe(failed.value)
    assert code == 1 and message.startswith("a model worker died while training steps 1..") and "\n" not in message
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name == "orchestration.distributed"]
    assert "had already died" in caplog.text
