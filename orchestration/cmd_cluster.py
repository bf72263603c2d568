"""`ultramem cluster up|status|down`: thin wrappers over Ray's own CLI for a real cluster (DESIGN §1).

`up` starts a head node (or, with --address, joins one) bound to --host (127.0.0.1 unless told
otherwise) and declares `memory_shard` units for nodes that should hold parameter-server shards.
Head-only flags (`--head`, `--port`, `--include-dashboard`) go to the head only: Ray refuses them
on a joining node. `--temp-dir` keeps this node's sockets, logs and session files apart from any
other Ray on the machine.
`down` is `ray stop`, which ends every Ray process of this machine: it is meant for a machine
given to the cluster, never for tests (they stop what they started).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from orchestration.cluster import LOOPBACK
from orchestration.errors import UsageError


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the venv's own ray, even when not activated
    exe = str(beside) if beside.exists() else shutil.which("ray")
    if exe is None:
        raise UsageError("the `ray` command is not on PATH (activate the venv that has ray installed)")
    return exe


def up_command(args: argparse.Namespace) -> list[str]:
    """The `ray start` command line for `ultramem cluster up` with these arguments."""
    cmd = [_ray_cli(), "start", f"--node-ip-address={args.host}", "--disable-usage-stats"]
    resources = {}
    if args.memory_shards:
        resources["memory_shard"] = args.memory_shards
    if args.model_workers:
        resources["model_worker"] = args.model_workers
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    if args.address:
        cmd.append(f"--address={args.address}")
    else:
        cmd += ["--head", f"--port={args.port}", "--include-dashboard=false"]  # head-only flags
    if getattr(args, "temp_dir", None):
        cmd.append(f"--temp-dir={args.temp_dir}")
    return cmd


def _env(host: str) -> dict[str, str]:
    env = dict(os.environ)
    if host == LOOPBACK:  # DESIGN §8: without this Ray also listens on 0.0.0.0
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def up(args: argparse.Namespace) -> int:
    cmd = up_command(args)
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=_env(args.host), check=False).returncode


def status(args: argparse.Namespace) -> int:
    cmd = [_ray_cli(), "status"] + ([f"--address={args.address}"] if getattr(args, "address", None) else [])
    return subprocess.run(cmd, check=False).returncode


def down(args: argparse.Namespace) -> int:
    print("+ ray stop   (ends every Ray process on this machine)", flush=True)
    return subprocess.run([_ray_cli(), "stop"], check=False).returncode
