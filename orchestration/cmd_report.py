"""`ultramem report RUN_DIR`: PNG plots and a summary table (DESIGN §7.1).

RUN_DIR is either a quality experiment (`experiment.json` + `<variant>/seed-<s>/result.json`,
see orchestration/experiment.py) or a single training run (`metrics.jsonl`). Experiment: writes
`summary.json`, `summary.md` (the table: val loss / bits per byte mean ± std over seeds, FLOPs and
parameters, memory diagnostics), `val_curves.png` and `memory.png` (coverage, KL to uniform, top-1
score over training). A sweep (`sweep.json` + one experiment directory per point): each point's
report, then `sweep.md` / `sweep.json` (a row per point and variant: val loss, the paired difference
to dense on the same seeds, sparse and dense parameters, FLOPs) and `sweep.png` (val loss, and its
difference to dense, against the variant's sparse parameters). Single run: `curves.png` (train and
validation loss) and a printed summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestration.errors import UsageError


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _layer_mean(memory: dict[str, float], key: str) -> float:
    """Mean of "mem{k}/<key>" over the memory layers (nan when there is none)."""
    vals = [v for k, v in memory.items() if k.startswith("mem") and k.endswith("/" + key)]
    return sum(vals) / len(vals) if vals else float("nan")


def _color(name: str) -> Any:
    """One colour per variant, the same in every plot."""
    from orchestration.experiment import VARIANTS

    if name not in VARIANTS:
        return "k"
    from matplotlib import colormaps

    i = VARIANTS.index(name) % 20  # the dark tab20 colours first, then the light ones (11 variants)
    return colormaps["tab20"](2 * i if i < 10 else 2 * (i - 10) + 1)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `experiment.summarize` rows."""
    head = ("| variant | val loss (mean ± std) | bits/byte | seeds | MFLOPs/token | params total | "
            "params active | coverage | KL unif | top-1 (mean) | dead rows |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in rows:
        p = r["params"]
        lines.append(
            f"| {r['variant']} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | {r['val_bpb']:.4f} ± "
            f"{r['val_bpb_std']:.4f} | {len(r['seeds'])} | {r['flops_per_token'] / 1e6:.3f} | "
            f"{p['total'] / 1e6:.3f}M | "
            f"{p['active'] / 1e6:.3f}M | {_fmt(r.get('coverage'), '.3f')} | {_fmt(r.get('kl_uniform'), '.2f')} | "
            f"{_fmt(r.get('top1_mean'), '.3f')} | {_fmt(r.get('dead_rows'), '.3f')} |")
    return "\n".join(lines)


def _load_experiment(out: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    from orchestration import experiment as ex
    from orchestration.config import from_dict

    plan = json.loads((out / "experiment.json").read_text())
    from model_workers.model import ModelConfig

    variants = [ex.Variant(v["name"], from_dict(ModelConfig, v["model"]), v["flops_per_token"], v["params"])
                for v in plan["variants"]]
    results = []
    for v in variants:
        for d in sorted((out / v.name).glob("seed-*")):
            r = ex.read_result(d)
            if r is not None:
                results.append(r)
    return variants, results


def write_report(out: str | Path) -> list[dict[str, Any]]:
    """Summary table + plots of an experiment (or sweep) directory; returns the summary (or sweep) rows."""
    from orchestration import experiment as ex

    out = Path(out)
    if (out / ex.SWEEP).is_file():
        return write_sweep_report(out)
    variants, results = _load_experiment(out)
    rows = ex.summarize(results, variants)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text(format_table(rows) + "\n")
    if results:
        plot_curves(results, out / "val_curves.png")
        plot_memory(results, out / "memory.png")
    return rows


def write_sweep_report(out: Path) -> list[dict[str, Any]]:
    """Every point's report, then `sweep.json`, `sweep.md` and `sweep.png`; returns the sweep rows.

    Row: point, values ({axis: value}), variant, seeds, val_loss (± std), delta_dense (± std: val loss
    minus dense's on the same seed, averaged over shared seeds), params, flops_per_token, wall_s.
    """
    from orchestration import experiment as ex

    sweep = json.loads((out / ex.SWEEP).read_text())
    rows = []
    for point in sweep["points"]:
        where = out / point["name"]
        if not (where / "experiment.json").is_file():
            continue  # not planned yet
        variants, results = _load_experiment(where)
        for r in ex.summarize(results, variants):
            if r["variant"] == "dense":
                r = {**r, "delta_dense": 0.0, "delta_dense_std": 0.0}
            else:
                delta, std, n = ex.paired_delta(results, r["variant"])
                r = {**r, "delta_dense": delta if n else None, "delta_dense_std": std if n else None}
            rows.append({"point": point["name"], "values": point["values"], **r})
        write_report(where)
    (out / "sweep_summary.json").write_text(json.dumps(rows, indent=1))
    (out / "sweep.md").write_text(format_sweep(rows) + "\n")
    if rows:
        plot_sweep(rows, out / "sweep.png", by_tokens=not any(a == "num_keys" for a, _ in sweep["axes"]))
    return rows


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `write_sweep_report` rows (one per point and variant)."""
    head = ("| point | variant | seeds | val loss (mean ± std) | − dense (paired) | sparse params | dense params | "
            "sparse/dense | MFLOPs/token | wall s |")
    lines = [head, "|" + "|".join(["---"] * 10) + "|"]
    for r in rows:
        p = r["params"]
        delta = ("-" if r["variant"] == "dense" or r.get("delta_dense") is None
                 else f"{r['delta_dense']:+.4f} ± {r['delta_dense_std']:.4f}")
        lines.append(
            f"| {r['point']} | {r['variant']} | {len(r['seeds'])} | {r['val_loss']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{delta} | {p['sparse'] / 1e6:.3f}M | {p['dense'] / 1e6:.3f}M | {p['sparse'] / p['dense']:.2f} | "
            f"{r['flops_per_token'] / 1e6:.3f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict[str, Any]], path: Path, *, by_tokens: bool = False) -> None:
    """Val loss (left) and val loss − dense (right, paired by seed) per variant across the sweep points.

    x = the variant's own sparse (value-table) parameters; a variant without a memory (dense, MoE) is
    drawn at the x of UltraMem at the same point (it is compute-matched to that UltraMem). A
    tokens-only sweep uses training tokens as x.
    """
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))

    def x_of(r: dict[str, Any]) -> float:
        if by_tokens:
            return r["values"].get("tokens", 0) / 1e6
        if r["params"]["sparse"]:
            return r["params"]["sparse"]
        same = [o["params"]["sparse"] for o in rows if o["point"] == r["point"] and o["variant"] == "ultramem"]
        return same[0] if same else max(o["params"]["sparse"] for o in rows if o["point"] == r["point"]) or 1

    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == name), key=x_of)
        x = [x_of(r) for r in rs]
        style = {"color": _color(name), "marker": "o", "capsize": 3, "label": name,
                 "ls": "--" if not rs[0]["params"]["sparse"] else "-"}
        left.errorbar(x, [r["val_loss"] for r in rs], yerr=[r["val_loss_std"] for r in rs], **style)
        if name != "dense" and all(r.get("delta_dense") is not None for r in rs):
            right.errorbar(x, [r["delta_dense"] for r in rs], yerr=[r["delta_dense_std"] for r in rs], **style)
    right.axhline(0, color="k", lw=1)
    for ax in (left, right):
        if not by_tokens:
            ax.set_xscale("log")
        ax.set_xlabel("training tokens (M)" if by_tokens else "sparse (value-table) parameters of the variant")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylabel("validation loss (nats/token)")
    left.set_title("Val loss at equal compute (mean ± std; dense at UltraMem's x)")
    right.set_ylabel("val loss − dense, same seed (below 0: beats dense)")
    right.set_title("Difference to the compute-matched dense model (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Validation loss vs tokens, one line per variant (mean over seeds, band = min..max)."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    names = list(dict.fromkeys(r["variant"] for r in results))
    for name in names:
        rs = [r for r in results if r["variant"] == name and r["curve"]]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        tok_per_step = rs[0]["tokens"] / max(rs[0]["steps"], 1)
        x = np.array([c["step"] for c in rs[0]["curve"][:n]]) * tok_per_step / 1e6
        y = np.array([[c["val_loss"] for c in r["curve"][:n]] for r in rs])
        line, = ax.plot(x, y.mean(0), label=name, color=_color(name),
                        lw=2 if name in ("ultramem", "dense", "pkm", "moe") else 1)
        ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss at equal compute (mean over seeds, band = min..max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lo = min(c["val_loss"] for r in results for c in r["curve"][len(r["curve"]) // 3:]) if results else 0
    hi = max(c["val_loss"] for r in results for c in r["curve"][len(r["curve"]) // 3:]) if results else 1
    ax.set_ylim(lo - 0.05, hi + 0.1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(results: list[dict[str, Any]], path: Path) -> None:
    """Coverage, KL to uniform and mean top-1 score over training per memory variant (seed mean)."""
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = (("coverage", "slot coverage (per eval window)"), ("kl_uniform", "KL(hits || uniform)"),
            ("top1_score", "mean top-1 score"))
    names = list(dict.fromkeys(r["variant"] for r in results))
    for name in names:
        rs = [r for r in results if r["variant"] == name and r["curve"] and r["curve"][0]["memory"]]
        rs = [r for r in rs if any(k.startswith("mem") for k in r["curve"][0]["memory"])]
        if not rs:
            continue
        n = min(len(r["curve"]) for r in rs)
        x = [c["step"] for c in rs[0]["curve"][:n]]
        for ax, (key, title) in zip(axes, keys):
            y = [[_layer_mean(c["memory"], key) for c in r["curve"][:n]] for r in rs]
            ax.plot(x, np.nanmean(np.array(y, dtype=float), 0), label=name, color=_color(name))
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _single_run(run: Path) -> int:
    plt = _plt()
    train, evals = [], []
    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            (evals if r.get("kind") == "eval" else train).append(r)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=110)
    plt.close(fig)
    print("| step | val loss | bits/byte | " + " | ".join(sorted(evals[-1]["memory"]) if evals else []) + " |")
    for r in evals:
        mem = " | ".join(f"{r['memory'][k]:.3f}" for k in sorted(r["memory"]))
        print(f"| {r['step']} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {mem} |")
    print(f"plot: {run / 'curves.png'}")
    return 0


def report(args: argparse.Namespace) -> int:
    """PNG plots + a summary table for an experiment directory or a training run directory."""
    run = Path(args.run_dir)
    if (run / "sweep.json").is_file():
        rows = write_report(run)
        print(format_sweep(rows))
        print(f"plot: {run / 'sweep.png'}; per point: {run}/<point>/summary.md")
        return 0
    if (run / "experiment.json").is_file():
        rows = write_report(run)
        print(format_table(rows))
        print(f"plots: {run / 'val_curves.png'}, {run / 'memory.png'}")
        return 0
    if (run / "metrics.jsonl").is_file():
        return _single_run(run)
    raise UsageError(f"{run} holds neither experiment.json nor metrics.jsonl")
