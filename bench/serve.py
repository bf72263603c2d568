"""Serving benchmark (`ultramem bench serve`, DESIGN §6): decode latency as the memory table grows.

One model (D 256, 4 blocks, one UltraMem layer read at block 1 and added after block 2, d_v 128,
bf16 values, top-16 of 2 heads) decoded by the inference engine at batch 1, 16 and 64:

  * remote-2^16 / 2^20 / 2^24  the table (P = K² physical rows, bf16) on 2 read-only shard processes
                               (`ultramem shard serve --read-only`), rows mode, bf16 on the wire;
  * local-2^20                 the same table in-process (LocalBackend): what the remote hop costs;
  * moe-local                  the same dense model with MoE FFNs (top-2) whose expert parameters
                               equal the 2^20 table's (P · d_v), in-process.

Per configuration and batch: per-token decode latency (engine step time, p50 and p99, prefill
steps excluded) and tokens/s. Targets: p50 at 2^24 within 1.2x of 2^16; remote - local < 2 ms per
token per memory layer at batch 1; UltraMem remote faster than MoE at batch >= 16. Tables are
created partition by partition (storage.create_table) in a temp dir and deleted afterwards; 2^24
(4 GiB of bf16) runs only when RAM allows and not with --quick. Writes <out>/serve.json and
<out>/serve.png.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model_workers.engine import Engine, EngineConfig, SamplingParams, StepStats
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


def model_config(log2_rows: int, kind: str = "ultramem") -> ModelConfig:
    """The benchmark model with a 2^log2_rows-row table (K = 2^(log2_rows/2) sub-keys per side)."""
    mem = MemoryConfig(num_keys=1 << (log2_rows // 2), d_k=64, d_v=D_V, heads=2, topk=16, expansion=1,
                       placement="1:2", value_dtype="bfloat16", value_optimizer="sgd", num_partitions=256)
    base = ModelConfig(vocab_size=8192, d_model=D_MODEL, n_layers=N_LAYERS, n_heads=4, max_seq_len=256,
                       ffn_kind="ultramem", memory=mem)
    if kind == "moe":  # expert parameters of all blocks = the 2^20 table's P * d_v
        experts = 16
        hidden = (1 << 20) * D_V // (3 * D_MODEL * experts * N_LAYERS)
        return replace(base, ffn_kind="moe", moe=MoEConfig(num_experts=experts, top_k=2,
                                                           expert_ffn_mult=hidden / D_MODEL))
    return base


def measure(model: LanguageModel, batch: int, steps: int) -> dict[str, float]:
    """Decode `steps` tokens for `batch` sequences at once -> per-token latency and tokens/s."""
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
    decode = [s.seconds for s in stats if s.prefills == 0 and s.batch == batch]
    decode.sort()
    total = sum(decode)
    return {"p50_ms": 1e3 * statistics.median(decode), "p99_ms": 1e3 * decode[min(len(decode) - 1,
                                                                                     int(0.99 * len(decode)))],
            "tokens_per_s": batch * len(decode) / total, "steps": len(decode)}


def sweep(name: str, model: LanguageModel, steps: int) -> dict[str, Any]:
    model.eval()
    out = {}
    for b in BATCHES:
        out[str(b)] = r = measure(model, b, steps)
        print(f"  {name:14s} batch {b:3d}: p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"{r['tokens_per_s']:8.1f} tokens/s", flush=True)
    return out


def table_spec(cfg: ModelConfig) -> TableSpec:
    """The spec of the model's one table, as LanguageModel.memory_tables() makes it, without a model."""
    mem = cfg.memory
    return TableSpec(name="mem0.values", rows=mem.physical_rows, dim=D_V, dtype="bfloat16",
                     num_partitions=min(mem.num_partitions, mem.physical_rows), optimizer="sgd",
                     optimizer_args=(("weight_decay", 0.0),), init_std=mem.value_init_std(1, cfg.d_model),
                     seed=cfg.init_seed * 1_000_003 + 1)


def remote_run(log2_rows: int, workdir: Path, steps: int) -> dict[str, Any]:
    """Create the table, start 2 read-only shard processes over it, decode through them."""
    cfg = model_config(log2_rows)
    spec = table_spec(cfg)
    path = workdir / f"t{log2_rows}" / spec.name
    started = time.perf_counter()
    create_table(path, spec, initialize=True)  # one partition at a time (storage/table_store.py)
    created = time.perf_counter() - started
    shards = start_local_shards({spec.name: path}, 2)
    loaded = time.perf_counter() - started - created
    client = Client(shards.addresses)
    try:
        model = LanguageModel(cfg, backend=RemoteBackend(client, [spec], wire_dtype="bfloat16"))
        res = sweep(f"remote-2^{log2_rows}", model, steps)
    finally:
        client.close()
        shards.stop()
    return {"rows": 1 << log2_rows, "table_gib": spec.rows * D_V * 2 / 2**30, "create_s": created,
            "shard_load_s": loaded, "batches": res}


def run(out_dir: str | Path, quick: bool = False) -> dict[str, Any]:
    """Run every configuration; write serve.json and serve.png into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    steps = 12 if quick else 40
    sizes = [16, 20] if quick else [16, 20, 24]
    if 24 in sizes and psutil.virtual_memory().available < 10 * 2**30:
        print("skipping 2^24: needs ~10 GiB free RAM (table 4 GiB, shard load peaks at twice its share)")
        sizes.remove(24)
    results: dict[str, Any] = {"model": {"d_model": D_MODEL, "n_layers": N_LAYERS, "d_v": D_V, "memory_layers": 1,
                                         "topk": 16, "heads": 2, "wire_dtype": "bfloat16", "shards": 2},
                               "steps": steps, "quick": quick, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="ultramem-bench-serve-") as tmp:
        for log2 in sizes:
            results["configs"][f"remote-2^{log2}"] = remote_run(log2, Path(tmp), steps)
    cfg = model_config(20)
    local = LanguageModel(cfg, backend=LocalBackend([table_spec(cfg)]))
    results["configs"]["local-2^20"] = {"rows": 1 << 20, "batches": sweep("local-2^20", local, steps)}
    del local
    moe = LanguageModel(model_config(20, "moe"))
    n_expert = sum(p.numel() for block in moe.blocks for p in block.ffn.parameters())  # experts + routers
    results["configs"]["moe-local"] = {"expert_params": n_expert, "table_params": (1 << 20) * D_V,
                                       "batches": sweep("moe-local", moe, steps)}
    del moe
    results["checks"] = _checks(results["configs"])
    for k, v in results["checks"].items():
        print(f"  {k}: {v}")
    (out_dir / "serve.json").write_text(json.dumps(results, indent=2))
    _plot(results, out_dir / "serve.png")
    print(f"wrote {out_dir / 'serve.json'} and {out_dir / 'serve.png'}")
    return results


def _checks(c: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    small = c["remote-2^16"]["batches"]
    big_name = "remote-2^24" if "remote-2^24" in c else "remote-2^20"
    big = c[big_name]["batches"]
    out[f"p50 {big_name} / remote-2^16 (target <= 1.2)"] = {
        b: round(big[b]["p50_ms"] / small[b]["p50_ms"], 3) for b in small}
    hop = c["remote-2^20"]["batches"]["1"]["p50_ms"] - c["local-2^20"]["batches"]["1"]["p50_ms"]
    out["remote hop per token per memory layer at batch 1, ms (target < 2)"] = round(hop, 3)
    out["tokens/s remote-2^20 / moe-local (target > 1 at batch >= 16)"] = {
        b: round(c["remote-2^20"]["batches"][b]["tokens_per_s"] / c["moe-local"]["batches"][b]["tokens_per_s"], 3)
        for b in small}
    return out


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, entry in results["configs"].items():
        bs = [int(b) for b in entry["batches"]]
        ax1.plot(bs, [entry["batches"][str(b)]["p50_ms"] for b in bs], marker="o", label=name)
        ax2.plot(bs, [entry["batches"][str(b)]["tokens_per_s"] for b in bs], marker="o", label=name)
    for ax, title in ((ax1, "per-token decode latency p50 (ms)"), (ax2, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(REPO / "bench" / "results", quick="--quick" in sys.argv)
