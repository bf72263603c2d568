"""`ultramem plan`: bytes per shard and per node for a run config, before anything is allocated.

Resolves the run config exactly as `ultramem train` does (defaults < preset < --config < --set),
takes the memory tables from the model config without building any table
(`planner.memory_table_specs`), plans them over the shards and nodes (orchestration/planner.py) and
prints an aligned table or, with --json, the plan as JSON. A layout that does not fit prints a
warning saying which shard count, RAM per node or chunk cache would; the exit status stays 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestration.errors import ConfigError, UsageError
from orchestration.planner import GiB, format_plan, load_rates, memory_table_specs, plan_capacity, throughput_plan

logger = logging.getLogger(__name__)


def _gib(flag: str, value: float | None) -> int | None:
    if value is None:
        return None
    if not value > 0:
        raise UsageError(f"{flag} must be > 0, got {value:g}")
    return int(value * GiB)


def plan(args: argparse.Namespace) -> int:
    """Print the capacity plan of --preset/--config (+ --set) over --shards shards and --nodes nodes."""
    from orchestration.cluster import DistributedConfig
    from orchestration.config import load_config
    from param_server.server import DEFAULT_MAX_MESSAGE_BYTES

    cfg = load_config(preset=args.preset, path=args.config, overrides=args.set)
    cluster = getattr(cfg, "cluster", None) or DistributedConfig()
    shards = args.shards if args.shards is not None else cluster.shards
    node_ram = _gib("--node-ram-gb", getattr(args, "node_ram_gb", None))
    source = "--node-ram-gb"
    if node_ram is None:
        import psutil

        node_ram, source = int(psutil.virtual_memory().total), "this machine"
    cache = _gib("--cache-gb", getattr(args, "cache_gb", None))
    server = getattr(cfg, "server", None)
    max_message = getattr(server, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES)
    try:
        specs = memory_table_specs(cfg.model)
    except ValueError as err:  # a model config the layers refuse
        raise ConfigError(str(err)) from None
    try:
        result = plan_capacity(specs, shards, node_ram_bytes=node_ram, nodes=getattr(args, "nodes", 1),
                               cache_bytes=cache, max_message_bytes=max_message,
                               object_store_bytes=cluster.object_store_mb << 20)
    except ValueError as err:
        raise UsageError(str(err)) from None

    rate = None
    if getattr(args, "tokens_per_s", None) is not None:
        mc = cfg.model.memory
        try:
            rate = throughput_plan(specs, mc.heads * mc.topk, args.tokens_per_s, load_rates(args.rates))
        except ValueError as err:
            raise UsageError(str(err)) from None

    if not getattr(args, "json", False):
        name = f"preset {args.preset}" if args.preset else f"config {args.config}"
        print(format_plan(result, f"ultramem plan: {name} (node RAM from {source})"))
        if rate is not None:
            print(f"\nthroughput: {rate['tokens_per_s']:,.0f} training tokens/s x "
                  f"{rate['selections_per_token_per_table']} selections per token x {len(rate['tables'])} table(s)"
                  f" needs {rate['shard_cores']:.1f} shard cores = {rate['shard_processes']} shard processes"
                  f" (one core each; lookup + backward + update per step)")
            print(f"  rates {rate['rates_source']}")
    else:
        print(json.dumps({"config": args.preset or args.config, "node_ram_source": source,
                          **result.to_dict(), **({"throughput": rate} if rate is not None else {})}, indent=2))
        if result.suggestions:  # stdout stays pure JSON; the warning goes to stderr
            print(f"ultramem: warning: layout does not fit: {'; '.join(result.suggestions)}", file=sys.stderr)
    return 0
