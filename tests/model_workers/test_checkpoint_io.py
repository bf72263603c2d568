"""A run's checkpoint: dense + AdamW + tables + π + config, manifest last (model_workers/checkpoint_io.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model_workers import checkpoint_io
from model_workers.model import LanguageModel, ModelConfig
from model_workers.trainer import TrainConfig, make_optimizer, train_step
from storage.checkpoint import MANIFEST, read_manifest
from storage.errors import CheckpointError
from storage.table_store import open_table

TRAIN = TrainConfig(max_steps=10, warmup_steps=1, autocast="off")


def _model_cfg(**memory: int) -> ModelConfig:
    from model_workers.ultramem import MemoryConfig

    fields = {"num_keys": 8, "d_k": 16, "d_v": 32, "heads": 2, "topk": 4, "placement": "0:1",
              "num_partitions": 4} | memory
    mem = MemoryConfig(**fields)
    return ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, memory=mem)


def _trained(cfg: ModelConfig, steps: int = 2) -> tuple[LanguageModel, torch.optim.Optimizer]:
    model = LanguageModel(cfg)
    opt = make_optimizer(model, TRAIN)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=gen)
        train_step(model, opt, tokens[:, :-1], tokens[:, 1:], step=step, cfg=TRAIN, max_steps=TRAIN.max_steps)
    return model, opt


def _save(root: Path, step: int, model: LanguageModel, opt: torch.optim.Optimizer, **kw) -> Path:
    return checkpoint_io.save_checkpoint(root, step, model=model, backend=model.backend, optimizer=opt,
                                         train_state={"step": step, "rng": {"torch": torch.get_rng_state()}},
                                         config={"model": {"d_model": 32}}, tokenizer_json='{"t": 1}', **kw)


def test_checkpoint_round_trips_dense_adamw_tables_and_permutation(tmp_path: Path) -> None:
    cfg = _model_cfg()
    model, opt = _trained(cfg)
    path = _save(tmp_path, 2, model, opt)

    fresh = LanguageModel(replace(cfg, init_seed=99))  # different init, different π
    fresh_opt = make_optimizer(fresh, TRAIN)
    state = checkpoint_io.load_checkpoint(path, fresh, backend=fresh.backend, optimizer=fresh_opt)

    assert state["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert any("perm" in k for k in model.state_dict()), "π must travel in the dense state dict"
    for name, table in model.backend.state_dict().items():
        loaded = fresh.backend.state_dict()[name]
        np.testing.assert_array_equal(loaded["values"], table["values"])
        for k in table["state"]:
            np.testing.assert_array_equal(loaded["state"][k], table["state"][k])
        assert table["state"]["step"].max() == 2  # optimizer state of touched rows was saved
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for pid, st in a["state"].items():
        assert torch.equal(st["exp_avg"], b["state"][pid]["exp_avg"])


def test_checkpoint_holds_config_tokenizer_and_zarr_tables_with_manifest_last(tmp_path: Path) -> None:
    model, opt = _trained(_model_cfg(), steps=1)
    path = _save(tmp_path, 1, model, opt)
    manifest = read_manifest(path)
    assert manifest["tables"] == ["mem0.values"] and manifest["step"] == 1
    listed = {f["path"] for f in manifest["files"]}
    assert {"dense.pt", "config.json", "tokenizer.json"} <= listed
    assert json.loads((path / "config.json").read_text()) == {"model": {"d_model": 32}}
    store = open_table(path / "tables" / "mem0.values")
    assert store.spec == model.backend.tables()["mem0.values"]
    assert set(store.read_partition(0)) == {"values", "exp_avg", "exp_avg_sq", "step"}


def test_checkpoint_without_manifest_is_never_loaded(tmp_path: Path) -> None:
    model, opt = _trained(_model_cfg(), steps=1)
    first = _save(tmp_path, 1, model, opt)
    second = _save(tmp_path, 2, model, opt)
    (second / MANIFEST).unlink()  # as if the writer died before the last write

    with pytest.raises(CheckpointError):
        checkpoint_io.find_checkpoint(second)
    with pytest.raises(CheckpointError):
        checkpoint_io.load_checkpoint(second, model, backend=model.backend)
    assert checkpoint_io.find_checkpoint(tmp_path) == first  # the newest *complete* one
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint_io.find_checkpoint(tmp_path / "empty")


def test_unfinished_step_dir_is_replaced_when_saved_again(tmp_path: Path) -> None:
    model, opt = _trained(_model_cfg(), steps=1)
    stale = tmp_path / "step-3"
    (stale / "tables" / "junk").mkdir(parents=True)
    path = _save(tmp_path, 3, model, opt)
    assert not (path / "tables" / "junk").exists()
    read_manifest(path)


def test_mismatched_tables_are_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    model, opt = _trained(_model_cfg(), steps=1)
    path = _save(tmp_path, 1, model, opt)
    other = LanguageModel(_model_cfg(num_keys=16))  # a 256-row table instead of 64
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="mem0.values"):
        checkpoint_io.load_checkpoint(path, other, backend=other.backend)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_a_dense_model_checkpoints_without_tables(tmp_path: Path) -> None:
    cfg = replace(_model_cfg(), ffn_kind="dense")
    model, opt = _trained(cfg, steps=1)
    assert model.backend is None
    path = _save(tmp_path, 1, model, opt)
    fresh = LanguageModel(replace(cfg, init_seed=5))
    checkpoint_io.load_checkpoint(path, fresh, backend=None)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_prune_keeps_the_newest_complete_checkpoints(tmp_path: Path) -> None:
    model, opt = _trained(_model_cfg(), steps=1)
    paths = [_save(tmp_path, s, model, opt) for s in (1, 2, 3, 4)]
    deleted = checkpoint_io.prune_checkpoints(tmp_path, keep=2)
    assert deleted == paths[:2]
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert checkpoint_io.latest(tmp_path) == paths[3]
