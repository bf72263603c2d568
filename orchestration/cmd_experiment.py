"""`ultramem experiment quality` (DESIGN §3.2, issue 9): every variant at equal compute, several seeds.

Steps: read the experiment TOML (`--config`, default the `quality` preset; `--quick` the tiny
`quality_quick` one, first seed only), plan the compute-matched variants (orchestration/experiment.py),
write `<out>/experiment.json`, train each (variant, seed) not finished yet under one progress bar
(finished runs are read back from their result.json, so an interrupted experiment resumes where it
stopped: rerun the same command), then write the summary table and plots (cmd_report.write_report).
Runs in the background with `nohup ultramem experiment quality > log 2>&1 &`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from tqdm import tqdm

from orchestration.errors import UsageError

logger = logging.getLogger(__name__)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds expects comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UsageError(f"--seeds expects integers >= 0, got {text!r}")
    return seeds


def quality(args: argparse.Namespace) -> int:
    """Train every variant x seed to the same token budget; print and save the table."""
    import dataclasses

    from model_workers.data import DataError
    from orchestration import experiment as ex
    from orchestration.cmd_report import format_table, write_report
    from orchestration.config import to_dict

    exp = ex.load_experiment(args.config, quick=args.quick)
    seeds = _seeds(args.seeds)
    exp = dataclasses.replace(exp, seeds=seeds[:1] if args.quick else seeds)
    out = Path(args.out or ("runs/quality-quick" if args.quick else "runs/quality"))
    out.mkdir(parents=True, exist_ok=True)
    variants = ex.plan_variants(exp)
    plan = {"experiment": {**to_dict(exp), "steps": exp.steps()},
            "variants": [{"name": v.name, "flops_per_token": v.flops, "params": v.params,
                          "model": to_dict(v.model)} for v in variants]}
    (out / "experiment.json").write_text(json.dumps(plan, indent=1))

    jobs = [(v, s) for s in exp.seeds for v in variants]  # seed-major: a partial run covers every variant
    finished = sum(ex.read_result(ex.run_dir(out, v.name, s)) is not None for v, s in jobs)
    t0 = time.time()
    bar = tqdm(total=len(jobs), initial=finished, unit="run", dynamic_ncols=True, desc="quality")
    try:
        for v, s in jobs:
            bar.set_postfix_str(f"{v.name} seed {s}")
            was_done = ex.read_result(ex.run_dir(out, v.name, s)) is not None
            try:
                r = ex.run_one(exp, v, s, out)
            except DataError as err:
                raise UsageError(str(err)) from None
            if not was_done:
                bar.update(1)
                bar.write(f"{v.name:>13} seed {s}: val loss {r['val_loss']:.4f}, {r['val_bpb']:.4f} bits/byte, "
                          f"{r['wall_s']:.0f} s")
    finally:
        bar.close()
    rows = write_report(out)
    print(format_table(rows))
    print(f"wall time {time.time() - t0:.0f} s this call; results in {out}")
    return 0
