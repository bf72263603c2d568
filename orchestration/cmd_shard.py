"""`ultramem shard serve` (DESIGN §4, §7.1): one standalone parameter-server shard over gRPC.

Loads the chosen partitions of one or more tables into a `Shard`, serves them with
`param_server.server.create_server`, prints exactly `listening on HOST:PORT` as the first stdout
line (flushed, so a parent process can read the port), and on SIGTERM or SIGINT drains the apply
queue, stops the server and exits 0. TLS with --tls-cert/--tls-key, mTLS with --tls-client-ca.
With --ram-budget-mb the partitions beyond the budget are served through a write-back chunk cache
over the table (opened read-write, unless --read-only), which SIGTERM flushes (DESIGN §5).
"""

from __future__ import annotations

import argparse
import logging
import signal

import torch

from orchestration.errors import UsageError
from orchestration.signal_flag import SignalFlag
from param_server import allocator
from param_server.auth import read_token_file
from param_server.errors import ShardError
from param_server.partition_map import parse_partitions
from param_server.server import ServerConfig, create_server
from param_server.shard import Shard, ShardConfig
from storage.errors import StorageError
from storage.table_store import open_table

logger = logging.getLogger(__name__)


def _partitions(args: argparse.Namespace, num_partitions: int) -> list[int]:
    """--partitions ranges, else the shard's round-robin share (--shard-id of --num-shards)."""
    if args.partitions:
        return parse_partitions(args.partitions, num_partitions)
    if not 0 <= args.shard_id < args.num_shards:
        raise UsageError(f"--shard-id must be in [0, --num-shards={args.num_shards})")
    return list(range(args.shard_id, num_partitions, args.num_shards))


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean drain and stop."""
    stop = SignalFlag()  # set by the SIGTERM/SIGINT handlers below (never a threading.Event there)
    # one intra-op thread per kernel call (the pooled sum, duplicate sums): the gRPC thread pool
    # runs requests side by side, and the per-core rates of `ultramem bench memory-path` assume it
    torch.set_num_threads(1)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    shard = server = None
    try:
        try:
            token = read_token_file(args.token_file) if args.token_file else None
            config = ServerConfig(host=args.host, port=args.port, token=token, tls_cert=args.tls_cert,
                                  tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                                  checkpoint_dir=getattr(args, "checkpoint_dir", None))
            budget = getattr(args, "ram_budget_mb", None)
            if budget is not None and budget <= 0:
                raise UsageError("--ram-budget-mb must be > 0")
            allocator.apply(allocator.shard_settings(budgeted=budget is not None))  # what a launcher gives a shard
            shard = Shard(ShardConfig(read_only=args.read_only,
                                      ram_budget_bytes=int(budget * (1 << 20)) if budget else None),
                          shard_id=args.shard_id)
            writable = budget is not None and not args.read_only
            for path in args.table:
                store = open_table(path, "r+" if writable else "r")
                shard.load_table(store, _partitions(args, store.spec.num_partitions))
            server, _ = create_server(shard, config)
        except (StorageError, ShardError) as err:
            raise UsageError(str(err)) from None
        server.start()
        print(f"listening on {server.address}", flush=True)
        while not stop.wait(0.2):
            pass
        logger.info("shard %s: stopping", args.shard_id)
        shard.drain(timeout=60)
        return 0
    finally:
        if server is not None:
            server.stop(grace=5)
        if shard is not None:
            shard.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
