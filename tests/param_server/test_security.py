"""Security of shard servers and clients (DESIGN §7; docs/reliability.md, "security").

Loopback binding proved on the bound socket (psutil), the shared-secret token on every method,
TLS and mutual TLS with self-signed certificates made here by the `openssl` CLI, secrets absent
from every log record and config repr, read-only shards refusing writes without changing state,
and `ultramem shard serve --tls-cert/--tls-key` end to end.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from param_server import wire
from param_server.client import Client, ClientConfig
from param_server.errors import ConfigError, PermissionDeniedError, ShardError, UnauthenticatedError
from param_server.server import ServerConfig, create_server
from param_server.shard import Shard, ShardConfig
from protos.ultramem.v1 import memory_pb2 as pb
from storage.layout import TableSpec, init_partition_values
from storage.table_store import create_table
from tests.param_server.conftest import snapshot

SPEC = TableSpec(name="mem", rows=64, dim=8, num_partitions=4, optimizer="adamw")
TOKEN = "tok-7f3a9c1e-secret"  # distinctive: searched for in logs
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["MemoryShard"].methods]
REPO = Path(__file__).resolve().parents[2]


def _shard(**config) -> Shard:
    shard = Shard(ShardConfig(**config))
    shard.add_table(SPEC, {p: {"values": init_partition_values(SPEC, p)} for p in range(4)})
    return shard


class Served:
    """A started server over a fresh shard; stop() stops both."""

    def __init__(self, config: ServerConfig | None = None, **shard_config) -> None:
        self.shard = _shard(**shard_config)
        self.server, self.port = create_server(self.shard, config)
        self.server.start()
        self.address = self.server.address

    def stop(self) -> None:
        self.server.stop(0)
        self.shard.close()


@pytest.fixture
def served(request):
    s = Served(getattr(request, "param", None))
    yield s
    s.stop()


def _listening(port: int, pid: int | None = None) -> set[str]:
    """IPs that process `pid` (default: this one) listens on at TCP `port`.

    gRPC may bind an IPv4 host through a dual-stack socket (`::ffff:127.0.0.1`, IPv4-mapped), which
    accepts the same peers as 127.0.0.1 alone; it is reported as the IPv4 address.
    """
    conns = psutil.Process(pid).net_connections(kind="tcp")
    out = set()
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
            ip = ipaddress.ip_address(c.laddr.ip)
            out.add(str(ip.ipv4_mapped or ip) if ip.version == 6 else str(ip))
    return out


def _openssl_cert(directory: Path, name: str) -> tuple[str, str]:
    """A self-signed EC certificate valid for 127.0.0.1 and localhost: (cert.pem, key.pem) paths."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, tuple[str, str]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: _openssl_cert(directory, name) for name in ("server", "client", "stranger")}


def _raw(channel: grpc.Channel, method: str):
    return channel.unary_unary(f"/ultramem.v1.MemoryShard/{method}")  # bytes in, bytes out


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    """The status code `call(*args, **kwargs)` ends with (OK if it returns)."""
    try:
        result = call(*args, **kwargs)
        if not isinstance(result, bytes):
            list(result)  # a streaming answer: read it to the end
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


# --- binding ----------------------------------------------------------------------------------


def test_server_listens_only_on_loopback_by_default(served) -> None:
    assert _listening(served.port) == {"127.0.0.1"}


def test_server_listens_only_on_the_configured_host() -> None:
    s = Served(ServerConfig(host="127.0.0.2"))
    try:
        assert _listening(s.port) == {"127.0.0.2"} and s.address == f"127.0.0.2:{s.port}"
        with Client([s.address]) as client:
            assert client.gather("mem", np.array([5])).shape == (1, 8)
    finally:
        s.stop()


def test_client_opens_no_listening_socket(served) -> None:
    before = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    with Client([served.address]) as client:
        client.gather("mem", np.array([1]))
        after = {c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN}
    assert after == before


# --- shared-secret token ----------------------------------------------------------------------


@pytest.mark.parametrize("served", [ServerConfig(token=TOKEN)], indirect=True)
def test_every_method_and_reflection_refuse_calls_without_the_right_token(served) -> None:
    wrong = [(), (("authorization", "Bearer nope"),), (("authorization", TOKEN),),
             (("authorization", f"bearer {TOKEN}"),), (("authorization", f"Bearer {TOKEN[:-1]}"),),
             (("authorization", f"Bearer {TOKEN}x"),), (("x-token", f"Bearer {TOKEN}"),)]
    with grpc.insecure_channel(served.address) as channel:
        for method in METHODS:
            for metadata in wrong:
                assert _code(_raw(channel, method), b"", timeout=5, metadata=metadata) \
                    == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
            right = _code(_raw(channel, method), b"", timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert right != grpc.StatusCode.UNAUTHENTICATED  # OK, or INVALID_ARGUMENT for an empty request
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        assert _code(reflect, iter(ask), timeout=5) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(reflect, iter(ask), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),)) \
            == grpc.StatusCode.OK


@settings(max_examples=60, deadline=None)
@given(guess=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40))
def test_no_guessed_token_authenticates(guess: str) -> None:
    if guess == TOKEN:
        return
    s = _TOKEN_SERVER
    with grpc.insecure_channel(s.address) as channel:
        code = _code(_raw(channel, "Info"), b"", timeout=5, metadata=(("authorization", f"Bearer {guess}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED


_TOKEN_SERVER: Served


@pytest.fixture(scope="module", autouse=True)
def _token_server():
    global _TOKEN_SERVER  # hypothesis tests cannot take function-scoped fixtures
    _TOKEN_SERVER = Served(ServerConfig(token=TOKEN))
    yield
    _TOKEN_SERVER.stop()


def test_client_with_the_token_works_and_without_it_is_unauthenticated() -> None:
    address = _TOKEN_SERVER.address
    with Client([address], config=ClientConfig(token=TOKEN)) as client:
        assert client.gather("mem", np.array([2])).shape == (1, 8)
    with pytest.raises(UnauthenticatedError) as info:
        Client([address], config=ClientConfig(token="wrong-token"))
    assert address in str(info.value) and "wrong-token" not in str(info.value)


def test_no_secret_appears_in_logs_reprs_or_errors(caplog, certs) -> None:
    caplog.set_level(logging.DEBUG)
    key_text = Path(certs["server"][1]).read_text()
    config = ServerConfig(token=TOKEN, tls_cert=certs["server"][0], tls_key=certs["server"][1])
    s = Served(config)
    try:
        client_config = ClientConfig(token=TOKEN, tls_ca=certs["server"][0])
        with Client([s.address], config=client_config) as client:
            client.gather("mem", np.array([1, 2]))
            client.push("mem", np.array([1]), np.ones((1, 8), np.float32), lr=0.1, step=0)
            client.gather("mem", np.array([1]), min_step=0)
        with pytest.raises(ShardError) as info:  # a failing call logs and raises
            Client([s.address], config=ClientConfig(token=TOKEN + "-not", tls_ca=certs["server"][0],
                                                    max_attempts=1))
        texts = [str(info.value), repr(config), repr(client_config), str(config), str(client_config)]
    finally:
        s.stop()
    texts += [r.getMessage() for r in caplog.records] + [str(r.args) for r in caplog.records]
    texts += [caplog.text]
    assert caplog.records  # the run did log (at DEBUG and INFO)
    for text in texts:
        assert TOKEN not in text and key_text.strip().splitlines()[1] not in text


# --- TLS --------------------------------------------------------------------------------------


def test_tls_server_answers_tls_clients_and_refuses_plaintext_and_untrusted_ones(certs) -> None:
    cert, key = certs["server"]
    s = Served(ServerConfig(tls_cert=cert, tls_key=key))
    try:
        assert s.server.tls and _listening(s.port) == {"127.0.0.1"}
        with Client([s.address], config=ClientConfig(tls_ca=cert)) as client:
            rows = np.array([0, 13, 63])
            want = np.stack([init_partition_values(SPEC, r % 4)[r // 4] for r in rows])
            np.testing.assert_array_equal(client.gather("mem", rows), want)
        fast = {"timeout_s": 2.0, "max_attempts": 1}
        for config in (ClientConfig(**fast), ClientConfig(tls_ca=certs["stranger"][0], **fast)):
            with pytest.raises(ShardError, match="UNAVAILABLE"):
                Client([s.address], config=config)
    finally:
        s.stop()


def test_mutual_tls_requires_a_client_certificate_signed_by_the_configured_ca(certs) -> None:
    cert, key = certs["server"]
    s = Served(ServerConfig(tls_cert=cert, tls_key=key, tls_client_ca=certs["client"][0]))
    try:
        good = ClientConfig(tls_ca=cert, tls_cert=certs["client"][0], tls_key=certs["client"][1])
        with Client([s.address], config=good) as client:
            assert client.gather("mem", np.array([7])).shape == (1, 8)
        fast = {"timeout_s": 2.0, "max_attempts": 1}
        for bad in (ClientConfig(tls_ca=cert, **fast),
                    ClientConfig(tls_ca=cert, tls_cert=certs["stranger"][0], tls_key=certs["stranger"][1], **fast)):
            with pytest.raises(ShardError, match="UNAVAILABLE"):
                Client([s.address], config=bad)
    finally:
        s.stop()


def test_tls_settings_are_checked_when_built(tmp_path: Path, certs) -> None:
    not_pem = tmp_path / "x.pem"
    not_pem.write_text("hello")
    cert, key = certs["server"]
    with pytest.raises(ConfigError, match="together"):
        ServerConfig(tls_cert=cert)
    with pytest.raises(ConfigError, match="tls_client_ca needs"):
        ServerConfig(tls_client_ca=cert)
    with pytest.raises(ConfigError, match="together"):
        ClientConfig(tls_ca=cert, tls_key=key)
    with pytest.raises(ConfigError, match="needs client.tls_ca"):
        ClientConfig(tls_cert=cert, tls_key=key)
    with pytest.raises(ConfigError, match="not a PEM"):
        create_server(_shard(), ServerConfig(tls_cert=str(not_pem), tls_key=key))
    with pytest.raises(ConfigError, match="cannot read client.tls_ca"):
        Client(["127.0.0.1:1"], config=ClientConfig(tls_ca=str(tmp_path / "missing.pem")))


# --- read-only shards -------------------------------------------------------------------------


def test_read_only_shard_refuses_every_write_and_changes_nothing() -> None:
    s = Served(None, read_only=True)
    try:
        before = snapshot(s.shard)
        push = pb.PushGradientsRequest(
            header=pb.PushHeader(table="mem", worker_id=1, seq=1, step=0, lr=0.1),
            rows=wire.encode(np.array([1, 2])), grads=wire.encode(np.ones((2, 8), np.float32)))
        backward = pb.PooledBackwardRequest(
            header=pb.PushHeader(table="mem", worker_id=1, seq=2, step=0, lr=0.1),
            rows=wire.encode(np.array([1])), projector=wire.encode(np.array([0])), token=wire.encode(np.array([0])),
            scores=wire.encode(np.ones((1, 2), np.float32)), grad_out=wire.encode(np.ones((1, 1, 8), np.float32)),
            tokens_touched=wire.encode(np.array([0])), num_projectors=1)
        with grpc.insecure_channel(s.address) as channel:
            for method, request in (("PushGradients", push), ("PooledBackward", backward)):
                assert _code(_raw(channel, method), request.SerializeToString(), timeout=5) == \
                    grpc.StatusCode.PERMISSION_DENIED
        with Client([s.address]) as client:
            with pytest.raises(PermissionDeniedError, match="read-only"):
                client.pooled_backward("mem", np.array([1]), np.array([0]), np.array([0]),
                                       np.ones((1, 2), np.float32), np.ones((1, 1, 8), np.float32), lr=0.1, step=0)
            assert client.gather("mem", np.array([1])).shape == (1, 8)  # reads still served
        assert snapshot(s.shard) == before
    finally:
        s.stop()


# --- the CLI ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_shard_serve_with_tls_and_token_binds_loopback_and_serves_only_tls_clients(tmp_path, certs) -> None:
    spec = TableSpec(name="mem", rows=40, dim=8, num_partitions=4, optimizer="sgd")
    create_table(tmp_path / "mem", spec)
    (tmp_path / "token").write_text(TOKEN + "\n")
    cert, key = certs["server"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "shard", "serve", "--table", str(tmp_path / "mem"),
         "--token-file", str(tmp_path / "token"), "--tls-cert", cert, "--tls-key", key],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on 127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else line
        address = line.removeprefix("listening on ")
        assert _listening(int(address.rsplit(":", 1)[1]), proc.pid) == {"127.0.0.1"}
        with Client([address], config=ClientConfig(token=TOKEN, tls_ca=cert)) as client:
            assert client.gather("mem", np.array([0, 39])).shape == (2, 8)
        with pytest.raises(ShardError, match="UNAVAILABLE"):
            Client([address], config=ClientConfig(token=TOKEN, timeout_s=2.0, max_attempts=1))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        stderr = proc.stderr.read()
    assert TOKEN not in stderr
