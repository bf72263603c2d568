"""Optional shared-secret token auth for shard servers (DESIGN §7).

Clients send gRPC metadata `authorization: Bearer <token>`; the server interceptor answers
UNAUTHENTICATED to any call without the right token. The standard health service stays open so
load balancers and orchestrators can probe a shard without the secret.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from param_server.errors import InvalidRequestError

AUTH_METADATA_KEY = "authorization"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace stripped); InvalidRequestError if missing or empty."""
    try:
        token = Path(path).read_text().strip()
    except OSError as err:
        raise InvalidRequestError(f"cannot read token file {path}: {err.strerror}") from None
    if not token:
        raise InvalidRequestError(f"token file {path} is empty")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (empty when no token)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>` (constant-time compare)."""

    def __init__(self, token: str) -> None:
        if not token:
            raise InvalidRequestError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return continuation(handler_call_details)
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                got = value.encode() if isinstance(value, str) else bytes(value)
                if hmac.compare_digest(got, self._expected):
                    return continuation(handler_call_details)
        return self._deny
