"""No traceback reaches a user for a foreseeable failure (DESIGN §7.1): one line, the right exit
status, the traceback only with --debug or ULTRAMEM_DEBUG=1."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import pytest

from orchestration import cli
from orchestration.distributed import CheckpointFailedError, WorkerFailedError
from orchestration.errors import ConfigError, describe
from storage.errors import CheckpointError


def _fail_with(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    def handler(args: object) -> int:
        raise err

    monkeypatch.setattr(cli, "_handler", lambda args: handler)


def _ray_init_error(message: str) -> BaseException:
    """The error Ray raises when an actor's __init__ failed, built the way Ray builds it."""
    import ray.exceptions

    try:
        raise CheckpointError(message)
    except CheckpointError as cause:
        task = ray.exceptions.RayTaskError("ShardActor.__init__", traceback.format_exc(), cause,
                                           proctitle="ray::ShardActor.__init__()", pid=4242, ip="127.0.0.1")
    return ray.exceptions.ActorDiedError(task)


def _ray_task_error(cause: Exception) -> BaseException:
    """What ray.get raises when a remote method (here ModelWorker.run) raised `cause`."""
    import ray.exceptions

    try:
        raise cause
    except Exception as err:
        task = ray.exceptions.RayTaskError("ModelWorker.run", traceback.format_exc(), err,
                                           proctitle="ray::ModelWorker.run()", pid=77, ip="127.0.0.1")
    return task.as_instanceof_cause()


ERRORS: list[tuple[Callable[[], BaseException], int, str]] = [
    (lambda: ConfigError("train.lr must be > 0"), 2, "train.lr must be > 0"),
    (lambda: WorkerFailedError("a model worker died while training steps 17..17 (x)"), 1,
     "a model worker died while training steps 17..17 (x)"),
    (lambda: CheckpointFailedError("checkpoint step-40 failed (OSError: No space left on device)"), 1,
     "checkpoint step-40 failed (OSError: No space left on device)"),
    (lambda: _ray_init_error("checkpoint c/step-20 does not match its manifest: tables/m/values/c/1/0/0: missing"), 1,
     "a Ray actor (ShardActor pid 4242) died: CheckpointError: checkpoint c/step-20 does not match its manifest: "
     "tables/m/values/c/1/0/0: missing"),
    (lambda: _ray_task_error(TimeoutError("shard 127.0.0.1:5555 did not answer within 3 s")), 1,
     "ModelWorker pid 77 failed: TimeoutError: shard 127.0.0.1:5555 did not answer within 3 s"),
    (lambda: FileNotFoundError(2, "No such file or directory", "/data/run/dense.pt"), 1,
     "No such file or directory: /data/run/dense.pt"),
    (lambda: RuntimeError("Zstd decompression error\nmore detail"), 1, "RuntimeError: Zstd decompression error"),
]


@pytest.mark.parametrize(("make", "code", "message"), ERRORS)
def test_a_failure_is_one_line_with_its_exit_status(make, code, message, monkeypatch, capsys):
    monkeypatch.delenv("ULTRAMEM_DEBUG", raising=False)
    _fail_with(monkeypatch, make())
    assert cli.main(["plan", "--preset", "tiny"]) == code
    err = capsys.readouterr().err
    assert err.startswith(f"ultramem: error: {message}") and err.count("\n") == 1
    assert "Traceback" not in err
    assert describe(make()) == (code, message)


@pytest.mark.parametrize("ask", [["--debug"], []])
def test_debug_flag_or_environment_shows_the_traceback(ask, monkeypatch, capsys):
    if ask:
        monkeypatch.delenv("ULTRAMEM_DEBUG", raising=False)
    else:
        monkeypatch.setenv("ULTRAMEM_DEBUG", "1")
    _fail_with(monkeypatch, RuntimeError("Zstd decompression error"))
    assert cli.main([*ask, "plan", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: Zstd decompression error" in err
    assert err.rstrip().splitlines()[-1] == "ultramem: error: RuntimeError: Zstd decompression error"
