"""Capacity planning: bytes per shard and per node before anything is allocated (DESIGN §4.1, §5, §8).

`plan_capacity` takes the memory tables of a run (`memory_table_specs`, the same specs `ultramem
train` creates), a shard count and the nodes' RAM, and returns a `CapacityPlan`: for the busiest
shard (round-robin partition map, DESIGN §4.1: shard 0 owns ceil(NP / S) partitions of each table)
the bytes of values, optimizer state, chunk cache and process overheads, and for the busiest node
its shards plus Ray's own baseline. The byte math uses storage.layout only (`table_arrays`: dtypes,
trailing shapes and chunk shapes), so the plan and the store cannot disagree. Partitions are counted
whole, padding rows included, because a shard allocates [n_owned * R, d_v].

Data on a shard (DESIGN §5): partitions are resident when they fit the shard's data budget
(`cache_bytes`); otherwise the shard serves them through a chunk cache of that size and the table
stays on disk. Without a budget every shard is resident.

Overheads are the figures measured in DESIGN §8 on our machine: idle Ray ~420-480 MB per node, +60 MB
per actor (shards never import torch), gRPC buffers ~2 x the max message size per shard; the
coordinator is one more actor on the head node and the object store counts at its configured cap.
Model workers are not counted (they usually live on GPU nodes; see the note in the report).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from storage.layout import VALUES, TableSpec, table_arrays

MiB = 1 << 20
GiB = 1 << 30
RAY_NODE_BYTES = 450 * MiB  # DESIGN §8: idle Ray ~420-480 MB PSS per node
ACTOR_BYTES = 77 * MiB  # DESIGN §8: +60 MB per actor (shard actors never import torch), +17 MB TensorStore
GRPC_BUFFERS = 2  # DESIGN §8: a request and a response of up to max message size in flight
_WORKERS_NOTE = ("model workers are not counted (each is an actor, +250 MB once it imports torch, "
                 "plus the dense model and its optimizer)")


@dataclass(frozen=True)
class TablePlan:
    """One table's share of the busiest shard."""

    name: str
    rows: int  # P
    dim: int  # d_v
    dtype: str
    optimizer: str
    num_partitions: int  # NP
    rows_per_partition: int  # R (padding included)
    partitions_per_shard: int  # owned by the busiest shard: ceil(NP / S)
    value_bytes: int  # values of those partitions
    state_bytes: int  # optimizer state of those partitions
    table_bytes: int  # the whole table (values + state) on disk, uncompressed
    largest_chunk_bytes: int  # the smallest chunk cache that can serve this table


@dataclass(frozen=True)
class ShardPlan:
    """RAM of the busiest shard process."""

    partitions: int  # partitions owned, all tables together
    mode: str  # "resident" (partitions in RAM) or "cached" (chunk cache over the Zarr store)
    value_bytes: int  # resident values (0 when cached)
    state_bytes: int  # resident optimizer state (0 when cached)
    cache_bytes: int  # chunk cache budget (0 when resident)
    data_on_disk_bytes: int  # what the cache serves from disk (0 when resident)
    process_bytes: int  # the actor process itself (Python, numpy, gRPC)
    grpc_bytes: int  # send/receive buffers
    total_bytes: int


@dataclass(frozen=True)
class NodePlan:
    """RAM of the busiest node (the head: it also runs the coordinator)."""

    shards: int  # shards on it: ceil(S / nodes)
    ray_bytes: int  # Ray's idle processes (GCS, raylet, workers pool)
    object_store_bytes: int  # Ray object store cap
    coordinator_bytes: int  # the coordinator actor
    shard_bytes: int  # shards x ShardPlan.total_bytes
    total_bytes: int
    ram_bytes: int  # RAM of one node
    fits: bool


@dataclass(frozen=True)
class CapacityPlan:
    """What a layout needs, whether it fits, and what would fit when it does not."""

    shards: int
    nodes: int
    tables: tuple[TablePlan, ...]
    shard: ShardPlan
    node: NodePlan
    max_message_bytes: int
    suggestions: tuple[str, ...] = ()  # empty when the layout fits
    suggested_shards: int | None = None  # fewest shards (one per node) that fit, if any
    suggested_nodes: int | None = None  # ... on this many nodes
    suggested_cache_bytes: int | None = None  # or a chunk cache per shard that fits the given nodes
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole plan."""
        return asdict(self)


def memory_table_specs(model_cfg: Any) -> list[TableSpec]:
    """The value tables `ultramem train` creates for `model_cfg` (a ModelConfig), allocating nothing.

    The model is built on torch's meta device (dense weights get no storage) and without a value
    backend (`LanguageModel.set_backend` is what allocates tables), then asked for
    `memory_tables()`, so the specs are exactly the trainer's, even for a model far larger than RAM.
    """
    import torch

    from model_workers.model import LanguageModel

    class _Skeleton(LanguageModel):
        def set_backend(self, backend: Any) -> None:  # planning only: no tables, no LocalBackend
            del backend

    with torch.device("meta"):
        return _Skeleton(model_cfg, backend=_NO_BACKEND).memory_tables()


_NO_BACKEND = object()  # any non-None backend keeps LanguageModel from building a LocalBackend


def table_plan(spec: TableSpec, shards: int) -> TablePlan:
    """Bytes of `spec` on the busiest of `shards` shards (round-robin partitions, padding rows in)."""
    layouts = table_arrays(spec)
    R = spec.rows_per_partition
    per_row = {name: math.prod(a.trailing) * a.dtype.itemsize for name, a in layouts.items()}
    owned = -(-spec.num_partitions // shards)
    chunk = max(
        math.prod(a.chunks(spec)) * a.storage_dtype.itemsize for a in layouts.values()
    )
    return TablePlan(
        name=spec.name, rows=spec.rows, dim=spec.dim, dtype=spec.dtype, optimizer=spec.optimizer,
        num_partitions=spec.num_partitions, rows_per_partition=R, partitions_per_shard=owned,
        value_bytes=owned * R * per_row[VALUES],
        state_bytes=owned * R * sum(b for name, b in per_row.items() if name != VALUES),
        table_bytes=spec.num_partitions * R * sum(per_row.values()),
        largest_chunk_bytes=chunk,
    )


def _shard_plan(tables: Sequence[TablePlan], cache_bytes: int | None, max_message_bytes: int) -> ShardPlan:
    values = sum(t.value_bytes for t in tables)
    state = sum(t.state_bytes for t in tables)
    cached = cache_bytes is not None and values + state > cache_bytes
    data = cache_bytes if cached else values + state
    grpc_bytes = GRPC_BUFFERS * max_message_bytes
    return ShardPlan(
        partitions=sum(t.partitions_per_shard for t in tables),
        mode="cached" if cached else "resident",
        value_bytes=0 if cached else values,
        state_bytes=0 if cached else state,
        cache_bytes=cache_bytes if cached else 0,  # type: ignore[arg-type]
        data_on_disk_bytes=values + state if cached else 0,
        process_bytes=ACTOR_BYTES,
        grpc_bytes=grpc_bytes,
        total_bytes=data + ACTOR_BYTES + grpc_bytes,  # type: ignore[operator]
    )


def _node_plan(shard: ShardPlan, shards: int, nodes: int, node_ram_bytes: int, object_store_bytes: int) -> NodePlan:
    on_head = -(-shards // nodes)
    fixed = RAY_NODE_BYTES + object_store_bytes + ACTOR_BYTES
    total = fixed + on_head * shard.total_bytes
    return NodePlan(
        shards=on_head, ray_bytes=RAY_NODE_BYTES, object_store_bytes=object_store_bytes,
        coordinator_bytes=ACTOR_BYTES, shard_bytes=on_head * shard.total_bytes, total_bytes=total,
        ram_bytes=node_ram_bytes, fits=total <= node_ram_bytes,
    )


def plan_capacity(
    specs: Sequence[TableSpec],
    shards: int,
    *,
    node_ram_bytes: int,
    nodes: int = 1,
    cache_bytes: int | None = None,
    max_message_bytes: int = 64 * MiB,
    object_store_bytes: int = 256 * MiB,
) -> CapacityPlan:
    """Plan S shards over `nodes` nodes of `node_ram_bytes` each.

    Args:
        specs: the memory tables (all share the shards; each is partitioned round robin).
        shards: S >= 1, at most the smallest table's NP (a shard must own a partition).
        node_ram_bytes: RAM of one node.
        nodes: nodes the shards are spread over (the head also runs Ray's GCS and the coordinator).
        cache_bytes: a shard's data budget; partitions larger than it are served through a chunk
            cache of this size (DESIGN §5). None: always resident.
        max_message_bytes: the gRPC message limit of the shards' servers.
        object_store_bytes: the Ray object store cap on a node.

    Returns: the plan; when it does not fit, `suggestions` says how many shards (one per node),
        how much RAM per node, or which chunk cache budget would.
    Raises: ValueError for a count or size out of range (the CLI turns it into a usage error).
    """
    if shards < 1 or nodes < 1:
        raise ValueError(f"shards and nodes must be >= 1, got shards={shards}, nodes={nodes}")
    if node_ram_bytes <= 0:
        raise ValueError(f"node RAM must be > 0, got {node_ram_bytes} bytes")
    max_shards = min((s.num_partitions for s in specs), default=shards)
    if shards > max_shards:
        raise ValueError(f"{shards} shards but the smallest table has only {max_shards} partitions "
                         "(model.memory.num_partitions): a shard must own at least one")
    tables = tuple(table_plan(s, shards) for s in specs)
    min_cache = sum(t.largest_chunk_bytes for t in tables)
    if cache_bytes is not None and specs and cache_bytes < min_cache:
        raise ValueError(f"a chunk cache of {_human(cache_bytes)} per shard cannot hold one chunk of "
                         f"each table's largest array ({_human(min_cache)})")
    shard = _shard_plan(tables, cache_bytes, max_message_bytes)
    node = _node_plan(shard, shards, nodes, node_ram_bytes, object_store_bytes)
    notes = (_WORKERS_NOTE,)
    if node.fits:
        return CapacityPlan(shards, nodes, tables, shard, node, max_message_bytes, notes=notes)

    suggestions = [f"give each node at least {_human(node.total_bytes)} of RAM (it has {_human(node_ram_bytes)})"]
    more = _fewest_shards_that_fit(specs, shards, nodes, max_shards, node_ram_bytes, cache_bytes,
                                   max_message_bytes, object_store_bytes)
    if more is not None:
        suggestions.append(f"or spread the tables over {more} shards on {more} nodes of {_human(node_ram_bytes)} "
                           f"(--shards {more} --nodes {more})")
    fixed = RAY_NODE_BYTES + object_store_bytes + ACTOR_BYTES
    per_shard_room = (node_ram_bytes - fixed) // node.shards - ACTOR_BYTES - shard.grpc_bytes
    cache_fit = per_shard_room if specs and per_shard_room >= min_cache else None
    if cache_fit is not None:
        suggestions.append(f"or keep {shards} shards on {nodes} node(s) and serve the tables from disk "
                           f"through a chunk cache of {_human(cache_fit)} per shard "
                           f"(--cache-gb {math.floor(cache_fit / GiB * 100) / 100:g})")
    return CapacityPlan(shards, nodes, tables, shard, node, max_message_bytes, tuple(suggestions),
                        suggested_shards=more, suggested_nodes=more, suggested_cache_bytes=cache_fit,
                        notes=notes)


def _fewest_shards_that_fit(specs: Sequence[TableSpec], shards: int, nodes: int, max_shards: int,
                            node_ram_bytes: int, cache_bytes: int | None, max_message_bytes: int,
                            object_store_bytes: int) -> int | None:
    """Fewest S' >= max(S, nodes) shards, one per node, whose busiest node fits; None if none up to NP."""
    for s in range(max(shards, nodes), max_shards + 1):
        tables = [table_plan(spec, s) for spec in specs]
        shard = _shard_plan(tables, cache_bytes, max_message_bytes)
        if _node_plan(shard, s, s, node_ram_bytes, object_store_bytes).fits:
            return s
    return None


# --- text ----------------------------------------------------------------------------------------


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def cell(i: int, c: str, w: int) -> str:
        return c.rjust(w) if i in right else c.ljust(w)

    return ["  " + "  ".join(cell(i, c, w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def format_plan(plan: CapacityPlan, title: str = "") -> str:
    """The plan as aligned plain text (what `ultramem plan` prints)."""
    s, n = plan.shard, plan.node
    lines = [title] if title else []
    lines.append(f"{plan.shards} shard(s) on {plan.nodes} node(s) of {_human(n.ram_bytes)} RAM; "
                 f"gRPC max message {_human(plan.max_message_bytes)}")
    lines.append("")
    if plan.tables:
        head = ["memory table", "rows", "d_v", "dtype", "optimizer", "partitions", "on busiest shard",
                "values", "optimizer state", "whole table"]
        body = [[t.name, f"{t.rows:,}", str(t.dim), t.dtype, t.optimizer, str(t.num_partitions),
                 str(t.partitions_per_shard), _human(t.value_bytes), _human(t.state_bytes), _human(t.table_bytes)]
                for t in plan.tables]
        lines += _columns([head, *body], right={1, 2, 5, 6, 7, 8, 9})
    else:
        lines.append("  no memory tables (model.ffn_kind is dense or moe): shards hold nothing")
    lines.append("")
    mode = ("partitions resident in RAM" if s.mode == "resident" else
            f"partitions on disk ({_human(s.data_on_disk_bytes)}), served through the chunk cache")
    lines.append(f"per shard (the busiest: {s.partitions} partitions, {mode})")
    lines += _columns([
        ["values", _human(s.value_bytes), ""],
        ["optimizer state", _human(s.state_bytes), ""],
        ["chunk cache", _human(s.cache_bytes), ""],
        ["process", _human(s.process_bytes), "Python + numpy + gRPC + TensorStore actor (DESIGN §8: +60 MB, +17 MB)"],
        ["gRPC buffers", _human(s.grpc_bytes), f"{GRPC_BUFFERS} x max message size"],
        ["total", _human(s.total_bytes), ""],
    ], right={1})
    lines.append("")
    lines.append(f"per node (the busiest: the head, {n.shards} shard(s))")
    share = f"{100 * n.total_bytes / n.ram_bytes:.1f}% of {_human(n.ram_bytes)}"
    lines += _columns([
        ["Ray baseline", _human(n.ray_bytes), "GCS, raylet, idle workers (DESIGN §8: ~450 MB)"],
        ["Ray object store", _human(n.object_store_bytes), "configured cap"],
        ["coordinator", _human(n.coordinator_bytes), "one actor"],
        ["shards", _human(n.shard_bytes), f"{n.shards} x {_human(s.total_bytes)}"],
        ["total", _human(n.total_bytes), f"{share}: {'fits' if n.fits else 'DOES NOT FIT'}"],
    ], right={1})
    if plan.suggestions:
        lines.append("")
        lines.append(f"WARNING: this layout needs {_human(n.total_bytes)} on its busiest node, "
                     f"which has {_human(n.ram_bytes)}. To fit:")
        lines += [f"  - {x}" for x in plan.suggestions]
    lines += ["", *(f"note: {x}" for x in plan.notes)]
    return "\n".join(lines)


# --- throughput: shard cores a training rate needs (`ultramem plan --tokens-per-s`) ----------------

# Shipped defaults: `ultramem bench memory-path` (one shard process, 2048 tokens a step, AdamW) on a
# 2-core machine shared with other jobs (2026-12-07), the higher of two full runs per call; pass
# --rates bench/results/memory_path.json to use your own.
DEFAULT_RATES: dict[str, Any] = {
    "source": "defaults shipped with ultramem, measured on a 2-core machine (docs/benchmarks.md)",
    "layers": {
        "paper": {"d_v": 384, "cpu_s_per_m_selections": {"pooled_gather": 0.315, "pooled_backward": 0.299,
                                                           "optimizer_step": 0.138, "gather": 1.61}},
        "small": {"d_v": 128, "cpu_s_per_m_selections": {"pooled_gather": 0.280, "pooled_backward": 0.335,
                                                           "optimizer_step": 0.040, "gather": 0.636}},
    },
}
STEP_CALLS = ("pooled_gather", "pooled_backward", "optimizer_step")  # one training step of a memory layer


def load_rates(path: str | Path | None = None) -> dict[str, Any]:
    """Per-core shard rates: a `bench/results/memory_path.json` written by `ultramem bench memory-path`,
    or (path None) DEFAULT_RATES. Returns {"source", "layers": {name:
    {"d_v", "cpu_s_per_m_selections": {call: s}}}}. Raises ValueError for a file without them."""
    if path is None:
        return DEFAULT_RATES
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read memory-path rates from {p}: {err}") from None
    if "shard_cpu_s_per_m_selections" in raw:  # a bench result
        layers = {name: {"d_v": raw["layers"][name]["d_v"], "cpu_s_per_m_selections": calls}
                  for name, calls in raw["shard_cpu_s_per_m_selections"].items()}
        return {"source": f"measured by ultramem bench memory-path ({p}, {raw.get('cpus')} CPUs)", "layers": layers}
    raise ValueError(f"{p} holds no memory-path rates (shard_cpu_s_per_m_selections)")


def throughput_plan(specs: Sequence[TableSpec], selections_per_token: int, tokens_per_s: float,
                    rates: dict[str, Any]) -> dict[str, Any]:
    """Shard cores (= shard processes: their kernels run on one thread) that `tokens_per_s` training
    tokens/s need: each table is looked up, back-propagated and updated every step, at
    `selections_per_token` selections a token. The CPU per selection is that of the measured layer
    nearest in d_v, scaled by d_v (the work is row bytes)."""
    if not tokens_per_s > 0:
        raise ValueError(f"--tokens-per-s must be > 0, got {tokens_per_s:g}")
    tables, cores = [], 0.0
    for spec in specs:
        name, layer = min(rates["layers"].items(), key=lambda kv: abs(kv[1]["d_v"] - spec.dim))
        per_m = sum(layer["cpu_s_per_m_selections"][c] for c in STEP_CALLS) * spec.dim / layer["d_v"]
        need = tokens_per_s * selections_per_token * per_m / 1e6
        cores += need
        tables.append({"table": spec.name, "d_v": spec.dim, "rates_of": name,
                       "shard_cpu_s_per_m_selections": per_m, "cores": need})
    return {"tokens_per_s": tokens_per_s, "selections_per_token_per_table": selections_per_token,
            "shard_cores": cores, "shard_processes": max(1, math.ceil(cores)), "tables": tables,
            "rates_source": rates["source"]}
