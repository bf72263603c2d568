"""A real multi-host cluster, built from Linux network namespaces (README "A real cluster", issue 16).

Each "host" is a network namespace with its own loopback and one address on a private link that
exists only inside the test (10.231.<n>.0/24 on a bridge in the head namespace, one veth pair per
memory node): traffic can reach nothing but these namespaces. Each node is started the way the
README says, `ultramem cluster up ... --host ADDR` inside its namespace (its own Ray temp dir, a
Ray token of its own), and `ultramem` is driven from the head namespace. Nothing here uses
`ray stop` (it ends every Ray process of the machine): every process is ended by PID
(`ip netns pids`), and the namespaces are deleted at the end, also on failure.

Needs root (network namespaces); elsewhere the tests skip saying so. CI runs as root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
STEPS = 20  # as tests/e2e/conftest.py's reference run (local_tiny_run)
TRAIN = ["--preset", "tiny", "--set", f"train.max_steps={STEPS}", "--set", "train.checkpoint_every=10",
         "--set", "train.eval_every=0", "--set", "train.keep_checkpoints=0", "--workers", "1", "--no-progress"]

pytestmark = [pytest.mark.slow]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _why_no_namespaces() -> str | None:
    """None if this process can build network namespaces, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"umprobe{secrets.token_hex(3)}"
    probe = _ip("netns", "add", name, check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class Hosts:
    """Namespaces joined by a private link, and the Ray nodes started in them; `destroy()` ends it all."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.subnet = f"10.231.{int(tag, 16) % 250 + 1}"
        self.names: dict[str, str] = {}  # host -> namespace
        self.addresses: dict[str, str] = {}  # host -> its address on the link
        self.tag = tag
        self.tmp = Path(tempfile.mkdtemp(prefix="um-", dir="/tmp"))  # short: Ray's socket paths live under it
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
                        PYTHONPATH=str(REPO))
        self.procs: list[subprocess.Popen] = []

    # --- network -------------------------------------------------------------------------------
    def add(self, host: str, *, link: bool = True) -> str:
        """A namespace for `host` with loopback and (link) an address on the link; returns the address."""
        ns = f"um{self.tag}{host}"[:15]
        _ip("netns", "add", ns)
        self.names[host] = ns
        _ip("-n", ns, "link", "set", "lo", "up")
        (self.tmp / host).mkdir()
        if not link:
            return "127.0.0.1"
        n = len(self.addresses) + 1
        addr = f"{self.subnet}.{n}"
        if not self.addresses:  # the head: a bridge the memory nodes' veth pairs join
            _ip("-n", ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "br0")
            _ip("-n", ns, "link", "set", "br0", "up")
        else:
            head = self.names["head"]
            _ip("link", "add", f"p{n}", "netns", head, "type", "veth", "peer", "name", "eth1", "netns", ns)
            _ip("-n", head, "link", "set", f"p{n}", "master", "br0")
            _ip("-n", head, "link", "set", f"p{n}", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth1")
            _ip("-n", ns, "link", "set", "eth1", "up")
        self.addresses[host] = addr
        return addr

    def route_nowhere(self, host: str) -> None:
        """Give `host` a second interface and a default route into it (packets stop there): a machine
        whose routable address Ray would pick as its node IP."""
        ns = self.names[host]
        _ip("-n", ns, "link", "add", "e0", "type", "veth", "peer", "name", "e1")
        _ip("-n", ns, "addr", "add", f"{self.subnet}.200/24", "dev", "e0")
        for dev in ("e0", "e1"):
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", ns, "route", "add", "default", "via", f"{self.subnet}.201", "dev", "e0")

    # --- processes -----------------------------------------------------------------------------
    def _cmd(self, host: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
        env = {**self.env, "TMPDIR": str(self.tmp / host)}
        return ["ip", "netns", "exec", self.names[host], *args], env

    def run(self, host: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        cmd, env = self._cmd(host, args)
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, host: str, args: list[str]) -> subprocess.Popen:
        cmd, env = self._cmd(host, args)
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def ultramem(self, host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        done = self.run(host, [PY, "-m", "orchestration.cli", *args], timeout=timeout)
        assert done.returncode == 0, (f"ultramem {' '.join(args)} on {host}:\n{done.stdout[-3000:]}\n"
                                      f"{done.stderr[-6000:]}")
        return done

    def python(self, host: str, code: str, timeout: float = 120) -> str:
        done = self.run(host, [PY, "-c", code], timeout=timeout)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    def node_up(self, host: str, *flags: str) -> None:
        """`ultramem cluster up --host ADDR ...` in `host`'s namespace (joining the head unless it is it)."""
        join = [] if host == "head" else ["--address", f"{self.addresses['head']}:6379"]
        self.ultramem(host, "cluster", "up", "--host", self.addresses[host], "--temp-dir", str(self.tmp / host),
                      *join, *flags, timeout=120)

    def wait_resources(self, resource: str, total: float, timeout: float = 60) -> None:
        """Poll the head until the cluster has `total` units of `resource` (a node registered)."""
        code = (f"import ray, json; ray.init(address='{self.addresses['head']}:6379', log_to_driver=False); "
                "print(json.dumps(ray.cluster_resources()))")
        deadline = time.monotonic() + timeout
        while True:
            got = json.loads(self.python("head", code).strip().splitlines()[-1])
            if got.get(resource, 0) >= total:
                return
            assert time.monotonic() < deadline, f"cluster has {got} after {timeout} s, wanted {total} {resource}"

    def pids(self, host: str) -> list[int]:
        out = _ip("netns", "pids", self.names[host], check=False).stdout
        return [int(p) for p in out.split()]

    def destroy(self) -> None:
        """End every process in our namespaces by PID, delete the namespaces and the temp dir."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for _ in range(3):  # a dying Ray node may still fork once
            for host in self.names:
                for pid in self.pids(host):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self.procs:
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        for ns in self.names.values():
            _ip("netns", "del", ns, check=False)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts():
    """A head (model_worker 1) and one memory node (memory_shard 2), each started with `cluster up`."""
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    net = Hosts()
    try:
        net.add("head")
        net.add("mem1")
        net.node_up("head", "--model-workers", "1")
        net.node_up("mem1", "--memory-shards", "2")
        net.wait_resources("memory_shard", 2)
        yield net
    finally:
        net.destroy()


def _field(stdout: str, name: str) -> str:
    """The value of the `name:` line of `ultramem train`'s summary."""
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith(f"{name}:"))


def _shard_hosts(stdout: str) -> set[str]:
    return {a.rsplit(":", 1)[0] for a in _field(stdout, "shards").split(", ")}


def test_sync_training_with_shards_on_the_memory_node_equals_local(hosts, e2e, local_tiny_run, tmp_path):
    head = f"{hosts.addresses['head']}:6379"
    done = hosts.ultramem("head", "train", "--address", head, *TRAIN, "--shards", "2", "--consistency", "sync",
                          "--out", str(tmp_path / "run"))
    assert _shard_hosts(done.stdout) == {hosts.addresses["mem1"]}  # listened on the memory node's address
    e2e.assert_same_state(Path(_field(done.stdout, "checkpoint")), local_tiny_run)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait(what: str, ready, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Poll `ready()` until true; fail if `proc` ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before {what}:\n{proc.communicate()[1][-4000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def _actor_pids(hosts: Hosts, host: str, actor: str) -> list[int]:
    """PIDs of the Ray actor processes `ray::<actor>` in `host`'s namespace."""
    pids = []
    for pid in hosts.pids(host):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if title.startswith(f"ray::{actor}"):
            pids.append(pid)
    return pids


def test_the_memory_nodes_shard_process_sigkilled_mid_run_loses_nothing(hosts, e2e, local_tiny_run, tmp_path):
    head, run = f"{hosts.addresses['head']}:6379", tmp_path / "run"
    # chunks of 2 steps (log_every): progress is visible early, the kill lands well before the end
    train = hosts.start("head", [PY, "-m", "orchestration.cli", "train", "--address", head, *TRAIN, "--shards", "2",
                                 "--consistency", "sync", "--set", "train.log_every=2", "--out", str(run)])
    _wait("training progress", lambda: any(m.get("kind") == "train" for m in _metrics(run)), train)
    victims = _actor_pids(hosts, "mem1", "ShardActor")
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)
    out, err = train.communicate(timeout=300)
    assert train.returncode == 0, err[-4000:]
    restarts = [m for m in _metrics(run) if m.get("kind") == "shard_restart"]
    assert restarts and all(r["address"].startswith(hosts.addresses["mem1"] + ":") for r in restarts)
    assert victims[0] not in _actor_pids(hosts, "mem1", "ShardActor")
    e2e.assert_same_state(Path(_field(out, "checkpoint")), local_tiny_run)  # nothing lost, nothing twice


def _certificate(directory: Path, name: str, ips: list[str]) -> tuple[str, str]:
    """A self-signed EC certificate for `ips`: (cert.pem, key.pem)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    sans = ",".join(f"IP:{ip}" for ip in ips)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName={sans}"], check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


_PROBE = """
import json, sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from param_server.auth import bearer_metadata
from protos.ultramem.v1 import memory_pb2 as pb, memory_pb2_grpc as pb_grpc
address, ca, token = sys.argv[1:4]
def code(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name
roots = open(ca, "rb").read()
plain = grpc.insecure_channel(address)
tls = grpc.secure_channel(address, grpc.ssl_channel_credentials(roots))
info = lambda ch, md=(): pb_grpc.MemoryShardStub(ch).Info(pb.InfoRequest(), metadata=md, timeout=10)
print(json.dumps({
    "plaintext": code(lambda: info(plain)),
    "tls_no_token": code(lambda: info(tls)),
    "tls_wrong_token": code(lambda: info(tls, bearer_metadata("not-" + token))),
    "tls_health": code(lambda: health_pb2_grpc.HealthStub(tls).Check(health_pb2.HealthCheckRequest(), timeout=10)),
}))
"""

_LISTENING = """
import json, psutil
out = []
for c in psutil.net_connections("tcp"):
    if c.status == psutil.CONN_LISTEN and c.pid:
        try:
            title = psutil.Process(c.pid).cmdline()[0]
        except (psutil.Error, IndexError):
            title = "?"
        out.append([c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, title])  # v4-mapped on a v6 socket
print(json.dumps(out))
"""


def test_serve_answers_with_its_shards_on_the_memory_node_and_refuses_clients_without_the_token(
        hosts, local_tiny_run, tmp_path):
    cert, key = _certificate(tmp_path, "shards", [hosts.addresses["mem1"]])
    head_ip = hosts.addresses["head"]
    serve = hosts.start("head", [PY, "-m", "orchestration.cli", "serve", "--checkpoint", str(local_tiny_run),
                                 "--address", f"{head_ip}:6379", "--local-shards", "2", "--host", head_ip,
                                 "--port", "18000", "--shard-tls-cert", cert, "--shard-tls-key", key,
                                 "--shard-tls-ca", cert])
    lines: list[str] = []
    _wait("serve's shard line", lambda: bool(lines.append(serve.stdout.readline()) or lines[-1].startswith("shards:")),
          serve, timeout=240)
    assert lines[-2].startswith("listening on http://")
    addresses = lines[-1].split(":", 1)[1].strip().split(", ")
    assert {a.rsplit(":", 1)[0] for a in addresses} == {hosts.addresses["mem1"]}

    ask = ("import json, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
           f"'http://{head_ip}:18000/v1/completions', data=json.dumps({{'prompt': 'The', 'max_tokens': 8}}).encode(),"
           " headers={'Content-Type': 'application/json'}), timeout=120); print(json.dumps(json.load(r)))")
    answer = json.loads(hosts.python("head", ask).strip().splitlines()[-1])
    assert answer["usage"]["completion_tokens"] > 0 and answer["choices"][0]["text"]

    # a client on the head without the job's token: refused; plaintext: no answer at all; health stays open
    probe = json.loads(hosts.python("head", _PROBE.replace("sys.argv[1:4]", repr([addresses[0], cert, "x"])))
                       .strip().splitlines()[-1])
    assert probe == {"plaintext": "UNAVAILABLE", "tls_no_token": "UNAUTHENTICATED",
                     "tls_wrong_token": "UNAUTHENTICATED", "tls_health": "OK"}
    # the memory node: each shard listens on the node's address only, never on a wildcard
    listening = json.loads(hosts.python("mem1", _LISTENING).strip().splitlines()[-1])
    shard_ports = {int(a.rsplit(":", 1)[1]) for a in addresses}
    assert {(ip, port) for ip, port, _ in listening if port in shard_ports} == {
        (hosts.addresses["mem1"], p) for p in shard_ports}
    serve.send_signal(signal.SIGTERM)
    serve.communicate(timeout=60)
    assert serve.returncode == 0


def test_shards_scale_onto_a_second_memory_node_while_training_with_mutual_tls(hosts, tmp_path):
    hosts.add("mem2")
    hosts.node_up("mem2", "--memory-shards", "2")
    hosts.wait_resources("memory_shard", 4)
    mem = [hosts.addresses["mem1"], hosts.addresses["mem2"]]
    cert, key = _certificate(tmp_path, "shards", mem)
    client_cert, client_key = _certificate(tmp_path, "workers", [hosts.addresses["head"]])
    ca = tmp_path / "ca.pem"  # self-signed: each certificate is its own root
    ca.write_text(Path(cert).read_text() + Path(client_cert).read_text())
    tls = [f'cluster.tls_cert="{cert}"', f'cluster.tls_key="{key}"', f'cluster.tls_ca="{ca}"',
           f'cluster.tls_client_cert="{client_cert}"', f'cluster.tls_client_key="{client_key}"']
    head, run = f"{hosts.addresses['head']}:6379", tmp_path / "run"
    train = hosts.start("head", [PY, "-m", "orchestration.cli", "train", "--address", head, *TRAIN, "--shards", "2",
                                 "--set", "train.max_steps=80", "--set", "train.log_every=2", "--out", str(run),
                                 *[a for t in tls for a in ("--set", t)]])
    _wait("training progress", lambda: any(m.get("kind") == "train" for m in _metrics(run)), train)
    # the model worker is paused mid-run while the driver rescales (a rescale needs only the driver,
    # the coordinator and the shards), so the rescale lands while training runs however slow the machine
    workers = _actor_pids(hosts, "head", "ModelWorker")
    assert workers
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        scaled = hosts.ultramem("head", "shards", "scale", "--to", "4", "--address", head)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert scaled.stdout.startswith("now 4 shards")
    out, err = train.communicate(timeout=300)
    assert train.returncode == 0, err[-4000:]
    assert _field(out, "steps") == "80"
    addresses = _field(out, "shards").split(", ")
    assert sorted(a.rsplit(":", 1)[0] for a in addresses) == sorted(mem * 2)  # two on each memory node
    rescaled = [m["step"] for m in _metrics(run) if m.get("kind") == "rescale"]
    assert len(rescaled) == 1 and rescaled[0] < 80  # while training


_EMBEDDED = """
import json, psutil, tempfile, ray
from orchestration.cluster import Cluster, ClusterConfig
from param_server.actor import ShardActor, ShardActorConfig
from storage.layout import TableSpec
from storage.table_store import create_table
path = tempfile.mkdtemp() + "/t"
create_table(path, TableSpec(name="t", rows=64, dim=4, num_partitions=2))
with Cluster(ClusterConfig(num_cpus=1)):
    shard = ray.remote(ShardActor).options(num_cpus=0).remote(
        ShardActorConfig(shard_id=0, table_paths={"t": path}, partitions=(0, 1), bind="node"))
    address = ray.get(shard.address.remote())
    sockets = sorted({(c.laddr.ip.removeprefix("::ffff:"), psutil.Process(c.pid).name() if c.pid else "?")
                      for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN})
    print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "shard": address,
                      "listening": sockets}))
"""


def test_the_embedded_default_listens_on_loopback_only_on_a_machine_with_a_routable_interface():
    why = _why_no_namespaces()
    if why:
        pytest.skip(why)
    net = Hosts()
    try:
        net.add("solo", link=False)
        net.route_nowhere("solo")
        report = json.loads(net.python("solo", _EMBEDDED, timeout=240).strip().splitlines()[-1])
    finally:
        net.destroy()
    assert report["nodes"] == ["127.0.0.1"] and report["shard"].startswith("127.0.0.1:")
    assert report["listening"] and {ip for ip, _ in report["listening"]} <= {"127.0.0.1", "::1"}, report
