"""`ultramem serve` (DESIGN §6, §7.1): a checkpoint behind an HTTP completions API.

The spine: find the checkpoint -> get read-only shards for its tables (start them: `ultramem shard
serve --read-only` subprocesses by default, in-process servers with --in-process, Ray ShardActors
with --address; or connect to running ones with --shards) -> build the model with a RemoteBackend
(pooled lookups: shards answer partial sums, bf16 on the wire by default) and load the dense part
-> start the engine and the HTTP server -> print `listening on http://HOST:PORT` -> serve until
SIGTERM/SIGINT -> stop everything. `--replicas N` with N > 1 deploys N engines on Ray Serve instead
(orchestration/serve_ray.py); N = 1 (the default) stays in this process, without Ray.
"""

from __future__ import annotations

import argparse
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from orchestration.errors import UsageError
from orchestration.signal_flag import SignalFlag

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


@dataclass
class ShardSet:
    """Shard addresses plus how to stop the shards we started (nothing for --shards)."""

    addresses: list[str]
    stoppers: list[Callable[[], None]] = field(default_factory=list)
    token: str | None = field(default=None, repr=False)  # the token these shards require (None: the caller's)

    def stop(self) -> None:
        """Stop every shard this set started, last first; errors are logged, not raised."""
        while self.stoppers:
            try:
                self.stoppers.pop()()
            except Exception:  # keep stopping the others
                logger.exception("stopping a shard failed")


def table_paths(checkpoint: Path) -> dict[str, Path]:
    """Table name -> its Zarr group in the checkpoint (DESIGN §5)."""
    from storage.checkpoint import read_manifest, table_path

    return {name: table_path(checkpoint, name) for name in read_manifest(checkpoint).get("tables", [])}


def _wait_listening(proc: subprocess.Popen, timeout: float) -> str:
    """The HOST:PORT from a shard's first stdout line `listening on HOST:PORT`."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if line.startswith("listening on "):
                    return line.split()[-1]
                if not line:
                    break
    finally:
        sel.close()
    raise UsageError(f"shard process {proc.pid} did not start (exit {proc.poll()})")


def _stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def start_local_shards(tables: dict[str, Path], count: int, *, token: str | None = None,
                       token_file: str | None = None, in_process: bool = False) -> ShardSet:
    """`count` read-only shards over `tables`, shard i owning partitions i, i+count, ...

    Subprocesses (`ultramem shard serve --read-only`, GIL-free) unless `in_process`.
    """
    shards = ShardSet([])
    try:
        for i in range(count):
            if in_process:
                from param_server.server import ServerConfig, create_server
                from param_server.shard import Shard, ShardConfig
                from storage.table_store import open_table

                shard = Shard(ShardConfig(read_only=True), shard_id=i)
                for path in tables.values():
                    store = open_table(path, "r")
                    shard.load_table(store, range(i, store.spec.num_partitions, count))
                server, _ = create_server(shard, ServerConfig(token=token))
                server.start()
                shards.stoppers.append(lambda s=server, sh=shard: (s.stop(1.0), sh.close()))
                shards.addresses.append(server.address)
                continue
            cmd = [sys.executable, "-m", "orchestration.cli", "shard", "serve", "--read-only",
                   "--shard-id", str(i), "--num-shards", str(count)]
            for path in tables.values():
                cmd += ["--table", str(path)]
            if token_file:
                cmd += ["--token-file", token_file]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
            shards.stoppers.append(lambda p=proc: _stop_process(p))
            shards.addresses.append(_wait_listening(proc, timeout=300))
    except BaseException:
        shards.stop()
        raise
    return shards


def start_ray_shards(address: str, tables: dict[str, Path], count: int, *, token: str | None = None,
                     tls_cert: str | None = None, tls_key: str | None = None) -> ShardSet:
    """`count` read-only ShardActors on the Ray cluster at `address` (this process's Ray if connected).

    Each listens on its node's address as Ray knows it (reachable from this host) and requires
    `token`, or a fresh random one when none is given (ShardSet.token: what the client must send);
    with `tls_cert` and `tls_key` (PEM paths every node can read) they speak TLS only.
    """
    import secrets

    import ray

    from orchestration.cluster import Cluster, ClusterConfig
    from orchestration.placement import shard_options
    from param_server.actor import ShardActor, ShardActorConfig
    from param_server.server import ServerConfig
    from param_server.shard import ShardConfig
    from storage.table_store import open_table

    nps = {open_table(p).spec.num_partitions for p in tables.values()}
    if len(nps) > 1:
        raise UsageError(f"the checkpoint's tables have different partition counts {sorted(nps)}")
    num_partitions = nps.pop() if nps else count
    shards = ShardSet([], token=token or secrets.token_urlsafe(32))
    if not ray.is_initialized():
        cluster = Cluster(ClusterConfig(address=address))
        cluster.connect()
        shards.stoppers.append(cluster.close)
    try:
        opts = shard_options(Cluster.resources(), max_restarts=0)
        actors = [ray.remote(ShardActor).options(**opts).remote(ShardActorConfig(
            shard_id=i, table_paths={n: str(p) for n, p in tables.items()},
            partitions=tuple(range(i, num_partitions, count)), shard=ShardConfig(read_only=True),
            server=ServerConfig(token=shards.token, tls_cert=tls_cert, tls_key=tls_key), bind="node"))
            for i in range(count)]
        for actor in actors:
            shards.stoppers.append(lambda a=actor: ray.kill(a))
        shards.addresses = list(ray.get([a.address.remote() for a in actors]))  # submit all, wait once
    except BaseException:
        shards.stop()
        raise
    return shards


def build_engine(checkpoint: Path, addresses: list[str], *, token: str | None = None,
                 wire_dtype: str = "bfloat16", engine_config: object = None, tls_ca: str | None = None):
    """(engine (not started), tokenizer, client or None): the model over these shards, dense loaded."""
    from model_workers import checkpoint_io
    from model_workers.engine import Engine, EngineConfig, load_dense, serving_config
    from model_workers.model import LanguageModel
    from model_workers.remote import RemoteBackend
    from model_workers.tokenizer import Tokenizer
    from orchestration.config import load_config
    from param_server.client import Client, ClientConfig
    from storage.table_store import open_table

    cfg = load_config(base=checkpoint_io.read_config(checkpoint))
    tok_path = checkpoint / checkpoint_io.TOKENIZER
    if not tok_path.is_file():
        raise UsageError(f"{checkpoint} has no {checkpoint_io.TOKENIZER}")
    specs = [open_table(p).spec for p in table_paths(checkpoint).values()]
    client = backend = None
    if specs:
        client = Client(addresses, config=ClientConfig(token=token, tls_ca=tls_ca))
        backend = RemoteBackend(client, specs, wire_dtype=wire_dtype)
    try:
        model = LanguageModel(serving_config(cfg.model), backend=backend)  # pooled lookups (DESIGN §6)
        load_dense(checkpoint, model)
    except BaseException:
        if client is not None:
            client.close()
        raise
    engine = Engine(model, engine_config if isinstance(engine_config, EngineConfig) else EngineConfig())
    return engine, Tokenizer.load(tok_path), client


def serve(args: argparse.Namespace) -> int:
    """Serve the checkpoint until SIGTERM/SIGINT (module docstring)."""
    from model_workers import checkpoint_io
    from model_workers.engine import EngineConfig, EngineError
    from orchestration.serve_http import CompletionService, HttpServer
    from param_server.auth import read_token_file
    from param_server.errors import ShardError
    from storage.errors import StorageError

    if args.replicas < 1:
        raise UsageError("--replicas must be >= 1")
    if args.replicas > 1:  # N replicas on Ray Serve; 1 is this process's stdlib HTTP server
        from orchestration.serve_ray import serve_replicated

        return serve_replicated(args)
    if args.local_shards < 1:
        raise UsageError("--local-shards must be >= 1")
    stop = SignalFlag()  # set by the SIGTERM/SIGINT handlers below (never a threading.Event there)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    shards = ShardSet([])
    engine = client = http = None
    try:
        try:
            checkpoint = checkpoint_io.find_checkpoint(args.checkpoint)
            token = read_token_file(args.token_file) if args.token_file else None
            tables = table_paths(checkpoint)
            if args.shards:
                shards = ShardSet([a.strip() for a in args.shards.split(",") if a.strip()])
            elif args.address and tables:
                shards = start_ray_shards(args.address, tables, args.local_shards, token=token,
                                          tls_cert=getattr(args, "shard_tls_cert", None),
                                          tls_key=getattr(args, "shard_tls_key", None))
                for sig in previous:  # ray.init installs its own SIGTERM handler: ours must win
                    signal.signal(sig, lambda *_: stop.set())
            elif tables:
                shards = start_local_shards(tables, args.local_shards, token=token, token_file=args.token_file,
                                            in_process=args.in_process)
            engine_cfg = EngineConfig(max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
            engine, tokenizer, client = build_engine(checkpoint, shards.addresses, token=shards.token or token,
                                                     wire_dtype=args.wire_dtype, engine_config=engine_cfg,
                                                     tls_ca=getattr(args, "shard_tls_ca", None))
            service = CompletionService(engine.start(), tokenizer, model_name=checkpoint.name, token=token)
            http = HttpServer(service, args.host, args.port).start()
        except (StorageError, ShardError, EngineError, OSError) as err:
            raise UsageError(str(err)) from None
        print(f"listening on {http.url}", flush=True)
        print(f"shards: {', '.join(shards.addresses)}", flush=True)
        logger.info("serving %s with shards %s", checkpoint, shards.addresses)
        while not stop.wait(0.2):
            pass
        return 0
    finally:
        if http is not None:
            http.stop()
        if engine is not None:
            engine.stop()
        if client is not None:
            client.close()
        shards.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

