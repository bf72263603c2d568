"""Errors of the orchestration layer: a UsageError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import re


class OrchestrationError(Exception):
    """Base of every error raised by orchestration/."""


class UsageError(OrchestrationError, ValueError):
    """The user asked for something impossible (bad flag, bad config value, missing file)."""


class ConfigError(UsageError):
    """A configuration field is unknown or out of range; the message names the field."""


# --- what the CLI prints for an error (DESIGN §7.1: one line, exit 2 for bad input, 1 otherwise) ---

DEBUG_ENV = "ULTRAMEM_DEBUG"  # set to 1 (or pass --debug) to see the traceback of a failure

_EXIT_USAGE, _EXIT_FAILURE = 2, 1
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its messages


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _ray_cause(text: str) -> str:
    """The remote error inside a Ray error's text: its last "SomeError: message" line (Ray puts the
    remote traceback in between), else its first line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head, sep, rest = line.partition(": ")
        name = head.rsplit(".", 1)[-1]  # "storage.errors.CheckpointError" -> "CheckpointError"
        if sep and head.replace(".", "").isidentifier() and name.endswith(("Error", "Exception")):
            return f"{name}: {rest}"
    return lines[0] if lines else ""


def _ray_actor(text: str) -> str:
    """Which actor a Ray error is about ("ShardActor pid 123"), from Ray's message, or ""."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep and key in ("class_name", "pid", "name"):
            fields[key] = value.strip()
    task = re.search(r"ray::(\w+)", text)  # a task error: "ray::ShardActor.__init__() (pid=123, ip=...)"
    pid = re.search(r"\(pid=(\d+)", text)
    if task and "class_name" not in fields:
        fields["class_name"] = task.group(1)
    if pid and "pid" not in fields:
        fields["pid"] = pid.group(1)
    return " ".join(v for v in (fields.get("class_name"), fields.get("name") and f"'{fields['name']}'",
                                fields.get("pid") and f"pid {fields['pid']}") if v)


def describe(err: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an error that reached the CLI.

    Ours carry their own message (a UsageError is bad input: 2). Ray's name the actor and the
    remote error; an OSError names its file; anything else is "Type: first line" with exit 1.
    """
    if isinstance(err, UsageError):
        return _EXIT_USAGE, str(err)
    name = type(err).__name__
    module = type(err).__module__ or ""
    if module.startswith("ray."):
        text = _ANSI.sub("", str(err))
        actor = _ray_actor(text)
        if name in ("ActorDiedError", "RayActorError", "ActorUnavailableError"):
            what = f"a Ray actor ({actor}) died" if actor else "a Ray actor died"
            cause = _ray_cause(text) if "creation task" in text else _first_line(text)
            return _EXIT_FAILURE, f"{what}: {cause}"
        if name == "GetTimeoutError":
            return _EXIT_FAILURE, f"timed out waiting for the cluster: {_first_line(text)}"
        if name.startswith("RayTaskError"):  # a remote method raised: say where, then what
            return _EXIT_FAILURE, f"{actor or 'a Ray task'} failed: {_ray_cause(text)}"
        where = f" in {actor}" if actor else ""
        return _EXIT_FAILURE, f"{name}{where}: {_ray_cause(text)}"
    if isinstance(err, OSError) and err.filename is not None:
        return _EXIT_FAILURE, f"{err.strerror or name}: {err.filename}"
    first = _first_line(str(err))
    if module.startswith(("storage", "param_server", "model_workers", "orchestration")):
        return _EXIT_FAILURE, first or name  # our own errors: the message names the file, shard or worker
    return _EXIT_FAILURE, f"{name}: {first}" if first else name
