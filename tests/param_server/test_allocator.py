"""malloc settings of shards and workers (param_server/allocator.py): set in a running process with
mallopt unless the environment already names them, and what each launcher hands its processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.placement import shard_env, shard_options, worker_options
from param_server import allocator

REPO = Path(__file__).resolve().parents[2]


def _apply_in_a_fresh_process(settings: dict[str, str], env: dict[str, str]) -> dict[str, str]:
    """allocator.apply(settings) in a new interpreter (mallopt cannot be undone in this one)."""
    code = ("import json, sys; from param_server import allocator; "
            "print(json.dumps(allocator.apply(json.loads(sys.argv[1]))))")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True,
                         env={**clean, **env, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_apply_sets_each_setting_unless_the_environment_already_chose_it() -> None:
    settings = allocator.shard_settings(budgeted=False)
    assert _apply_in_a_fresh_process(settings, {}) == settings
    kept = _apply_in_a_fresh_process(settings, {"MALLOC_TRIM_THRESHOLD_": "0"})
    assert kept == {k: v for k, v in settings.items() if k != "MALLOC_TRIM_THRESHOLD_"}


def test_launchers_give_shards_and_workers_their_settings() -> None:
    big = 32 << 20
    assert int(shard_env(budgeted=False)["MALLOC_MMAP_THRESHOLD_"]) == big  # freed buffers reused
    assert int(shard_env(budgeted=True)["MALLOC_MMAP_THRESHOLD_"]) == 1 << 20  # RSS kept near the budget
    assert "MALLOC_TRIM_THRESHOLD_" not in shard_env(budgeted=True)
    assert all(e["MALLOC_ARENA_MAX"] == "2" for e in (shard_env(budgeted=False), shard_env(budgeted=True)))
    cpu_only = {"CPU": 4}
    assert shard_options(cpu_only)["runtime_env"]["env_vars"] == shard_env(budgeted=False)
    assert shard_options(cpu_only, budgeted=True)["runtime_env"]["env_vars"] == shard_env(budgeted=True)
    assert int(worker_options(cpu_only)["runtime_env"]["env_vars"]["MALLOC_MMAP_THRESHOLD_"]) == big
