"""`ultramem bench [lookup|train|wire|beyond-ram|serve|overlap|checkpoint|memory-path|all]` (DESIGN §7.1, §8).

Each benchmark is a script `bench/<name>.py` with `run(out_dir, quick) -> dict` that measures its
figures side by side with their limits, prints ratios and writes `<out_dir>/<name>.json`. This
command finds and runs them, then draws `<out_dir>/<name>.png` from each JSON with
`bench/plots.py`. `all` runs every one present; one that fails is reported and the rest still
run (exit 1 at the end). docs/benchmarks.md shows the latest figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

from orchestration.errors import UsageError

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
NAMES = ("lookup", "train", "wire", "beyond-ram", "serve", "overlap", "checkpoint", "memory-path")


def _load(name: str) -> ModuleType | None:
    path = BENCH_DIR / f"{name.replace('-', '_')}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"ultramem_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_one(name: str, module: ModuleType, out: Path, quick: bool) -> None:
    """Run one benchmark, then plot its JSON."""
    module.run(out, quick=quick)
    plots = _load("plots")
    result = out / f"{name.replace('-', '_')}.json"
    if plots is not None and result.is_file():
        png = plots.render(result)
        if png is not None:
            print(f"  plotted {png}")


def bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark(s) and plot them; exit 2 if one is not in this build, 1 if one failed."""
    names = NAMES if args.which == "all" else (args.which,)
    out = Path(args.out)
    ran, failed = 0, []
    for name in names:
        module = _load(name)
        if module is None:
            if args.which != "all":
                raise UsageError(f"`ultramem bench {name}` is not available in this build yet ({BENCH_DIR})")
            logger.warning("bench %s not available, skipped", name)
            continue
        if args.which != "all":
            _run_one(name, module, out, args.quick)
            return 0
        try:
            _run_one(name, module, out, args.quick)
            ran += 1
        except Exception:  # `all` goes on: one broken benchmark must not hide the others' figures
            logger.exception("bench %s failed", name)
            failed.append(name)
    if not ran and not failed:
        raise UsageError(f"no benchmarks found in {BENCH_DIR}")
    if failed:
        print(f"ultramem bench all: {', '.join(failed)} failed (see the log above)")
        return 1
    return 0
