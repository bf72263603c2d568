"""Build and run a shard's gRPC server (DESIGN §4.2, STYLE §13).

`create_server(shard, config)` registers the MemoryShard servicer, the standard
`grpc.health.v1` health service and server reflection, binds `127.0.0.1` unless told otherwise
(port 0 = any free port, as tests use), and returns `(server, port)`; `server.start()` serves and
`server.stop(grace)` shuts down. The max message length is set on both directions here and in the
client (default 64 MiB; gRPC's own default is 4 MiB).

Hostile input (DESIGN §7, docs/reliability.md): a request body that is not a valid protobuf of the
method's type (random bytes, truncated, invalid UTF-8 in a string) is answered INVALID_ARGUMENT,
not gRPC's default INTERNAL "Exception deserializing request!". With `tls_cert`/`tls_key` the
server speaks TLS only (`tls_client_ca`: clients must present a certificate it signed, mTLS);
`param_server.tls` reads the PEM files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from param_server import tls
from param_server.auth import TokenAuthInterceptor
from param_server.errors import ConfigError
from param_server.partition_map import PartitionMap
from param_server.servicer import MemoryShardServicer
from protos.ultramem.v1 import memory_pb2 as pb

if TYPE_CHECKING:
    from param_server.shard import Shard

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryShard"].full_name  # "ultramem.v1.MemoryShard"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ServerConfig:
    """How a shard server listens."""

    host: str = "127.0.0.1"  # DESIGN §7: loopback unless the operator says otherwise
    port: int = 0  # 0 = any free port (reported back by create_server)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # send and receive limit per message
    max_workers: int = 16  # handler threads; min_step lookups block one while they wait
    token: str | None = field(default=None, repr=False)  # shared secret; None = no auth; never printed
    reflection: bool = True  # grpc server reflection (grpcurl, debugging)
    tls_cert: str | None = None  # PEM certificate (chain) path; with tls_key = TLS only
    tls_key: str | None = field(default=None, repr=False)  # PEM private key path of tls_cert
    tls_client_ca: str | None = None  # PEM CA path; set = clients must present a cert it signed (mTLS)
    advertise_host: str | None = None  # the host clients dial (None: `host`); set when binding a wildcard
    checkpoint_dir: str | None = None  # the Checkpoint RPC writes only under this directory (None: refused)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        if self.max_message_bytes < 1 << 20:
            raise ConfigError(f"server.max_message_bytes must be >= 1 MiB, got {self.max_message_bytes}")
        if self.max_workers < 1:
            raise ConfigError(f"server.max_workers must be >= 1, got {self.max_workers}")
        tls.check_pair("server", self.tls_cert, self.tls_key)
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("server.tls_client_ca needs server.tls_cert and server.tls_key")

    @property
    def uses_tls(self) -> bool:
        """Whether the server speaks TLS."""
        return self.tls_cert is not None


class ShardServer:
    """A started-or-not gRPC server around one Shard; `address` is what clients dial."""

    def __init__(self, server: grpc.Server, servicer: MemoryShardServicer,
                 health_servicer: health.HealthServicer, host: str, port: int, *, tls: bool = False) -> None:
        self.grpc_server = server
        self.servicer = servicer
        self._health = health_servicer
        self.host = host
        self.port = port
        self.tls = tls  # whether clients must dial with TLS

    @property
    def address(self) -> str:
        """host:port (IPv6 hosts in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> ShardServer:
        """Start serving; health turns SERVING."""
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("shard server listening on %s%s", self.address, " (TLS)" if self.tls else "")
        return self

    def set_partition_map(self, partition_map: PartitionMap) -> None:
        """Install a new partition map (and epoch) on the servicer."""
        self.servicer.set_partition_map(partition_map)

    def stop(self, grace: float | None = 5.0) -> None:
        """Refuse new calls, let running ones finish for up to `grace` seconds, then stop."""
        self._health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or `timeout` passes (False)."""
        return self.grpc_server.wait_for_termination(timeout)


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options shared by both ends: message limits, no per-call size surprises."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _serialize(message: object) -> bytes:
    """Response serializer: pre-serialized bytes (the Gather fast path) pass through unchanged."""
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[attr-defined]


class _Malformed:
    """What the request deserializer hands on when the bytes are not a valid message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient_parser(message_type: Any) -> Any:
    """A request deserializer that never raises (gRPC would answer INTERNAL): bad bytes -> _Malformed."""

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as err:  # truncated, bad wire type, invalid UTF-8, nesting too deep
            return _Malformed(str(err))

    return parse


def _refusing_malformed(name: str, handler: Any) -> Any:
    """`handler` behind a check that answers INVALID_ARGUMENT to a request that did not parse."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            logger.debug("%s: malformed request (%s)", name, request.reason)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {name} request: {request.reason}")
        return handler(request, context)

    return call


def _memory_shard_handlers(servicer: MemoryShardServicer) -> grpc.GenericRpcHandler:
    """The MemoryShard methods as declared in the proto, with the pass-through serializer."""
    service = pb.DESCRIPTOR.services_by_name["MemoryShard"]
    handlers = {
        method.name: (grpc.unary_stream_rpc_method_handler if method.server_streaming
                      else grpc.unary_unary_rpc_method_handler)(
            _refusing_malformed(method.name, getattr(servicer, method.name)),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=_serialize,
        )
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def create_server(
    shard: Shard, config: ServerConfig | None = None, *, partition_map: PartitionMap | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> tuple[ShardServer, int]:
    """Register servicer, health and reflection on a new server bound to config.host:config.port.

    Args:
        shard: the Shard to serve (its tables already added or loaded).
        config: listening options; defaults to ServerConfig() (127.0.0.1, any free port).
        partition_map: the map to answer GetPartitionMap with and check epochs against; None =
            built from what the shard owns (a standalone shard), epoch 0.
        interceptors: extra server interceptors (metrics, fault injection in tests), after auth.
    Returns:
        (server, port): the ShardServer, not yet started, and the bound port.
    Raises:
        ConfigError: the address cannot be bound, or a TLS file is missing or not PEM.
    """
    config = config or ServerConfig()
    chain = ([TokenAuthInterceptor(config.token)] if config.token else []) + list(interceptors)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="shard-rpc"),
        options=grpc_options(config.max_message_bytes) + [("grpc.so_reuseport", 0)],
        interceptors=chain,
    )
    servicer = MemoryShardServicer(shard, partition_map, checkpoint_dir=config.checkpoint_dir)
    server.add_generic_rpc_handlers((_memory_shard_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    host_port = f"[{config.host}]:{config.port}" if ":" in config.host else f"{config.host}:{config.port}"
    try:
        if config.uses_tls:
            assert config.tls_cert is not None and config.tls_key is not None
            credentials = tls.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
            port = server.add_secure_port(host_port, credentials)
        else:
            port = server.add_insecure_port(host_port)
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {host_port}: {err}") from None
    if port == 0:
        raise ConfigError(f"cannot listen on {host_port}")
    shard_server = ShardServer(server, servicer, health_servicer, config.advertise_host or config.host, port,
                               tls=config.uses_tls)
    servicer.set_address(shard_server.address)
    return shard_server, port
