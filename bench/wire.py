"""Wire benchmark (`ultramem bench wire`, DESIGN §4.2, §6): bytes per token, rows mode vs pooled mode.

A paper-shaped UltraMem layer (H=2 heads, m=80, E=4, h=2 cores, d_v=384, K=256 so P=65,536 rows)
picks its slots for T random tokens; the selection is looked up through two in-process gRPC shards,
once per mode, and a server interceptor adds up the serialized request and response bytes of every
call (protobuf message bodies as they cross the wire; gRPC's 5-byte frame prefix and the HTTP/2
headers come on top, ~tens of bytes per call, and are reported as the call count). The same
figures are predicted by counting (ids, scores, values, sums) so each number is explained:

  rows mode    lookup: U ids (8 B) + U rows x d_v (4 B fp32 / 2 B bf16), U = unique rows of the batch;
               training adds the push: U ids + U x d_v fp32 gradients.
  pooled mode  lookup: n = T*H*m entries x (row, projector, token: INT32 ids, 4 B each + h fp32 scores) and,
               from every shard that holds one of the token's rows, [T, E, d_v] partial sums;
               training adds PooledBackward: the entries again + dL/do [T, E, d_v] fp32 to each
               shard, and dL/ds [n, h] fp32 back.

UltraMemV2 leg (DESIGN §3.3): the same selections with one shared projector (a token's pooled answer
is one [d_v] sum, not E) and PEER-style pre-values P_tab [P, d_p], d_p = d_v / 3:

  rows mode    lookup: U ids + U rows of V and of P_tab (both tables' Gather); push: both gradients.
  pooled mode  lookup: the entries (as v1) + q_p [T, d_p] fp32 + the token ids, and [T, 1, d_v] sums
               from each shard a token touches (E times fewer than v1's); training adds
               PooledBackward with q_p and dL/do [T, 1, d_v], and dL/ds + dL/dq_p [T, d_p] back.

Regimes: T = 1, 8, 64 tokens per lookup (decoding: one new token per sequence, nothing to dedupe)
up to 512-2048 (prefill / training batches, where rows repeat and dedupe shrinks rows mode).
Medians of several selections; printed side by side with the pooled/rows ratio; JSON in
<out>/wire.json.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from model_workers.ive import split_virtual
from model_workers.ultramem import MemoryConfig, MemoryLayer
from param_server.client import Client
from param_server.server import create_server
from param_server.shard import Shard
from storage.layout import TableSpec, init_partition_values

D_MODEL = 768
LAYER = MemoryConfig(num_keys=256, d_k=128, d_v=384, heads=2, topk=80, expansion=4, cores=2, tucker_rank=2,
                     placement="0:0", num_partitions=16)
NUM_SHARDS = 2
D_P = LAYER.d_v // 3  # UltraMemV2's pre-value width (d_p : d_v = 1 : 3, the V2 paper's best)
TARGET = 1 / 8  # pooled bytes per token <= 1/8 of rows mode (issue 7)


class ByteCounter(grpc.ServerInterceptor):
    """Adds up serialized request/response bytes and calls per RPC method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            out, self.counts = dict(self.counts), defaultdict(int)
        return out

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        parse, serialize = handler.request_deserializer, handler.response_serializer

        def counted_parse(data: bytes) -> Any:
            self.add(f"{method}.request", len(data))
            self.add(f"{method}.calls", 1)
            return parse(data)

        def counted_serialize(message: Any) -> bytes:
            data = serialize(message)
            self.add(f"{method}.response", len(data))
            return data

        return handler._replace(request_deserializer=counted_parse, response_serializer=counted_serialize)


def selection(layer: MemoryLayer, tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the layer picks for `tokens` random inputs: rows, projector int64 [T, H*m], scores [T, H*m, h]."""
    x = torch.randn(tokens, D_MODEL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        virtual, scores = layer.retrieve(*layer.key_scores(*layer.query(x)))
        virtual = virtual.reshape(tokens, -1)
        rows, projector = split_virtual(virtual, layer.permutation, LAYER.physical_rows)
    return rows.numpy(), projector.numpy(), scores.reshape(tokens, virtual.shape[1], -1).float().numpy()


def predicted(rows: np.ndarray, counter_shards: int, wire_bytes: int) -> dict[str, float]:
    """Bytes by counting (message bodies, framing ignored) for one selection, in total."""
    t, j = rows.shape
    n, d_v, e, h = t * j, LAYER.d_v, LAYER.expansion, LAYER.cores
    u = np.unique(rows).size
    shards_per_token = np.mean([np.unique(r % LAYER.num_partitions % counter_shards).size for r in rows])
    sums = t * shards_per_token * (8 + e * d_v * wire_bytes)  # the answer's token ids stay INT64
    return {"rows_lookup": u * 8 + u * d_v * wire_bytes, "rows_push": u * 8 + u * d_v * 4,
            "pooled_request": n * (3 * 4 + h * 4), "pooled_sums": sums,
            "pooled_backward": n * (3 * 4 + h * 4) + t * shards_per_token * (4 + e * d_v * 4) + n * h * 4,
            "unique_rows": u, "entries": n, "shards_per_token": shards_per_token}


ROWS_LOOKUP = ("Gather", "GatherStream")  # Client.gather streams a lookup of more than one answer a shard


def _record(counter: ByteCounter, out: dict[str, dict[str, int]], name: str, methods: tuple[str, ...]) -> None:
    """out[name] = the request and response bytes and calls of `methods` since the last record."""
    c = counter.take()
    out[name] = {k: sum(c.get(f"{m}.{k}", 0) for m in methods) for k in ("request", "response", "calls")}


def measure(client: Client, counter: ByteCounter, table: str, rows: np.ndarray, projector: np.ndarray,
            scores: np.ndarray, step: int) -> dict[str, dict[str, int]]:
    """Serialized bytes of each operation for one selection: {op: {"request", "response", "calls"}}."""
    t, j = rows.shape
    flat, proj = rows.reshape(-1), projector.reshape(-1)
    token = np.repeat(np.arange(t, dtype=np.int64), j)
    s = scores.reshape(t * j, -1)
    out: dict[str, dict[str, int]] = {}
    record = functools.partial(_record, counter, out)
    counter.take()
    for wire_dtype in ("float32", "bfloat16"):
        client.gather(table, flat, wire_dtype=wire_dtype)
        record(f"rows_lookup/{wire_dtype}", ROWS_LOOKUP)
        client.pooled_gather(table, flat, proj, token, s, t, LAYER.expansion, wire_dtype=wire_dtype)
        record(f"pooled_lookup/{wire_dtype}", ("PooledGather",))
    unique = np.unique(flat)
    client.push(table, unique, np.zeros((unique.size, LAYER.d_v), np.float32), lr=0.0, step=step)
    record("rows_push", ("PushGradients",))
    grad_out = np.zeros((t, LAYER.expansion, LAYER.d_v), np.float32)
    client.pooled_backward(table, flat, proj, token, s, grad_out, lr=0.0, step=step)
    record("pooled_backward", ("PooledBackward",))
    return out


def measure_v2(client: Client, counter: ByteCounter, table: str, pre_table: str, rows: np.ndarray,
               scores: np.ndarray, q_p: np.ndarray, step: int) -> dict[str, dict[str, int]]:
    """measure() for the UltraMemV2 layer: one shared projector (every entry's projector is 0, E = 1
    in the pooled calls) and pre-values scored on the shards from q_p [T, d_p]."""
    t, j = rows.shape
    flat = rows.reshape(-1)
    proj = np.zeros_like(flat)
    token = np.repeat(np.arange(t, dtype=np.int64), j)
    s = scores.reshape(t * j, -1)
    out: dict[str, dict[str, int]] = {}
    record = functools.partial(_record, counter, out)
    counter.take()
    unique = np.unique(flat)
    for wire_dtype in ("float32", "bfloat16"):
        client.gather(table, flat, wire_dtype=wire_dtype)
        client.gather(pre_table, flat, wire_dtype=wire_dtype)
        record(f"rows_lookup/{wire_dtype}", ROWS_LOOKUP)
        client.pooled_gather(table, flat, proj, token, s, t, 1, wire_dtype=wire_dtype, pre_table=pre_table, q_p=q_p)
        record(f"pooled_lookup/{wire_dtype}", ("PooledGather",))
    client.push(table, unique, np.zeros((unique.size, LAYER.d_v), np.float32), lr=0.0, step=step)
    client.push(pre_table, unique, np.zeros((unique.size, D_P), np.float32), lr=0.0, step=step)
    client.flush()
    record("rows_push", ("PushGradients",))
    client.pooled_backward_pre(table, pre_table, flat, proj, token, s, q_p, np.zeros((t, 1, LAYER.d_v), np.float32),
                               lr=0.0, step=step)
    record("pooled_backward", ("PooledBackward",))
    return out


def _regime(runs: list[dict[str, dict[str, int]]], t: int) -> dict[str, Any]:
    """Per-token medians of measured runs, and the pooled/rows ratios."""
    per_token = {op: statistics.median(_total(m[op]) / t for m in runs) for op in runs[0]}
    return {
        "bytes_per_token": per_token,
        "calls": {op: statistics.median(m[op]["calls"] for m in runs) for op in runs[0]},
        "ratio_lookup_bf16": per_token["pooled_lookup/bfloat16"] / per_token["rows_lookup/bfloat16"],
        "ratio_lookup_fp32": per_token["pooled_lookup/float32"] / per_token["rows_lookup/float32"],
        "ratio_training_round": (per_token["pooled_lookup/float32"] + per_token["pooled_backward"])
        / (per_token["rows_lookup/float32"] + per_token["rows_push"]),
    }


def _total(op: dict[str, int]) -> int:
    return op["request"] + op["response"]


def run(out_dir: str | Path = "bench/results", quick: bool = False) -> dict[str, Any]:
    """Measure bytes per token for each regime, print the table, write <out_dir>/wire.json."""
    token_counts = (1, 8, 64, 512) if quick else (1, 8, 64, 512, 2048)
    repeats = 3 if quick else 5
    torch.manual_seed(0)
    layer = MemoryLayer(LAYER, D_MODEL, index=0, num_memory_layers=1, seed=0).eval()
    spec = TableSpec(name=layer.table, rows=LAYER.physical_rows, dim=LAYER.d_v,
                     num_partitions=LAYER.num_partitions, optimizer="sgd", init_std=0.02)
    pre_spec = TableSpec(name=f"{layer.table}.pre_values", rows=LAYER.physical_rows, dim=D_P,
                         num_partitions=LAYER.num_partitions, optimizer="sgd", init_std=D_P**-0.5)
    counter = ByteCounter()
    shards, servers = [], []
    for i in range(NUM_SHARDS):
        shard = Shard(shard_id=i)
        for sp in (spec, pre_spec):
            shard.add_table(sp, {p: {"values": init_partition_values(sp, p)}
                                 for p in range(i, sp.num_partitions, NUM_SHARDS)})
        shards.append(shard)
        servers.append(create_server(shard, interceptors=[counter])[0].start())
    results: dict[str, Any] = {
        "layer": {"heads": LAYER.heads, "topk": LAYER.topk, "expansion": LAYER.expansion, "cores": LAYER.cores,
                  "d_v": LAYER.d_v, "physical_rows": LAYER.physical_rows, "d_model": D_MODEL},
        "num_shards": NUM_SHARDS, "repeats": repeats, "target_pooled_over_rows": TARGET, "regimes": {},
        "v2": {"d_p": D_P, "shared_projector": True, "regimes": {}},
        "method": "serialized protobuf bodies counted by a server interceptor; medians over random token "
                  "selections; per-call gRPC framing (5 B) and HTTP/2 headers not included (see calls)",
    }
    step = 0
    try:
        with Client([s.address for s in servers]) as client:
            for t in token_counts:
                runs, counted, runs_v2 = [], [], []
                for r in range(repeats):
                    rows, projector, scores = selection(layer, t, seed=1000 * t + r)
                    runs.append(measure(client, counter, spec.name, rows, projector, scores, step))
                    counted.append(predicted(rows, NUM_SHARDS, 2))
                    step += 1
                    q_p = np.random.default_rng(r).standard_normal((t, D_P), dtype=np.float32)
                    runs_v2.append(measure_v2(client, counter, spec.name, pre_spec.name, rows, scores, q_p, step))
                    step += 1
                results["v2"]["regimes"][str(t)] = _regime(runs_v2, t)
                regime = _regime(runs, t)
                per_token = regime["bytes_per_token"]
                pooled_req = statistics.median(m["pooled_lookup/bfloat16"]["request"] / t for m in runs)
                count = {k: statistics.median(c[k] / t if k not in ("shards_per_token",) else c[k] for c in counted)
                         for k in counted[0]}
                regime |= {
                    "by_counting_per_token": count,
                    "pooled_bf16_request_share": pooled_req / per_token["pooled_lookup/bfloat16"],
                    "measured_over_counted": {
                        "rows_lookup/bfloat16": per_token["rows_lookup/bfloat16"] / count["rows_lookup"],
                        "pooled_lookup/bfloat16": per_token["pooled_lookup/bfloat16"]
                        / (count["pooled_request"] + count["pooled_sums"])},
                }
                results["regimes"][str(t)] = regime
    finally:
        for server in servers:
            server.stop(0)
        for shard in shards:
            shard.close()
    results["notes"] = notes(results)
    _print(results)
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    (out_path / "wire.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"  wrote {out_path / 'wire.json'}")
    return results


def notes(results: dict[str, Any]) -> list[str]:
    """What dominates, in words, from the measured regimes."""
    one = results["regimes"]["1"]
    out = [
        f"decode (1 token per lookup): rows mode moves ~{one['by_counting_per_token']['unique_rows']:.0f} raw rows "
        f"per token; pooled mode moves {one['by_counting_per_token']['entries']:.0f} entries "
        f"(row, projector, token as INT32 + h fp32 scores = 20 B each) and E*d_v sums from each of "
        f"{one['by_counting_per_token']['shards_per_token']:.1f} shards. The request (ids + scores) is "
        f"{100 * one['pooled_bf16_request_share']:.0f}% of pooled bf16 bytes; the rest are the sums.",
        "pooled sums grow with the number of shards a token's rows touch (each returns its own [E, d_v] "
        "partial sum per token), rows mode does not: with S shards pooled pays ~S * E * d_v per token.",
    ]
    v1, v2 = results["regimes"]["1"]["bytes_per_token"], results["v2"]["regimes"]["1"]["bytes_per_token"]
    out.append(f"UltraMemV2 (one shared projector, pre-values scored on the shards): a decoded token's pooled "
               f"bf16 lookup is {v2['pooled_lookup/bfloat16'] / v1['pooled_lookup/bfloat16']:.2f}x v1's (one [d_v] sum "
               f"per shard instead of E; q_p adds {results['v2']['d_p'] * 4} B), while rows mode also fetches "
               f"the pre-value rows ({v2['rows_lookup/bfloat16'] / v1['rows_lookup/bfloat16']:.2f}x v1's rows bytes).")
    crossover = [t for t, r in results["regimes"].items() if r["ratio_lookup_bf16"] > TARGET]
    if crossover:
        out.append(f"with {', '.join(crossover)} tokens per lookup the batch repeats rows (P = "
                   f"{results['layer']['physical_rows']}), dedupe shrinks rows mode and pooled loses its "
                   "edge: pooled pays off per token when unique rows per token >> E * shards touched.")
    return out


def _print(results: dict[str, Any]) -> None:
    lay = results["layer"]
    print(f"wire bench: H={lay['heads']} m={lay['topk']} E={lay['expansion']} h={lay['cores']} d_v={lay['d_v']} "
          f"P={lay['physical_rows']}, {results['num_shards']} shards, bytes per token (median of "
          f"{results['repeats']})")
    print(f"  {'tokens':>6} {'uniq/tok':>8} | {'rows bf16':>10} {'pooled bf16':>11} {'ratio':>6} | "
          f"{'rows fp32':>10} {'pooled fp32':>11} {'ratio':>6} | {'train rows':>10} {'train pooled':>12} {'ratio':>6}")
    for t, r in results["regimes"].items():
        b = r["bytes_per_token"]
        train_rows = b["rows_lookup/float32"] + b["rows_push"]
        train_pooled = b["pooled_lookup/float32"] + b["pooled_backward"]
        print(f"  {t:>6} {r['by_counting_per_token']['unique_rows']:8.1f} | {b['rows_lookup/bfloat16']:10,.0f} "
              f"{b['pooled_lookup/bfloat16']:11,.0f} {r['ratio_lookup_bf16']:6.3f} | {b['rows_lookup/float32']:10,.0f} "
              f"{b['pooled_lookup/float32']:11,.0f} {r['ratio_lookup_fp32']:6.3f} | {train_rows:10,.0f} "
              f"{train_pooled:12,.0f} {r['ratio_training_round']:6.3f}")
    one = results["regimes"]["1"]
    verdict = "met" if one["ratio_lookup_bf16"] <= TARGET else "MISSED"
    print(f"  target pooled <= 1/8 of rows per decoded token (bf16 wire): {one['ratio_lookup_bf16']:.3f} ({verdict})")
    print(f"  UltraMemV2 (shared projector, pre-values d_p = {results['v2']['d_p']}), bytes per token:")
    print(f"  {'tokens':>6} | {'rows bf16':>10} {'pooled bf16':>11} {'ratio':>6} | {'train rows':>10} "
          f"{'train pooled':>12} {'ratio':>6} | {'pooled bf16 / v1':>16}")
    for t, r in results["v2"]["regimes"].items():
        b = r["bytes_per_token"]
        v1 = results["regimes"][t]["bytes_per_token"]["pooled_lookup/bfloat16"]
        print(f"  {t:>6} | {b['rows_lookup/bfloat16']:10,.0f} {b['pooled_lookup/bfloat16']:11,.0f} "
              f"{r['ratio_lookup_bf16']:6.3f} | {b['rows_lookup/float32'] + b['rows_push']:10,.0f} "
              f"{b['pooled_lookup/float32'] + b['pooled_backward']:12,.0f} {r['ratio_training_round']:6.3f} | "
              f"{b['pooled_lookup/bfloat16'] / v1:16.3f}")
    for line in results["notes"]:
        print(f"  - {line}")


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
