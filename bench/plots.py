"""PNG plots of benchmark results (`ultramem bench`, DESIGN §7.1, §8): one PNG per result JSON.

Each benchmark's figures are ratios measured side by side in one run (remote vs local, cached vs
resident, pooled vs rows bytes); a plot puts those ratios next to each other with the target as a
dashed line, so a reader sees at a glance what was met. `render(json_path)` writes
`<stem>.png` beside the JSON (a benchmark that already drew its own, newer PNG, like serve, keeps
it); results of an unknown shape (or one its renderer does not recognise) get a bar chart of
every numeric field whose name holds "ratio".
Run as `python bench/plots.py DIR` to (re)draw every JSON in DIR.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

DPI = 90


def _bars(ax: Axes, labels: list[str], values: list[float], title: str, target: float | None = None,
          target_label: str = "target") -> None:
    bars = ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=7)
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"{target_label} {target:g}")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)


def _lookup(r: dict[str, Any], fig: plt.Figure) -> None:
    keys = [k for k in r["grpc"] if not k.startswith("breakdown")]
    ax1, ax2 = fig.subplots(1, 2)
    labels = [f"{k.split('/')[0]} x{k.split('/')[1]}" for k in keys]
    echo = [(label, r[key]) for label, key in (("echo, unary", "grpc_echo_unary_ratio_to_socket_bytes"),
                                               ("echo, streamed", "grpc_echo_ratio_to_socket_bytes")) if key in r]
    _bars(ax1, [e[0] for e in echo] + labels,
          [e[1] for e in echo] + [r["grpc"][k]["ratio_to_socket_bytes"] for k in keys],
          "bytes/s / raw TCP socket (gRPC alone, then Gather)", 0.4, "target fp32")
    _bars(ax2, labels, [r["grpc"][k]["ratio_to_numpy_rows"] for k in keys], "gRPC Gather rows/s / in-process numpy")


def _train(r: dict[str, Any], fig: plt.Figure) -> None:
    legs = r["legs"]
    local = legs["local"]["tokens_per_s"]
    _bars(fig.subplots(), list(legs), [v["tokens_per_s"] / local for v in legs.values()],
          f"training tokens/s / local (`{r.get('preset', '?')}` preset)", r.get("target_pooled_over_local"),
          "target pooled")


def _wire(r: dict[str, Any], fig: plt.Figure) -> None:
    ax = fig.subplots()
    tokens = sorted(r["regimes"], key=int)
    for key, label in (("ratio_lookup_bf16", "lookup, bf16 wire"), ("ratio_lookup_fp32", "lookup, fp32 wire"),
                       ("ratio_training_round", "lookup + backward, fp32")):
        ax.plot([int(t) for t in tokens], [r["regimes"][t][key] for t in tokens], marker="o", label=label)
    ax.axhline(r["target_pooled_over_rows"], color="tab:red", linestyle="--", linewidth=1,
               label=f"target (decode) {r['target_pooled_over_rows']:g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per lookup")
    ax.set_title("bytes per token: pooled mode / rows mode", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _beyond_ram(r: dict[str, Any], fig: plt.Figure) -> None:
    train = r.get("train", {})  # the training leg (absent from results before it existed)
    memory_path = "streams" in r  # absent from a --train-only run
    axes = list(fig.subplots(1, (1 if train else 0) + (3 if memory_path else 1), squeeze=False)[0])
    if train:
        ax0 = axes[0]
        _bars(ax0, list(train), [v["cached_over_resident"] for v in train.values()],
              f"training tokens/s: table {r['oversubscription']}x RAM budget / resident", 0.5, "target (skewed)")
        for i, v in enumerate(train.values()):  # the access skew that decides which target applies
            kind = v.get("target_kind", "skewed" if v["skew"]["top25_rows_share"] >= 0.75 else "floor")
            ax0.annotate(f"top 25%: {100 * v['skew']['top25_rows_share']:.0f}%\n{kind} target", (i, 0),
                         xytext=(0, 4), textcoords="offset points", ha="center", fontsize=7, color="white")
    legs = {**r.get("streams", {}), **{f"{k} x{r['large_table']['rows'] // r['table']['rows']} rows": v
                                       for k, v in r.get("large_streams", {}).items()}}
    floors = {**{f"train {k}": v for k, v in train.items()}, **legs}
    if not memory_path:
        _bars(axes[-1], list(floors), [v["cached_over_floor_time"] or 0.0 for v in floors.values()],
              "cached step time / (resident step + disk time)", 2.0, "target (elsewhere)")
        return
    ax1, ax2, ax3 = axes[-3:]
    streams = list(legs)
    _bars(ax1, streams, [legs[s]["cached_over_resident"] for s in streams],
          "memory path only (no dense compute): steps/s / resident", 0.5, "target (skewed)")
    _bars(ax2, list(floors), [v["cached_over_floor_time"] or 0.0 for v in floors.values()],
          "cached step time / disk floor (train: + resident step)", 2.0, "target (elsewhere)")
    shards = list(r["shards"])
    _bars(ax3, shards, [r["shards"][s]["rows_per_s_over_1_cached_shard"] for s in shards],
          "gRPC rows/s / 1 cached shard")


def _serve(r: dict[str, Any], fig: plt.Figure) -> None:
    configs = r["configs"]
    ax1, ax2, ax3 = fig.subplots(1, 3)
    color = {}
    for name, entry in configs.items():
        bs = sorted(entry["batches"], key=int)
        (line,) = ax1.plot([int(b) for b in bs], [entry["batches"][b]["p50_ms"] for b in bs], marker="o", label=name)
        color[name] = line.get_color()
        ax3.plot([int(b) for b in bs], [entry["batches"][b]["tokens_per_s"] for b in bs], marker="o", label=name,
                 color=color[name])
    # the ratios are medians of per-round ratios (legs measured side by side), not ratios of medians
    for name, per_batch in r["ratios"].items():
        if name.startswith("p50 "):
            bs = sorted(per_batch, key=int)
            ax2.plot([int(b) for b in bs], [per_batch[b] for b in bs], marker="o", label=name[4:],
                     color=color.get(name[4:].split(" / ")[0]))
    ax2.axhline(1.2, color="tab:red", linestyle="--", linewidth=1, label="target 2^24 <= 1.2")
    for ax, title in ((ax1, "p50 decode step (ms)"), (ax2, "p50 / remote-2^16 (median of rounds)"),
                      (ax3, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)


def _memory_path(r: dict[str, Any], fig: plt.Figure) -> None:
    """Shard CPU / floor per call type and layer (log scale; each against the floor of its own work:
    PooledGather the lookup, PooledBackward a backward, the optimizer step lazy AdamW by torch ops,
    Gather a gather of its rows), and memory-path tokens/s per shard count."""
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    sections = [r, *([r["v2"]] if "v2" in r else [])]
    calls = ("pooled_gather", "pooled_backward", "optimizer_step", "gather")
    layers = [(name, sec) for sec in sections for name in sec["ratio_to_floor"]]
    width = 0.8 / len(layers)
    for i, (name, sec) in enumerate(layers):
        ratios = dict(sec["ratio_to_floor"][name])
        for call, work in (("pooled_backward", "backward"), ("optimizer_step", "optimizer")):
            if f"{call}_ratio_to_{work}_floor" in sec:  # against the floor of its own work, where measured
                ratios[call] = sec[f"{call}_ratio_to_{work}_floor"][name]
        bars = ax1.bar([c + (i - (len(layers) - 1) / 2) * width for c in range(len(calls))],
                       [ratios[c] for c in calls], width, label=name)
        ax1.bar_label(bars, [f"{ratios[c]:.2g}" for c in calls], fontsize=6)
    ax1.set_yscale("log")
    labels = ["PooledGather", "PooledBackward\n(its floor: a backward)", "optimizer step\n(its floor: AdamW)",
              "Gather\n(its floor: a gather)"]
    ax1.set_xticks(range(len(calls)), labels, fontsize=8)
    for level, style, label in ((3.0, "--", "target 3x"), (1.5, ":", "aim 1.5x")):
        ax1.axhline(level, color="tab:red", linestyle=style, linewidth=1, label=label)
    ax1.set_title("shard CPU per selection / the floor (1 shard, most tokens a step)", fontsize=9)
    ax1.legend(fontsize=7, ncol=2)
    ax1.grid(True, axis="y", alpha=0.3)
    for sec in sections:
        for name, cells in sec["tokens_per_s"].items():
            big = max(int(k.split("/")[1].split()[0]) for k in cells)
            points = sorted((int(k.split()[0]), v) for k, v in cells.items() if k.endswith(f"/{big} tokens"))
            ax2.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{name}, {big} tokens a step")
    ax2.set_yscale("log")
    ax2.set_xticks(sorted({int(k.split()[0]) for sec in sections for cells in sec["tokens_per_s"].values()
                           for k in cells}))
    ax2.set_xlabel("shard processes")
    ax2.set_title("memory-path tokens/s (lookup + backward + update)", fontsize=9)
    ax2.legend(fontsize=7)
    ax2.grid(True, alpha=0.3)


def _ratio_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _ratio_leaves(v, f"{prefix}{k}/")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and "ratio" in prefix:
        yield prefix.rstrip("/"), float(obj)


def _generic(r: dict[str, Any], fig: plt.Figure) -> None:
    leaves = list(_ratio_leaves(r))[:30]
    if not leaves:
        raise ValueError("no numeric field whose name holds 'ratio'")
    _bars(fig.subplots(), [k[-40:] for k, _ in leaves], [v for _, v in leaves], "ratios")


RENDERERS: dict[str, tuple[Callable[[dict[str, Any], plt.Figure], None], tuple[float, float]]] = {
    "lookup": (_lookup, (10, 3.8)), "train": (_train, (6, 3.8)), "wire": (_wire, (6.5, 4)),
    "beyond_ram": (_beyond_ram, (17, 4.2)), "serve": (_serve, (14, 3.8)), "memory_path": (_memory_path, (14, 4.2)),
}


def render(json_path: str | Path) -> Path | None:
    """Draw `<stem>.png` beside a result JSON; returns its path (None if a newer PNG is kept).

    Raises: FileNotFoundError for a missing JSON, ValueError for one that holds nothing to plot.
    """
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    png = json_path.with_suffix(".png")
    if png.exists() and png.stat().st_mtime >= json_path.stat().st_mtime and json_path.stem == "serve":
        return None  # serve draws its own latency plot after writing its JSON
    draw, size = RENDERERS.get(json_path.stem, (_generic, (8, 4)))
    fig = plt.figure(figsize=size)
    try:
        try:
            draw(results, fig)
        except (KeyError, TypeError):  # an older or foreign layout of this result: plot its ratio fields
            fig.clf()
            fig.set_size_inches(8, 4)
            _generic(results, fig)
        fig.suptitle(f"ultramem bench {json_path.stem.replace('_', '-')}: ratios measured side by side", fontsize=10)
        fig.tight_layout()
        fig.savefig(png, dpi=DPI)
    finally:
        plt.close(fig)
    return png


def render_all(out_dir: str | Path) -> list[Path]:
    """render() every *.json in out_dir; returns the PNGs written."""
    return [p for p in (render(j) for j in sorted(Path(out_dir).glob("*.json"))) if p is not None]


if __name__ == "__main__":
    for path in render_all(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"):
        print(f"wrote {path}")
