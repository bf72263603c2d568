"""Run a command while a bounded CPU hog keeps every core busy (`make test-stress`).

    python tests/stress.py [--procs N] [--nice K] [--max-minutes M] -- COMMAND...

Starts N busy-loop processes (default: one per core) at niceness K, runs COMMAND, then stops the
hog processes by PID, also when COMMAND fails or is interrupted. Each hog also ends by itself after
--max-minutes (default 60), so nothing outlives a killed run for long. Exits with COMMAND's
status. Tests that use a fixed sleep, or a deadline too tight for a loaded machine, in place of
synchronization fail here while they pass on an idle machine.

The default niceness is Ray's own worker niceness (15: the raylet starts every task and actor
process at nice 15 so that it and the driver keep their share). A hog at that level takes half of
a core from each Ray actor that wants it and a small share from the driver, the shard processes
and the raylet. A hog at nice 0 would take nearly every cycle from Ray's actors, a machine no
deployment runs on (measured: the end-to-end tests ran at a few percent of their idle speed).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

RAY_WORKER_NICENESS = 15


def _lower_priority(niceness: int) -> None:
    """Run at `niceness`, also where the kernel groups processes by session (autogroup, common on
    desktops and some servers): nice then only ranks processes within one session, so the hog takes
    a session of its own and gives that session's group the same niceness."""
    os.setsid()
    try:
        Path("/proc/self/autogroup").write_text(f"{niceness}\n")
    except OSError:  # no autogroup in this kernel (or not Linux): plain nice decides
        pass
    os.nice(niceness - os.nice(0))


def _burn(deadline: float, niceness: int) -> None:
    """Spin on one core at `niceness` until `deadline` (time.monotonic) or until terminated."""
    _lower_priority(niceness)
    x = 0
    while time.monotonic() < deadline:
        for _ in range(10_000):
            x = (x * 1_103_515_245 + 12_345) & 0x7FFFFFFF


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(__doc__, file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="stress.py")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--nice", type=int, default=RAY_WORKER_NICENESS,
                        help="hog niceness (default: Ray's worker niceness, 15)")
    parser.add_argument("--max-minutes", type=float, default=60.0)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        parser.error("no command after --")

    ctx = mp.get_context("spawn")
    deadline = time.monotonic() + 60 * args.max_minutes
    hogs = [ctx.Process(target=_burn, args=(deadline, args.nice), daemon=True, name=f"cpu-hog-{i}")
            for i in range(args.procs)]
    for hog in hogs:
        hog.start()
    print(f"stress: {len(hogs)} CPU hog processes at nice {args.nice} (pids {', '.join(str(h.pid) for h in hogs)}), "
          f"at most {args.max_minutes:g} min; running: {' '.join(command)}", flush=True)
    started = time.monotonic()
    try:
        status = subprocess.call(command)
    finally:
        for hog in hogs:
            hog.terminate()
        for hog in hogs:
            hog.join(10)
            if hog.is_alive():
                hog.kill()
                hog.join(10)
    alive = [h.pid for h in hogs if h.is_alive()]
    print(f"stress: command exited {status} after {time.monotonic() - started:.0f} s; hogs stopped"
          + (f" (still alive: {alive})" if alive else ""), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
