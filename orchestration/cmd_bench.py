"""`ultramem bench [lookup|train|wire|beyond-ram|serve|all]` (DESIGN §7.1, §8).

Each benchmark is a script `bench/<name>.py` with `run(out_dir, quick) -> dict` that measures its
figures side by side with their limits, prints ratios and writes `<out_dir>/<name>.json`. This
command only finds and runs them; `all` runs every one present.
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
NAMES = ("lookup", "train", "wire", "beyond-ram", "serve")


def _load(name: str) -> ModuleType | None:
    path = BENCH_DIR / f"{name.replace('-', '_')}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"ultramem_bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark(s); exit 2 if one is not in this build."""
    names = NAMES if args.which == "all" else (args.which,)
    ran = 0
    for name in names:
        module = _load(name)
        if module is None:
            if args.which != "all":
                raise UsageError(f"`ultramem bench {name}` is not available in this build yet ({BENCH_DIR})")
            logger.warning("bench %s not available, skipped", name)
            continue
        module.run(args.out, quick=args.quick)
        ran += 1
    if not ran:
        raise UsageError(f"no benchmarks found in {BENCH_DIR}")
    return 0
