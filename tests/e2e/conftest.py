"""Shared pieces of the end-to-end tests: the tiny run config, a local reference run, state checks, and
simulated multi-node clusters (ray.cluster_utils.Cluster in a child process)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model_workers import checkpoint_io
from model_workers.trainer import LocalTrainer
from orchestration.config import RunConfig, load_config, to_dict
from storage.checkpoint import table_path
from storage.table_store import open_table

STEPS = 20

_CLUSTER_PRELUDE = """
import dataclasses, json, os, sys
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray.cluster_utils import Cluster
from orchestration.config import load_config
from orchestration.distributed import DistributedTrainer

out = sys.argv[1]
STORE = {store_mb} * 1024 * 1024
cluster = Cluster(initialize_head=True, head_node_args={{
    "num_cpus": 2, "resources": {{"model_worker": 1}}, "include_dashboard": False,
    "object_store_memory": STORE, "node_ip_address": "127.0.0.1"}})
memory_nodes = [cluster.add_node(num_cpus=0, resources={{"memory_shard": {units}}}, object_store_memory=STORE,
                                 node_ip_address="127.0.0.1") for _ in range({nodes})]
cluster.wait_for_nodes()
try:
{body}
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def run_cluster_job(body: str, out: Path, *, memory_nodes: int, shard_units: int, store_mb: int = 80,
                    timeout: float = 420) -> dict:
    """Run `body` in a child process on a simulated cluster of one compute node (2 CPUs, resource
    model_worker) and `memory_nodes` memory nodes (no CPUs, `shard_units` of memory_shard each), all
    on 127.0.0.1 (a process holds one Ray connection; the suite shares the session's local Ray).
    `body` sees `cluster`, `memory_nodes`, `out`, `load_config`, `DistributedTrainer`; its last
    stdout line is a JSON report, returned."""
    job = _CLUSTER_PRELUDE.format(store_mb=store_mb, units=shard_units, nodes=memory_nodes,
                                  body=textwrap.indent(textwrap.dedent(body).strip(), "    "))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", job, str(out)], env=env, cwd=Path(__file__).parents[2],
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tiny_config(steps: int = STEPS, overrides: tuple[str, ...] = (), **cluster: object) -> RunConfig:
    """The tiny preset for `steps` steps, checkpoints every 10, no evaluation; more `--set` style
    overrides, and cluster fields overridden."""
    cfg = load_config(preset="tiny", overrides=[f"train.max_steps={steps}", "train.checkpoint_every=10",
                                                "train.eval_every=0", "train.keep_checkpoints=0", *overrides])
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **cluster))


def final_state(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
    """(dense model state, {table/partition/array: array}) of a complete checkpoint."""
    dense = checkpoint_io.read_dense(ckpt)["model"]
    tables = {}
    for name in checkpoint_io.read_manifest(ckpt)["tables"]:
        store = open_table(table_path(ckpt, name))
        for p in range(store.spec.num_partitions):
            for key, arr in store.read_partition(p).items():
                tables[f"{name}/{p}/{key}"] = np.asarray(arr)
    return dense, tables


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same dense parameters and value tables (with optimizer state)."""
    dense_a, tables_a = final_state(a)
    dense_b, tables_b = final_state(b)
    assert dense_a.keys() == dense_b.keys() and tables_a.keys() == tables_b.keys()
    for k in dense_a:
        torch.testing.assert_close(dense_a[k], dense_b[k], rtol=1e-5, atol=1e-6, msg=k)
    for k in tables_a:
        np.testing.assert_allclose(tables_a[k], tables_b[k], rtol=1e-5, atol=1e-6, err_msg=k)


def local_run(cfg: RunConfig, run_dir: Path) -> Path:
    """The final checkpoint of `ultramem train --local` with `cfg` (a reference run)."""
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, run_dir, config=to_dict(cfg), progress=False)
    return trainer.run().checkpoint


@pytest.fixture(scope="session")
def local_tiny_run(tmp_path_factory) -> Path:
    """The final checkpoint of `ultramem train --local` on the tiny config (the reference)."""
    return local_run(tiny_config(), tmp_path_factory.mktemp("local"))


@pytest.fixture(scope="session")
def e2e() -> SimpleNamespace:
    """This module's helpers for test modules (importlib import mode gives tests no package to import)."""
    return SimpleNamespace(tiny_config=tiny_config, final_state=final_state, assert_same_state=assert_same_state,
                           run_cluster_job=run_cluster_job, local_run=local_run, STEPS=STEPS)
