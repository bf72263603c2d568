"""Optional TLS (and mutual TLS) credentials for shard servers and clients (DESIGN §7).

Certificates and keys are PEM files named in `ServerConfig` / `ClientConfig`; this module reads
them once and builds gRPC credentials. Without any of them, servers listen and clients dial in
plaintext, which is only acceptable on loopback (the default bind address).

- Server: `tls_cert` + `tls_key` turn TLS on; `tls_client_ca` additionally requires every client
  to present a certificate signed by that CA (mTLS).
- Client: `tls_ca` (the root certificate(s) a shard's certificate must chain to) turns TLS on;
  `tls_cert` + `tls_key` present a client certificate for mTLS.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from param_server.errors import ConfigError

_PEM_MARK = b"-----BEGIN "


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of PEM file `path`; ConfigError naming `what` if missing, unreadable or not PEM."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from None
    if _PEM_MARK not in data:
        raise ConfigError(f"{what} {path} is not a PEM file")
    return data


def check_pair(prefix: str, cert: str | None, key: str | None) -> None:
    """A certificate and its key come together or not at all (ConfigError naming the fields)."""
    if (cert is None) != (key is None):
        raise ConfigError(f"{prefix}.tls_cert and {prefix}.tls_key must be given together")


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None
                       ) -> grpc.ServerCredentials:
    """TLS credentials for a server; with `client_ca`, clients must present a certificate it signed."""
    pair = [(read_pem(key, "server.tls_key"), read_pem(cert, "server.tls_cert"))]
    if client_ca is None:
        return grpc.ssl_server_credentials(pair)
    roots = read_pem(client_ca, "server.tls_client_ca")
    return grpc.ssl_server_credentials(pair, root_certificates=roots, require_client_auth=True)


def channel_credentials(ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None
                        ) -> grpc.ChannelCredentials:
    """TLS credentials for a client trusting root certificate(s) `ca`; cert + key for mTLS."""
    roots = read_pem(ca, "client.tls_ca")
    if cert is None or key is None:
        return grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.ssl_channel_credentials(root_certificates=roots, private_key=read_pem(key, "client.tls_key"),
                                        certificate_chain=read_pem(cert, "client.tls_cert"))
