"""`ultramem table create|inspect` and `ultramem shard serve` as subprocesses (DESIGN §7.1).

The contract scripts rely on: exit 0 / 2 with one line on stderr, `listening on HOST:PORT` as the
first stdout line, clean stop on SIGTERM (exit 0). Every process started here is stopped by PID.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from param_server.client import Client, ClientConfig
from param_server.errors import PermissionDeniedError, ShardError
from storage.chunk_io import open_chunk_io
from storage.layout import init_partition_values
from storage.table_store import open_table

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "orchestration.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


class ServedShard:
    """`ultramem shard serve ...` in a subprocess; `address` from its first stdout line."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([*CLI, "shard", "serve", *args], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline().rstrip("\n")
        if not self.first_line.startswith("listening on "):
            self.stop()
            raise AssertionError(f"no listening line: {self.first_line!r}; stderr: {self.proc.stderr.read()}")
        self.address = self.first_line.removeprefix("listening on ")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tables") / "mem"
    result = _run("table", "create", str(path), "--rows", "300", "--dim", "8", "--partitions", "8",
                  "--optimizer", "sgd", "--init-std", "0.5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "created table mem" in result.stdout and "300 rows x 8 float32" in result.stdout
    return path


def test_table_create_writes_a_table_with_the_given_spec(table: Path) -> None:
    spec = open_table(table).spec
    assert (spec.rows, spec.dim, spec.num_partitions, spec.optimizer, spec.init_std, spec.seed) == \
        (300, 8, 8, "sgd", 0.5, 3)


@pytest.mark.parametrize("raw", [False, True])
def test_table_create_raw_stores_every_array_as_raw_chunks(tmp_path: Path, raw: bool) -> None:
    path = tmp_path / "t"
    result = _run("table", "create", str(path), "--rows", "64", "--dim", "4", "--partitions", "2",
                  *(["--raw"] if raw else []))
    assert result.returncode == 0, result.stderr
    engines = open_chunk_io(open_table(path)).engines
    assert engines["values"] == "raw"
    assert all(engine == "raw" for engine in engines.values()) == raw, engines


def test_table_inspect_prints_spec_partitions_bytes_and_state(table: Path) -> None:
    text = _run("table", "inspect", str(table))
    assert text.returncode == 0
    assert "num_partitions   8" in text.stdout and "bytes values" in text.stdout and "optimizer state" in text.stdout
    info = json.loads(_run("table", "inspect", str(table), "--json").stdout)
    assert info["spec"]["rows"] == 300 and info["bytes"]["values"] == 8 * 38 * 8 * 4
    assert info["optimizer_state"]["rows_touched"] == 0


@pytest.mark.parametrize("args", [
    ("table", "inspect", "/nonexistent/table"),
    ("table", "create", "{table}", "--rows", "10", "--dim", "4"),  # exists already
    ("table", "create", "{tmp}/bad", "--rows", "0", "--dim", "4"),
    ("shard", "serve", "--table", "{table}", "--partitions", "5-99"),
    ("shard", "serve", "--table", "/nonexistent/table"),
])
def test_user_mistakes_exit_2_with_one_line(table: Path, tmp_path: Path, args) -> None:
    result = _run(*(a.format(table=table, tmp=tmp_path) for a in args))
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("ultramem: error: ")
    assert result.stdout == ""


@pytest.mark.slow
def test_shard_serve_announces_serves_and_stops_cleanly_on_sigterm(table: Path) -> None:
    shard = ServedShard("--table", str(table), "--partitions", "0-3", "--port", "0")
    try:
        host, port = shard.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0 and shard.first_line == f"listening on {shard.address}"
        with Client([shard.address]) as client:
            assert client.info()[0]["tables"]["mem"]["partitions"] == [0, 1, 2, 3]
            rows = np.array([0, 9, 299 - 299 % 8 + 3])  # partitions 0, 1, 3
            want = np.stack([init_partition_values(open_table(table).spec, r % 8)[r // 8] for r in rows])
            np.testing.assert_array_equal(client.gather("mem", rows), want)
            client.push("mem", rows, np.ones((3, 8), np.float32), lr=1.0, step=0)
            np.testing.assert_allclose(client.gather("mem", rows, min_step=0), want - 1.0, rtol=1e-6)
            with pytest.raises(ShardError, match="partitions"):
                client.gather("mem", np.array([4]))  # partition 4 is nobody's
    finally:
        assert shard.stop() == 0


@pytest.mark.slow
def test_read_only_shard_with_token_refuses_pushes_and_strangers(table: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hunter2\n")
    shard = ServedShard("--table", str(table), "--read-only", "--token-file", str(token))
    try:
        with pytest.raises(ShardError, match="bearer"):
            Client([shard.address])
        with Client([shard.address], config=ClientConfig(token="hunter2")) as client:
            assert client.gather("mem", np.array([1])).shape == (1, 8)
            with pytest.raises(PermissionDeniedError, match="read-only"):
                client.push("mem", np.array([1]), np.ones((1, 8), np.float32), lr=1.0, step=0)
    finally:
        assert shard.stop() == 0
