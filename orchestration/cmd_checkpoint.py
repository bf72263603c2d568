"""`ultramem checkpoint verify PATH`: is every checkpoint of a run what its manifest promises?

PATH is a run directory, its `checkpoints/` directory, or one `step-N`. Each step directory is
checked (manifest readable, every file present with its size and sha256, the required files
listed; model_workers.checkpoint_io.verify) and reported as `valid` or `invalid` with the reason.
Exit 0 only if the newest checkpoint is valid (what `--resume RUN` and `--checkpoint RUN` would
load without falling back), 1 if it is not, 2 if PATH holds no checkpoint directory at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestration.errors import UsageError


def verify(args: argparse.Namespace) -> int:
    """Print one line per step directory, newest first; the exit status says whether the newest is valid."""
    from model_workers import checkpoint_io
    from storage.checkpoint import MANIFEST, step_dirs, step_of
    from storage.errors import CheckpointError

    path = Path(args.path)
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    if (path / MANIFEST).exists() or path.name.startswith("step-"):
        try:
            step_of(path)
        except CheckpointError as err:
            raise UsageError(str(err)) from None
        dirs = [path]
    else:
        dirs = [p for _, p in step_dirs(path / "checkpoints")] or [p for _, p in step_dirs(path)]
    if not dirs:
        raise UsageError(f"no checkpoint directories (step-N) in {path}")
    statuses = [checkpoint_io.check(p) for p in reversed(dirs)]  # newest first
    width = max(len(s.path.name) for s in statuses)
    for status in statuses:
        if status.valid:
            print(f"{status.path.name:<{width}}  valid")
        else:
            print(f"{status.path.name:<{width}}  invalid  {checkpoint_io.reason(status)}")
    newest = statuses[0]
    if newest.valid:
        return 0
    valid = next((s for s in statuses if s.valid), None)
    fallback = f"{valid.path.name} is the newest valid one" if valid else "none is valid"
    print(f"the newest checkpoint, {newest.path.name}, is invalid; {fallback}")
    return 1
