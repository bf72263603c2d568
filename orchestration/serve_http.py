"""The HTTP face of `ultramem serve` (DESIGN §6): OpenAI-style completions over the engine.

Standard library only (`http.server.ThreadingHTTPServer`, one thread per connection), so serving
needs no web framework. Routes:

  POST /v1/completions  {"prompt": str, "max_tokens", "temperature", "top_p", "stop", "stream",
                        "seed", "model", "n": 1, "user"} -> a `text_completion` object, or with
                        "stream": true server-sent events (`data: {chunk}` ... `data: [DONE]`)
  GET  /health          {"status": "ok", ...} (503 once the engine has stopped); never needs a token
  GET  /metrics         Prometheus text (prometheus_client): requests, tokens, latencies, batch sizes

Bad requests get 4xx with `{"error": {"message", "type", "param"}}` (OpenAI's error shape). With a
token, /v1/* and /metrics need `Authorization: Bearer <token>`. A client that goes away (mid-stream
or while waiting) cancels its request, which frees its engine row at the next step.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from model_workers.engine import (
    Engine,
    EngineBusyError,
    EngineClosedError,
    InvalidRequestError,
    Request,
    SamplingParams,
    StepStats,
)
from model_workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a completion request is small; refuse anything bigger (413)
_FIELDS = {"prompt", "max_tokens", "temperature", "top_p", "stop", "stream", "seed", "model", "n", "user"}
_POLL_S = 0.05  # how often a waiting handler checks whether its client is still there


class HttpError(Exception):
    """An error answered with `status` and an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass(frozen=True)
class Completion:
    """A validated /v1/completions request."""

    prompt: str
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool


class ServeMetrics:
    """The Prometheus series of one server, in its own registry (no globals)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ultramem_serve_requests", "Completion requests by outcome", ["status"], registry=r)
        self.prompt_tokens = Counter("ultramem_serve_prompt_tokens", "Prompt tokens received", registry=r)
        self.tokens = Counter("ultramem_serve_generated_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("ultramem_serve_request_latency_seconds", "Request latency (to the last token)",
                                 registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("ultramem_serve_time_to_first_token_seconds", "Time to the first token",
                              registry=r, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.step = Histogram("ultramem_serve_decode_step_seconds", "Engine step time (per-token latency)",
                              registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.batch = Histogram("ultramem_serve_batch_size", "Sequences decoded together per step",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        Gauge("ultramem_serve_active_sequences", "Sequences holding an engine row",
              registry=r).set_function(lambda: engine.active_count)
        Gauge("ultramem_serve_queued_requests", "Requests waiting for an engine row",
              registry=r).set_function(lambda: engine.queued_count)

    def on_step(self, stats: StepStats) -> None:
        """Engine hook: one observation per step."""
        self.step.observe(stats.seconds)
        self.batch.observe(stats.batch)


def _typed(body: dict[str, Any], name: str, types: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is default:
        return value
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join("number" if t is float else t.__name__ for t in types)
        raise HttpError(400, f"'{name}' must be {want}, got {type(value).__name__}", name)
    return value


def parse_completion(raw: bytes, max_tokens_limit: int) -> Completion:
    """Validate a /v1/completions body; raises HttpError(400) naming the bad field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HttpError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise HttpError(400, f"unknown field(s) {unknown}; accepted: {sorted(_FIELDS)}", unknown[0])
    if "prompt" not in body:
        raise HttpError(400, "'prompt' is required", "prompt")
    prompt = _typed(body, "prompt", (str,), None)
    if not prompt:
        raise HttpError(400, "'prompt' must not be empty", "prompt")
    max_tokens = _typed(body, "max_tokens", (int,), 16)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise HttpError(400, f"'max_tokens' must be in [1, {max_tokens_limit}], got {max_tokens}", "max_tokens")
    temperature = float(_typed(body, "temperature", (int, float), 1.0))
    if not 0 <= temperature <= 2:
        raise HttpError(400, f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    top_p = float(_typed(body, "top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise HttpError(400, f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    seed = _typed(body, "seed", (int,), None)
    if seed is not None and not 0 <= seed < 2**63:  # torch.Generator takes a signed 64-bit seed
        raise HttpError(400, f"seed must be in [0, 2^63), got {seed}", param="seed")
    if _typed(body, "n", (int,), 1) != 1:
        raise HttpError(400, "only 'n' = 1 is supported", "n")
    _typed(body, "model", (str,), None)
    _typed(body, "user", (str,), None)
    stream = _typed(body, "stream", (bool,), False)
    stop = _typed(body, "stop", (str, list), None)
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise HttpError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    return Completion(prompt, params, stops, stream)


class _TextStream:
    """Turns generated token ids into text pieces, holding back what a stop string might still claim."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now safe to send (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._take(text[:at], len(text[:at]))
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next bytes
            return ""
        return self._take(text, len(text) - self.hold)

    def finish(self) -> str:
        """What remains to send at the end of the stream."""
        text = self.tokenizer.decode(self.ids)
        return "" if self.stopped else self._take(text, len(text))

    def _take(self, text: str, upto: int) -> str:
        piece = text[self.sent:max(upto, self.sent)]
        self.sent += len(piece)
        return piece


class CompletionService:
    """Engine + tokenizer + metrics: what the HTTP handler calls."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, model_name: str = "ultramem",
                 token: str | None = None) -> None:
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.metrics = ServeMetrics(engine)
        engine.on_step = self.metrics.on_step
        self._expected = f"Bearer {token}".encode() if token else None

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the token (always, without a token)."""
        if self._expected is None:
            return True
        return header is not None and hmac.compare_digest(header.encode(), self._expected)

    def submit(self, req: Completion) -> Request:
        """Tokenize and queue; maps engine errors to HTTP errors."""
        ids = self.tokenizer.encode(req.prompt)
        if not ids:
            raise HttpError(400, "'prompt' encodes to no tokens", "prompt")
        self.metrics.prompt_tokens.inc(len(ids))
        try:
            return self.engine.submit(ids, req.params)
        except InvalidRequestError as err:
            raise HttpError(400, str(err)) from None
        except EngineBusyError as err:
            raise HttpError(429, str(err), kind="rate_limit_error") from None
        except EngineClosedError as err:
            raise HttpError(503, str(err), kind="server_error") from None

    def body(self, rid: str, created: int, text: str, finish: str | None, usage: dict | None = None,
             *, chunk: bool = False) -> dict[str, Any]:
        """An OpenAI `text_completion` object (or stream chunk)."""
        out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created,
                               "model": self.model_name,
                               "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        if usage is not None and not chunk:
            out["usage"] = usage
        return out


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body leave in separate writes: with Nagle on, each small answer waits for the
    # client's delayed ACK (~40 ms on Linux) — measured as ~22 ms per request in the HTTP fuzz
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # ------------------------------------------------------------------ plumbing
    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _unread_body(self) -> None:
        """An answer before (or without) reading a request body: close the connection afterwards, so
        the unread bytes are never parsed as the next request on this keep-alive connection."""
        if self.headers.get("Content-Length", "0") not in ("", "0") or "Transfer-Encoding" in self.headers:
            self.close_connection = True

    def _method_not_allowed(self) -> None:
        self._unread_body()
        self.server.service.metrics.requests.labels("bad_request").inc()
        self._send_json(405, {"error": {"message": f"method {self.command} not allowed on {self.path}",
                                        "type": "invalid_request_error", "param": None, "code": 405}},
                        headers={"Allow": "GET, POST"})

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _method_not_allowed

    def _send_error(self, err: HttpError) -> None:
        status = {400: "bad_request", 401: "unauthorized", 404: "not_found", 413: "bad_request",
                  429: "busy"}.get(err.status, "error")
        self.server.service.metrics.requests.labels(status).inc()
        self._send_json(err.status, {"error": {"message": err.message, "type": err.kind, "param": err.param,
                                               "code": err.status}})

    def _peer_closed(self) -> bool:
        """Whether the client has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _next(self, request: Request) -> int | None:
        """The next token, cancelling the request if the client goes away while we wait."""
        while True:
            try:
                return request.next_token(timeout=_POLL_S)
            except queue.Empty:
                if self._peer_closed():
                    raise ConnectionResetError("client went away") from None

    # ------------------------------------------------------------------ routes
    def do_GET(self) -> None:
        service = self.server.service
        self._unread_body()
        if self.path == "/health":
            alive = service.engine.is_running
            self._send_json(200 if alive else 503, {"status": "ok" if alive else "stopped",
                                                    "model": service.model_name,
                                                    "active": service.engine.active_count,
                                                    "queued": service.engine.queued_count})
        elif self.path == "/metrics":
            if not service.authorized(self.headers.get("Authorization")):
                return self._send_error(HttpError(401, "missing or invalid bearer token", kind="authentication_error"))
            data = generate_latest(service.metrics.registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self._send_error(HttpError(404, f"no route GET {self.path}", kind="not_found_error"))

    def do_POST(self) -> None:
        service = self.server.service
        body_read = False
        try:
            if self.path != "/v1/completions":
                raise HttpError(404, f"no route POST {self.path}", kind="not_found_error")
            if not service.authorized(self.headers.get("Authorization")):
                raise HttpError(401, "missing or invalid bearer token", kind="authentication_error")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise HttpError(411 if length is None else 400, "a Content-Length header is required")
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                raise HttpError(413, f"body larger than {MAX_BODY_BYTES} bytes")
            body = self.rfile.read(int(length))
            body_read = True
            completion = parse_completion(body, service.engine.config.max_tokens_limit)
            request = service.submit(completion)
        except HttpError as err:
            if not body_read:
                self._unread_body()
            return self._send_error(err)
        try:
            if completion.stream:
                self._stream(completion, request)
            else:
                self._complete(completion, request)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            request.cancel()  # frees the engine row at the next step
            service.metrics.requests.labels("cancelled").inc()
            self.close_connection = True
            logger.info("client went away; request %d cancelled", request.id)

    def _complete(self, completion: Completion, request: Request) -> None:
        service = self.server.service
        text = _TextStream(service.tokenizer, completion.stop)
        pieces = []
        try:
            while (token := self._next(request)) is not None:
                pieces.append(text.push(token))
                if text.stopped:
                    request.cancel()
                    break
        except ConnectionResetError:
            raise
        except Exception as err:  # noqa: BLE001 - the engine forwards any backend failure (shard down)
            return self._send_error(HttpError(502, f"generation failed: {err}", kind="server_error"))
        pieces.append(text.finish())
        self._observe(request, len(text.ids))
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(text.ids),
                 "total_tokens": len(request.prompt) + len(text.ids)}
        finish = "stop" if text.stopped else "length"
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        self._send_json(200, service.body(rid, int(time.time()), "".join(pieces), finish, usage))

    def _stream(self, completion: Completion, request: Request) -> None:
        service = self.server.service
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        text = _TextStream(service.tokenizer, completion.stop)

        def event(obj: Any) -> None:
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()

        try:
            while (token := self._next(request)) is not None:
                piece = text.push(token)
                if piece:
                    event(service.body(rid, created, piece, None, chunk=True))
                if text.stopped:
                    request.cancel()
                    break
        except ConnectionResetError:
            raise
        except Exception as err:  # noqa: BLE001 - engine failure mid-stream: say so in-band, end the stream
            event({"error": {"message": f"generation failed: {err}", "type": "server_error"}})
            event(b"[DONE]")
            service.metrics.requests.labels("error").inc()
            return
        event(service.body(rid, created, text.finish(), "stop" if text.stopped else "length", chunk=True))
        event(b"[DONE]")
        self._observe(request, len(text.ids))

    def _observe(self, request: Request, tokens: int) -> None:
        m = self.server.service.metrics
        m.requests.labels("ok").inc()
        m.tokens.inc(tokens)
        m.latency.observe(time.perf_counter() - request.submitted)
        if request.first_token_at is not None:
            m.ttft.observe(request.first_token_at - request.submitted)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    service: CompletionService


class HttpServer:
    """A not-yet-started HTTP server around a CompletionService; `start()`, `stop()`."""

    def __init__(self, service: CompletionService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self._httpd = _Server((host, port), _Handler)
        self._httpd.service = service
        self.host, self.port = host, int(self._httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="http", daemon=True)
        self._thread.start()
        logger.info("serving HTTP on %s", self.url)
        return self

    def stop(self) -> None:
        """Stop accepting, close the socket (running handlers end with their requests)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self._httpd.server_close()
