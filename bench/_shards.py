"""Start and stop `ultramem shard serve` processes for the benchmarks (bench/lookup.py, train.py, beyond_ram.py).

Each shard is a real process started as a user would (`python -m orchestration.cli shard serve`),
with the allocator settings DESIGN §8 recommends for gRPC payloads; the first line it prints says
where it listens. Processes are stopped by PID (SIGTERM, then SIGKILL after 30 s), never by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_shards(tables: Sequence[Path], num_shards: int, *,
                 extra_args: Sequence[str] = ()) -> tuple[list[subprocess.Popen], list[str]]:
    """Start `num_shards` shard processes serving `tables`; returns (processes, "host:port" addresses).

    extra_args go to every `shard serve` command (e.g. ["--ram-budget-mb", "1.5"]).
    Raises: RuntimeError (after stopping the others) when a shard does not report its address.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # a shard sets its own malloc settings
    table_args = [arg for t in tables for arg in ("--table", str(t))]
    procs = [subprocess.Popen([sys.executable, "-m", "orchestration.cli", "shard", "serve", *table_args,
                               "--shard-id", str(s), "--num-shards", str(num_shards), *extra_args],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) for s in range(num_shards)]
    addresses = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("listening on "):
            stop_shards(procs)
            raise RuntimeError(f"shard did not start: {line!r}")
        addresses.append(line.removeprefix("listening on "))
    return procs, addresses


def stop_shards(procs: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every process still running, wait up to 30 s each, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
