"""Shared pieces of the end-to-end tests: the tiny run config, a local reference run, state checks."""

from __future__ import annotations

import dataclasses
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


def tiny_config(steps: int = STEPS, **cluster: object) -> RunConfig:
    """The tiny preset for `steps` steps, checkpoints every 10, no evaluation; cluster fields overridden."""
    cfg = load_config(preset="tiny", overrides=[f"train.max_steps={steps}", "train.checkpoint_every=10",
                                                "train.eval_every=0", "train.keep_checkpoints=0"])
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


@pytest.fixture(scope="session")
def local_tiny_run(tmp_path_factory) -> Path:
    """The final checkpoint of `ultramem train --local` on the tiny config (the reference)."""
    cfg = tiny_config()
    run_dir = tmp_path_factory.mktemp("local")
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, run_dir, config=to_dict(cfg), progress=False)
    return trainer.run().checkpoint


@pytest.fixture(scope="session")
def e2e() -> SimpleNamespace:
    """This module's helpers for test modules (importlib import mode gives tests no package to import)."""
    return SimpleNamespace(tiny_config=tiny_config, final_state=final_state, assert_same_state=assert_same_state,
                           STEPS=STEPS)
