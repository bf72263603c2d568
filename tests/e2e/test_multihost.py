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
    def add(self, host: str) -> str:
        """A namespace for `host` with loopback and an address on the link; returns the address."""
        ns = f"um{self.tag}{host}"[:15]
        _ip("netns", "add", ns)
        self.names[host] = ns
        _ip("-n", ns, "link", "set", "lo", "up")
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
        (self.tmp / host).mkdir()
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
        assert done.returncode == 0, f"ultramem {' '.join(args)} on {host}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
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
        code = ("import ray, json; ray.init(address='%s:6379', log_to_driver=False); "
                "print(json.dumps(ray.cluster_resources()))") % self.addresses["head"]
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
