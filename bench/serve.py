"""Serving benchmark (`ultramem bench serve`, DESIGN §6): decode latency as the memory table grows.

One model (D 256, 4 blocks, one UltraMem layer read at block 1 and added after block 2, d_v 128,
bf16 values, top-16 of 2 heads, shared query) decoded by the inference engine at batch 1, 16 and
64, built exactly as `ultramem serve` builds it (`engine.serving_config`: pooled lookups):

  * remote-2^16 / 2^20 / 2^24  the table (P = K² physical rows, bf16) on 2 read-only shard processes
                               (`ultramem shard serve --read-only`), PooledGather, bf16 on the wire;
  * remote-2^20-1shard         the 2^20 table behind one shard process (no 2-shard fan-out; on 2
                               cores, one process fewer competing with the decoder);
  * local-2^20                 the same table in-process (LocalBackend): what the remote hop costs;
  * moe-local                  the same dense model with MoE FFNs (top-2) whose expert parameters
                               equal the 2^20 table's (P · d_v), in-process;
  * remote-v2-2^20             the same model with an UltraMemV2 memory layer (DESIGN §3.3;
                               MemoryConfig.ultramem_v2: beside block 1's FFN, placement 1:1, one
                               shared projector, pre-values P_tab [P, d_p = d_v // 3] scored on the
                               shards), both 2^20-row tables (bf16) on 2 read-only shard processes;
  * local-v2-2^20              that V2 model with both tables in-process (LocalBackend).

All legs are up at once and take turns: each round decodes every leg at every batch, the leg order
rotating, so a change in machine load hits every leg alike. Per leg and batch a round gives the p50
of its decode steps (engine step time, prefill steps excluded); the figures are medians over rounds,
and each ratio is the median of the per-round ratios. Targets: p50 at 2^24 within 1.2x of 2^16;
remote - local < 2 ms per token per memory layer at batch 1 (v1 and V2); UltraMem remote faster
than MoE at batch >= 16; V2's remote / local tokens/s is reported beside v1's. Tables are created
partition by partition (storage.create_table) in a temp dir and deleted afterwards; 2^24 (4 GiB of
bf16) runs only when RAM allows and not with --quick. Writes <out>/serve.json and <out>/serve.png
(bench/plots.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

# what libgomp will read when torch loads it (`ultramem bench serve` sets PASSIVE first, see
# orchestration/cli.py); torch already loaded (`bench all`) means this setting came too late
OMP_WAIT_POLICY = (os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE") if "torch" not in sys.modules
                   else f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} (torch was loaded before this bench)")
import torch  # noqa: E402 (after the OpenMP setting)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_workers.engine import Engine, EngineConfig, SamplingParams, StepStats, serving_config
from model_workers.model import LanguageModel, ModelConfig
from model_workers.moe import MoEConfig
from model_workers.remote import RemoteBackend
from model_workers.ultramem import MemoryConfig
from model_workers.values import LocalBackend
from orchestration.cmd_serve import start_local_shards
from param_server.client import Client
from storage.layout import TableSpec
from storage.table_store import create_table

logger = logging.getLogger(__name__)

BATCHES = (1, 16, 64)
D_MODEL, N_LAYERS, D_V = 256, 4, 128
SMALL, BIG, MID = "remote-2^16", "remote-2^24", "remote-2^20"
MID_ONE = "remote-2^20-1shard"  # the same table behind one shard process (the hop without a 2-shard fan-out)
V2_REMOTE, V2_LOCAL = "remote-v2-2^20", "local-v2-2^20"  # UltraMemV2's layer, remote and in-process


def model_config(log2_rows: int, kind: str = "ultramem") -> ModelConfig:
    """The benchmark model with a 2^log2_rows-row table (K = 2^(log2_rows/2) sub-keys per side), pooled.
    kind "ultramem_v2": the same model with one UltraMemV2 layer (shared projector, pre-values d_p = d_v // 3)."""
    fields = {"num_keys": 1 << (log2_rows // 2), "d_k": 64, "d_v": D_V, "heads": 2, "topk": 16, "expansion": 1,
              "value_dtype": "bfloat16", "value_optimizer": "sgd", "num_partitions": 256,
              "value_init": "fixed"}  # a spec without a model (table_spec); timing does not see σ
    mem = MemoryConfig(placement="1:2", **fields)
    base = ModelConfig(vocab_size=8192, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=4, max_seq_len=256,
                       ffn_kind="ultramem", memory=mem)
    if kind == "ultramem_v2":  # one layer (as v1's), beside block 1's FFN, so the hop compares per layer
        return serving_config(replace(base, ffn_kind="ultramem_v2",
                                      memory=MemoryConfig.ultramem_v2(placement="1:1", **fields)))
    if kind == "moe":  # expert parameters of all blocks = the 2^20 table's P * d_v
        experts = 16
        hidden = (1 << 20) * D_V // (3 * D_MODEL * experts * N_LAYERS)
        return replace(base, ffn_kind="moe", moe=MoEConfig(num_experts=experts, top_k=2,
                                                           expert_ffn_mult=hidden / D_MODEL))
    return serving_config(base)


def table_spec(cfg: ModelConfig) -> TableSpec:
    """The spec of the model's one table, as LanguageModel.memory_tables() makes it, without a model."""
    mem = cfg.memory
    return TableSpec(name="mem0.values", rows=mem.physical_rows, dim=D_V, dtype="bfloat16",
                     num_partitions=min(mem.num_partitions, mem.physical_rows), optimizer="sgd",
                     optimizer_args=(("weight_decay", 0.0),), init_std=mem.value_init_std(1, cfg.d_model),
                     seed=cfg.init_seed * 1_000_003 + 1)


def measure(model: LanguageModel, batch: int, steps: int) -> list[float]:
    """Decode `steps` tokens for `batch` sequences at once -> the decode steps' wall times (s)."""
    stats: list[StepStats] = []
    eng = Engine(model, EngineConfig(max_batch=max(BATCHES), batch_wait_ms=200), on_step=stats.append)
    gen = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, model.cfg.vocab_size, (16,), generator=gen).tolist() for _ in range(batch)]
    eng.start()
    try:
        reqs = [eng.submit(p, SamplingParams(max_tokens=steps + 1, temperature=0)) for p in prompts]
        for r in reqs:
            r.result(600)
    finally:
        eng.stop()
    return [s.seconds for s in stats if s.prefills == 0 and s.batch == batch]


def remote_leg(log2_rows: int, workdir: Path, stack: contextlib.ExitStack, shards: int = 2,
               kind: str = "ultramem", specs: list[TableSpec] | None = None) -> tuple[LanguageModel, dict[str, Any]]:
    """Create the tables (unless there), start `shards` read-only shard processes over them -> (model,
    leg facts). specs: the model's tables (default: v1's one table, `table_spec`)."""
    cfg = model_config(log2_rows, kind)
    specs = specs or [table_spec(cfg)]
    paths = {spec.name: workdir / f"{kind}-t{log2_rows}" / spec.name for spec in specs}
    started = time.perf_counter()
    for spec in specs:
        if not paths[spec.name].exists():
            create_table(paths[spec.name], spec, initialize=True)  # one partition at a time (storage/table_store.py)
    created = time.perf_counter() - started
    shards = start_local_shards(paths, shards)
    stack.callback(shards.stop)
    loaded = time.perf_counter() - started - created
    client = Client(shards.addresses)
    stack.callback(client.close)
    model = LanguageModel(cfg, backend=RemoteBackend(client, specs, wire_dtype="bfloat16")).eval()
    label = V2_REMOTE if kind == "ultramem_v2" else f"remote-2^{log2_rows}"
    print(f"  {label} ({len(shards.addresses)} shards): tables created in {created:.1f} s, "
          f"shards loaded in {loaded:.1f} s", flush=True)
    return model, {"rows": 1 << log2_rows, "table_gib": sum(s.rows * s.dim * 2 for s in specs) / 2**30,
                   "create_s": created, "shard_load_s": loaded, "shards": len(shards.addresses)}


def _summary(rounds: list[list[float]], batch: int) -> dict[str, Any]:
    """Per-round decode step times -> median of round p50s, p99 over all steps, tokens/s."""
    every = sorted(t for r in rounds for t in r)
    p50s = [statistics.median(r) for r in rounds]
    return {"p50_ms": 1e3 * statistics.median(p50s), "p99_ms": 1e3 * every[min(len(every) - 1, int(0.99 * len(every)))],
            "tokens_per_s": statistics.median(batch * len(r) / sum(r) for r in rounds), "steps": len(every),
            "round_p50_ms": [round(1e3 * p, 3) for p in p50s]}


def _ratios(legs: dict[str, dict[str, Any]], per_round: dict[tuple[str, int], list[list[float]]]) -> dict[str, Any]:
    """Medians over rounds of the per-round ratios (each round measured every leg side by side)."""
    def med(fn: Any) -> float:
        n = len(per_round[(SMALL, BATCHES[0])])
        return round(statistics.median(fn(i) for i in range(n)), 3)

    def p50(name: str, b: int, i: int) -> float:
        return statistics.median(per_round[(name, b)][i])

    def tps(name: str, b: int, i: int) -> float:
        r = per_round[(name, b)][i]
        return b * len(r) / sum(r)

    out: dict[str, Any] = {}
    for big in (MID, BIG):
        if big in legs:
            out[f"p50 {big} / {SMALL}"] = {str(b): med(lambda i, b=b, big=big: p50(big, b, i) / p50(SMALL, b, i))
                                          for b in BATCHES}
    for leg in (MID, MID_ONE):
        out[f"hop ms per token per memory layer (p50 {leg} - local-2^20)"] = {
            str(b): med(lambda i, b=b, leg=leg: 1e3 * (p50(leg, b, i) - p50("local-2^20", b, i))) for b in BATCHES}
    out["tokens/s remote-2^20 / moe-local"] = {str(b): med(lambda i, b=b: tps(MID, b, i) / tps("moe-local", b, i))
                                               for b in BATCHES}
    if V2_REMOTE in legs:  # UltraMemV2 beside v1: what the remote hop costs each, side by side
        for remote, local in ((MID, "local-2^20"), (V2_REMOTE, V2_LOCAL)):
            out[f"tokens/s {remote} / {local}"] = {
                str(b): med(lambda i, b=b, r=remote, lo=local: tps(r, b, i) / tps(lo, b, i)) for b in BATCHES}
        out[f"hop ms per token per memory layer (p50 {V2_REMOTE} - {V2_LOCAL})"] = {
            str(b): med(lambda i, b=b: 1e3 * (p50(V2_REMOTE, b, i) - p50(V2_LOCAL, b, i))) for b in BATCHES}
        out[f"tokens/s {V2_REMOTE} / {MID}"] = {str(b): med(lambda i, b=b: tps(V2_REMOTE, b, i) / tps(MID, b, i))
                                               for b in BATCHES}
    return out


def _checks(ratios: dict[str, Any]) -> dict[str, Any]:
    big = f"p50 {BIG} / {SMALL}" if f"p50 {BIG} / {SMALL}" in ratios else f"p50 {MID} / {SMALL}"
    hops = {leg: ratios[f"hop ms per token per memory layer (p50 {leg} - local-2^20)"]["1"] for leg in (MID, MID_ONE)}
    moe = ratios["tokens/s remote-2^20 / moe-local"]
    out = {f"{big} (target <= 1.2)": {b: {"ratio": v, "met": v <= 1.2} for b, v in ratios[big].items()},
           "remote hop per token per memory layer at batch 1, ms (target < 2)": {
               "2 shards": {"ms": hops[MID], "met": hops[MID] < 2},
               "1 shard": {"ms": hops[MID_ONE], "met": hops[MID_ONE] < 2}},
           "tokens/s remote-2^20 / moe-local (target > 1 at batch >= 16)": {
               b: {"ratio": v, "met": v > 1} for b, v in moe.items() if int(b) >= 16}}
    v2_hop = ratios.get(f"hop ms per token per memory layer (p50 {V2_REMOTE} - {V2_LOCAL})")
    if v2_hop is not None:
        out["UltraMemV2 remote hop per token per memory layer at batch 1, ms (target < 2)"] = {
            "2 shards": {"ms": v2_hop["1"], "met": v2_hop["1"] < 2}}
        out["tokens/s remote / local at batch 1 / 16 / 64 (reported)"] = {
            "v1": ratios[f"tokens/s {MID} / local-2^20"], "v2": ratios[f"tokens/s {V2_REMOTE} / {V2_LOCAL}"]}
    return out


def run(out_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run every configuration, rounds interleaved; write serve.json and serve.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    steps, rounds = (8, 2) if quick else (16, 5)
    sizes = [16, 20] if quick else [16, 20, 24]
    if 24 in sizes and psutil.virtual_memory().available < 10 * 2**30:
        print("skipping 2^24: needs ~10 GiB free RAM (table 4 GiB, shard load peaks at twice its share)")
        sizes.remove(24)
    results: dict[str, Any] = {
        "model": {"d_model": D_MODEL, "n_layers": N_LAYERS, "d_v": D_V, "memory_layers": 1, "topk": 16, "heads": 2,
                  "lookup": "pooled", "wire_dtype": "bfloat16", "shards": 2, "shards_one_shard_leg": 1,
                  "v2": {"kind": "ultramem_v2", "placement": "1:1", "shared_projector": True, "d_p": D_V // 3,
                         "tables": ["mem0.values", "mem0.pre_values"], "shards": 2}},
        "steps_per_round": steps, "rounds": rounds, "quick": quick, "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_wait_policy": OMP_WAIT_POLICY,
        "load_avg_at_start": os.getloadavg(), "configs": {}}
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-serve-") as tmp, contextlib.ExitStack() as stack:
        models: dict[str, LanguageModel] = {}
        for log2 in sizes:
            models[f"remote-2^{log2}"], results["configs"][f"remote-2^{log2}"] = remote_leg(log2, Path(tmp), stack)
        models[MID_ONE], results["configs"][MID_ONE] = remote_leg(20, Path(tmp), stack, shards=1)
        cfg = model_config(20)
        models["local-2^20"] = LanguageModel(cfg, backend=LocalBackend([table_spec(cfg)])).eval()
        results["configs"]["local-2^20"] = {"rows": 1 << 20}
        models["moe-local"] = moe = LanguageModel(model_config(20, "moe")).eval()
        results["configs"]["moe-local"] = {
            "expert_params": sum(p.numel() for block in moe.blocks for p in block.ffn.parameters()),
            "table_params": (1 << 20) * D_V}
        models[V2_LOCAL] = local_v2 = LanguageModel(model_config(20, "ultramem_v2")).eval()  # LocalBackend
        results["configs"][V2_LOCAL] = {"rows": 1 << 20}
        models[V2_REMOTE], results["configs"][V2_REMOTE] = remote_leg(20, Path(tmp), stack, kind="ultramem_v2",
                                                                      specs=local_v2.memory_tables())
        names = list(models)
        for name in names:  # warm-up: channels open, eval caches built, allocator settled
            measure(models[name], 1, 2)
        per_round: dict[tuple[str, int], list[list[float]]] = {(n, b): [] for n in names for b in BATCHES}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for b in BATCHES:
                for name in order:
                    per_round[(name, b)].append(measure(models[name], b, steps))
            print(f"  round {r + 1}/{rounds} done (load avg {os.getloadavg()[0]:.1f})", flush=True)
    results["load_avg_at_end"] = os.getloadavg()
    for name in names:
        results["configs"][name]["batches"] = bs = {str(b): _summary(per_round[(name, b)], b) for b in BATCHES}
        for b, s in bs.items():
            print(f"  {name:18s} batch {int(b):3d}: p50 {s['p50_ms']:7.2f} ms  p99 {s['p99_ms']:7.2f} ms  "
                  f"{s['tokens_per_s']:8.1f} tokens/s", flush=True)
    results["ratios"] = _ratios(results["configs"], per_round)
    results["checks"] = _checks(results["ratios"])
    for k, v in results["checks"].items():
        print(f"  {k}: {v}")
    (out_dir / "serve.json").write_text(json.dumps(results, indent=2))
    png = _plots().render(out_dir / "serve.json")
    print(f"wrote {out_dir / 'serve.json'} and {png}")
    return results


def _plots() -> Any:
    spec = importlib.util.spec_from_file_location("ultramem_bench_plots", Path(__file__).with_name("plots.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    run(REPO / "bench" / "results", quick="--quick" in sys.argv)
