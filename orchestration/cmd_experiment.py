"""`ultramem experiment quality` (DESIGN §3.2, issue 9): every variant at equal compute, several seeds.

Steps: read the experiment TOML (`--config`, default the `quality` preset; `--quick` the tiny
`quality_quick` one, first seed only), plan the compute-matched variants (orchestration/experiment.py),
write `<out>/experiment.json`, train each (variant, seed) not finished yet under one progress bar
(finished runs are read back from their result.json, so an interrupted experiment resumes where it
stopped: rerun the same command), then write the summary table and plots (cmd_report.write_report).
Runs in the background with `nohup ultramem experiment quality > log 2>&1 &`.

A `[sweep]` table in the TOML (or `--sweep axis=v1,v2`, repeatable) makes it a grid of such
experiments, one per point in `<out>/<point>/` (e.g. `<out>/num_keys-64/`), listed in
`<out>/sweep.json`; the runs go seed-major across the points, so an interrupted sweep has every
point at the first seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

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


def _plan(exp: Any, out: Path) -> list[Any]:
    """Compute-matched variants of one experiment; writes `<out>/experiment.json`."""
    from orchestration import experiment as ex
    from orchestration.config import to_dict

    out.mkdir(parents=True, exist_ok=True)
    variants = ex.plan_variants(exp)
    plan = {"experiment": {**to_dict(exp), "steps": exp.steps()},
            "variants": [{"name": v.name, "flops_per_token": v.flops, "params": v.params,
                          "model": to_dict(v.model)} for v in variants]}
    (out / "experiment.json").write_text(json.dumps(plan, indent=1))
    return variants


def quality(args: argparse.Namespace) -> int:
    """Train every variant x seed (x sweep point) to the same token budget; print and save the table."""
    import dataclasses

    from model_workers.data import DataError
    from orchestration import experiment as ex
    from orchestration.cmd_report import format_sweep, format_table, write_report

    exp = ex.load_experiment(args.config, quick=args.quick)
    seeds = _seeds(args.seeds)
    sweep = ex.parse_sweep(args.sweep) if args.sweep else exp.sweep
    exp = dataclasses.replace(exp, seeds=seeds[:1] if args.quick else seeds, sweep=sweep)
    out = Path(args.out or ("runs/quality-quick" if args.quick else "runs/quality"))
    points = ex.sweep_points(exp)
    if points:
        planned = [(out / name, sub, _plan(sub, out / name)) for name, _, sub in points]
        (out / ex.SWEEP).write_text(json.dumps(
            {"axes": [[name, list(values)] for name, values in exp.sweep],
             "points": [{"name": name, "values": point} for name, point, _ in points]}, indent=1))
    else:
        planned = [(out, exp, _plan(exp, out))]

    # seed-major: a partial run covers every variant (and every sweep point) at the first seeds
    jobs = [(where, sub, v, s) for s in exp.seeds for where, sub, variants in planned for v in variants]
    finished = sum(ex.read_result(ex.run_dir(where, v.name, s)) is not None for where, _, v, s in jobs)
    t0 = time.time()
    bar = tqdm(total=len(jobs), initial=finished, unit="run", dynamic_ncols=True, desc="quality")
    try:
        for where, sub, v, s in jobs:
            tag = f"{where.name} " if points else ""
            bar.set_postfix_str(f"{tag}{v.name} seed {s}")
            was_done = ex.read_result(ex.run_dir(where, v.name, s)) is not None
            try:
                r = ex.run_one(sub, v, s, where)
            except DataError as err:
                raise UsageError(str(err)) from None
            if not was_done:
                bar.update(1)
                bar.write(f"{tag}{v.name:>13} seed {s}: val loss {r['val_loss']:.4f}, {r['val_bpb']:.4f} "
                          f"bits/byte, {r['wall_s']:.0f} s")
    finally:
        bar.close()
    rows = write_report(out)
    print(format_sweep(rows) if points else format_table(rows))
    print(f"wall time {time.time() - t0:.0f} s this call; results in {out}")
    return 0
