"""`ultramem serve --replicas N` (N > 1) on Ray Serve (DESIGN §6, §7.1, §8).

The spine: connect to Ray (an embedded loopback-only one by default, `--address` to join a cluster)
-> start read-only shards exactly as the single-process path does (subprocesses, --in-process, Ray
ShardActors with --address, or --shards) -> `serve.start` with HTTP on HOST:PORT -> deploy N
replicas of `CompletionReplica`, each building its own engine over the shard addresses ->
print `listening on http://HOST:PORT` -> serve until SIGTERM/SIGINT -> delete the application,
stop Serve and an embedded Ray, stop the shards.

Each replica answers the same HTTP API as `orchestration/serve_http.py`, with the same request
validation (`parse_completion`), engine mapping (`CompletionService.submit`), response objects
(`CompletionService.body`), stop-string handling and error shape, so a client cannot tell the two
apart, except that /health also names the replica that answered and /metrics is per replica (each
replica keeps its own Prometheus registry; Serve's proxy picks which one answers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from orchestration.cmd_serve import REPO, ShardSet, build_engine, start_local_shards, start_ray_shards, table_paths
from orchestration.errors import UsageError
from orchestration.signal_flag import SignalFlag

try:
    from ray import serve
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, Response, StreamingResponse
except ImportError:  # cmd_serve turns this into a UsageError naming ray[serve]
    serve = None

logger = logging.getLogger(__name__)

APP_NAME = "ultramem"
DEPLOYMENT_NAME = "CompletionReplica"
_ERROR_LABELS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 411: "bad_request",
                 413: "bad_request", 429: "busy"}


class CompletionReplica:
    """One Serve replica: an engine over the shards behind the serve_http API (module docstring).

    Deployed through `serve.deployment(CompletionReplica)`; Serve calls `__call__` with a Starlette
    request for every HTTP request routed to this replica and `__del__` when it shuts the replica down.
    """

    def __init__(self, checkpoint: str, addresses: list[str], *, token: str | None, wire_dtype: str,
                 max_batch: int, batch_wait_ms: float, torch_threads: int, shard_token: str | None = None,
                 shard_tls_ca: str | None = None) -> None:
        import torch

        from model_workers.engine import EngineConfig
        from orchestration.serve_http import CompletionService

        torch.set_num_threads(torch_threads)
        path = Path(checkpoint)
        engine, tokenizer, self._client = build_engine(
            path, addresses, token=shard_token or token, wire_dtype=wire_dtype, tls_ca=shard_tls_ca,
            engine_config=EngineConfig(max_batch=max_batch, batch_wait_ms=batch_wait_ms))
        self.service = CompletionService(engine.start(), tokenizer, model_name=path.name, token=token)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Serve (a direct construction): name it by process
            self.replica = f"pid-{os.getpid()}"

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.engine.stop()
        if getattr(self, "_client", None) is not None:
            self._client.close()
            self._client = None

    async def __call__(self, request: HttpRequest) -> Response:
        """Route one HTTP request (GET /health, GET /metrics, POST /v1/completions)."""
        from orchestration.serve_http import HttpError

        try:
            return await self._route(request)
        except HttpError as err:
            return self._error(err)

    # ------------------------------------------------------------------ routes
    async def _route(self, request: HttpRequest) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from orchestration.serve_http import MAX_BODY_BYTES, HttpError, parse_completion

        service, path, method = self.service, request.url.path, request.method
        if method == "GET" and path == "/health":
            alive = service.engine.is_running
            return JSONResponse({"status": "ok" if alive else "stopped", "model": service.model_name,
                                 "active": service.engine.active_count, "queued": service.engine.queued_count,
                                 "replica": self.replica}, status_code=200 if alive else 503)
        if method == "GET" and path == "/metrics":
            self._authorize(request)
            return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
        if method != "POST" or path != "/v1/completions":
            raise HttpError(404, f"no route {method} {path}", kind="not_found_error")
        self._authorize(request)
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise HttpError(400, "a Content-Length header must be a number")
        if length is not None and int(length) > MAX_BODY_BYTES:
            raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
        completion = parse_completion(raw, service.engine.config.max_tokens_limit)
        submitted = service.submit(completion)
        if completion.stream:
            return StreamingResponse(self._events(completion, submitted), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._complete(completion, submitted)

    def _authorize(self, request: HttpRequest) -> None:
        from orchestration.serve_http import HttpError

        if not self.service.authorized(request.headers.get("authorization")):
            raise HttpError(401, "missing or invalid bearer token", kind="authentication_error")

    def _error(self, err: Any) -> Response:
        self.service.metrics.requests.labels(_ERROR_LABELS.get(err.status, "error")).inc()
        return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                       "code": err.status}}, status_code=err.status)

    async def _complete(self, completion: Any, request: Any) -> Response:
        from orchestration.serve_http import HttpError, _TextStream

        text = _TextStream(self.service.tokenizer, completion.stop)
        pieces: list[str] = []
        try:
            while (token := await asyncio.to_thread(request.next_token)) is not None:
                pieces.append(text.push(token))
                if text.stopped:
                    request.cancel()
                    break
        except asyncio.CancelledError:  # the client went away (Serve cancels the call)
            request.cancel()
            self.service.metrics.requests.labels("cancelled").inc()
            raise
        except Exception as err:  # noqa: BLE001 - the engine forwards any backend failure (shard down)
            return self._error(HttpError(502, f"generation failed: {err}", kind="server_error"))
        pieces.append(text.finish())
        self._observe(request, len(text.ids))
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(text.ids),
                 "total_tokens": len(request.prompt) + len(text.ids)}
        body = self.service.body(f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), "".join(pieces),
                                 "stop" if text.stopped else "length", usage)
        return JSONResponse(body)

    async def _events(self, completion: Any, request: Any) -> AsyncIterator[bytes]:
        """Server-sent events, as serve_http writes them: `data: {chunk}` ... `data: [DONE]`."""
        from orchestration.serve_http import _TextStream

        service = self.service
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        text = _TextStream(service.tokenizer, completion.stop)

        def event(obj: Any) -> bytes:
            return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"

        finished = False
        try:
            try:
                while (token := await asyncio.to_thread(request.next_token)) is not None:
                    piece = text.push(token)
                    if piece:
                        yield event(service.body(rid, created, piece, None, chunk=True))
                    if text.stopped:
                        request.cancel()
                        break
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - engine failure mid-stream: say so in-band, end the stream
                finished = True
                service.metrics.requests.labels("error").inc()
                yield event({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
                yield event(b"[DONE]")
                return
            yield event(service.body(rid, created, text.finish(), "stop" if text.stopped else "length", chunk=True))
            yield event(b"[DONE]")
            finished = True
            self._observe(request, len(text.ids))
        finally:
            if not finished:  # the client went away mid-stream: free the engine row
                request.cancel()
                service.metrics.requests.labels("cancelled").inc()

    def _observe(self, request: Any, tokens: int) -> None:
        m = self.service.metrics
        m.requests.labels("ok").inc()
        m.tokens.inc(tokens)
        m.latency.observe(time.perf_counter() - request.submitted)
        if request.first_token_at is not None:
            m.ttft.observe(request.first_token_at - request.submitted)


def free_port(host: str) -> int:
    """A port that is free on `host` now (Serve's proxy needs a fixed port; 0 means pick one)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def deploy(checkpoint: Path, addresses: list[str], *, replicas: int, host: str, port: int,
           token: str | None = None, wire_dtype: str = "bfloat16", max_batch: int = 64,
           batch_wait_ms: float = 5.0, replica_cpus: float = 1.0, shard_token: str | None = None,
           shard_tls_ca: str | None = None) -> str:
    """Start Serve's HTTP proxy on host:port and run `replicas` CompletionReplicas; returns the URL.

    `token` guards HTTP (and the shards, unless `shard_token` names theirs). Needs a Ray connection.
    Returns once every replica has built its engine and /health answers.
    """
    serve.start(http_options={"host": host, "port": port})
    threads = max(1, (os.cpu_count() or 1) // replicas)
    app = serve.deployment(CompletionReplica, name=DEPLOYMENT_NAME).options(
        num_replicas=replicas, max_ongoing_requests=max(2 * max_batch, 8),
        ray_actor_options={"num_cpus": replica_cpus},
    ).bind(str(checkpoint), list(addresses), token=token, wire_dtype=wire_dtype, max_batch=max_batch,
           batch_wait_ms=batch_wait_ms, torch_threads=threads, shard_token=shard_token, shard_tls_ca=shard_tls_ca)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    _wait_healthy(url, timeout=60.0)
    return url


def replica_states() -> dict[str, int]:
    """Replica state -> count of the deployment (e.g. {"RUNNING": 2}), from serve.status()."""
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return {str(getattr(k, "value", k)): int(v) for k, v in status.replica_states.items()}


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise UsageError(f"Ray Serve did not answer {url}/health within {timeout:.0f} s")
        time.sleep(0.2)


def serve_replicated(args: argparse.Namespace) -> int:
    """`ultramem serve --replicas N`: the module docstring's spine, until SIGTERM/SIGINT."""
    from model_workers import checkpoint_io
    from orchestration.cluster import Cluster, ClusterConfig
    from param_server.auth import read_token_file
    from param_server.errors import ShardError
    from storage.errors import StorageError

    if serve is None:
        raise UsageError(f"--replicas {args.replicas} deploys on Ray Serve, which is not installed here "
                         "(pip install 'ray[serve]')")
    if args.local_shards < 1:
        raise UsageError("--local-shards must be >= 1")
    stop = SignalFlag()  # set by the SIGTERM/SIGINT handlers below (never a threading.Event there)
    previous: dict[int, Any] = {}
    # Ray workers (the replicas) must import our packages
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cluster = Cluster(ClusterConfig(address=args.address,
                                    num_cpus=None if args.address else max(os.cpu_count() or 1, args.replicas + 1)))
    shards = ShardSet([])
    deployed = False
    try:
        try:
            checkpoint = checkpoint_io.find_checkpoint(args.checkpoint)
            token = read_token_file(args.token_file) if args.token_file else None
            tables = table_paths(checkpoint)
            cluster.connect()
            # after ray.init: Ray's core worker installs its own SIGTERM handler, which aborts the driver
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
            if args.shards:
                shards = ShardSet([a.strip() for a in args.shards.split(",") if a.strip()])
            elif args.address and tables:
                shards = start_ray_shards(args.address, tables, args.local_shards, token=token,
                                          tls_cert=getattr(args, "shard_tls_cert", None),
                                          tls_key=getattr(args, "shard_tls_key", None))
            elif tables:
                shards = start_local_shards(tables, args.local_shards, token=token, token_file=args.token_file,
                                            in_process=args.in_process)
            deployed = True
            url = deploy(checkpoint, shards.addresses, replicas=args.replicas, host=args.host,
                         port=args.port or free_port(args.host), token=token, wire_dtype=args.wire_dtype,
                         max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, shard_token=shards.token,
                         shard_tls_ca=getattr(args, "shard_tls_ca", None))
        except (StorageError, ShardError, OSError) as err:
            raise UsageError(str(err)) from None
        print(f"listening on {url}", flush=True)
        print(f"shards: {', '.join(shards.addresses)}", flush=True)
        logger.info("serving %s on %d Ray Serve replicas %s with shards %s", checkpoint, args.replicas,
                    replica_states(), shards.addresses)
        while not stop.wait(0.2):
            pass
        return 0
    finally:
        if deployed:
            try:
                if args.address:  # a shared cluster: remove only our application
                    serve.delete(APP_NAME)
                else:
                    serve.shutdown()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                logger.exception("stopping Ray Serve failed")
        shards.stop()
        cluster.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
