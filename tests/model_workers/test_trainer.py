"""The training step and the single-process loop: learning, metrics, checkpoints, exact resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model_workers.data import DataConfig, get_batch
from model_workers.model import LanguageModel, ModelConfig
from model_workers.trainer import (
    LocalTrainer,
    TrainConfig,
    autocast_dtype,
    evaluate,
    make_optimizer,
    train_step,
)
from model_workers.ultramem import MemoryConfig
from orchestration.config import load_config, to_dict


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def _trainer(run_dir: Path, cache_dir: Path, *overrides: str) -> LocalTrainer:
    cfg = load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", *overrides])
    return LocalTrainer(cfg.model, cfg.train, cfg.data, run_dir, config=to_dict(cfg), progress=False)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_tiny_training_lowers_validation_loss(tmp_path: Path, cache_dir: Path) -> None:
    trainer = _trainer(tmp_path / "run", cache_dir, "train.max_steps=20")
    before = evaluate(trainer.model, trainer.corpus, trainer.data_cfg, max_batches=2, device=trainer.device)
    result = trainer.run()
    assert result.steps == 20
    assert result.val_loss < before["val_loss"] - 0.3
    assert result.val_bpb == pytest.approx(trainer.corpus.bits_per_byte(result.val_loss))
    assert result.tokens_per_s > 0 and result.checkpoint == tmp_path / "run" / "checkpoints" / "step-20"


def test_metrics_log_train_and_eval_records_with_memory_utilization(tmp_path: Path, cache_dir: Path) -> None:
    trainer = _trainer(tmp_path / "run", cache_dir, "train.max_steps=4", "train.eval_every=2")
    trainer.run()
    train = _records(tmp_path / "run", "train")
    evals = _records(tmp_path / "run", "eval")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 and r["value_lr"] > r["lr"] for r in train)
    assert [r["step"] for r in evals] == [2, 4]
    assert {"val_loss", "val_bpb", "unigram_entropy"} <= set(evals[0])
    assert "mem0/coverage" in evals[0]["memory"]
    assert (tmp_path / "run" / "tokenizer.json").is_file()


def test_train_step_updates_dense_weights_and_value_rows(tmp_path: Path, cache_dir: Path) -> None:
    trainer = _trainer(tmp_path / "run", cache_dir)
    model, backend = trainer.model, trainer.backend
    values_before = backend.state_dict()["mem0.values"]["values"]
    emb_before = model.tok_emb.weight.detach().clone()
    x, y = get_batch(trainer.corpus.train, 0, seed=0, batch_size=1, seq_len=4)  # 4 tokens x H*m = 32 rows max
    res = train_step(model, trainer.optimizer, x, y, step=0, cfg=trainer.cfg, max_steps=20)
    values_after = backend.state_dict()["mem0.values"]["values"]
    changed = np.any(values_after != values_before, axis=1)
    assert 0 < changed.sum() < len(changed)  # sparse: only the rows the batch touched
    assert not torch.equal(model.tok_emb.weight, emb_before)
    assert res.value_lr == pytest.approx(res.lr * trainer.model_cfg.memory.value_lr_mult)  # 4x at step 0
    assert np.isfinite(res.loss) and res.grad_norm > 0


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path: Path, cache_dir: Path) -> None:
    common = ("train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=0")
    straight = _trainer(tmp_path / "straight", cache_dir, *common)
    straight.run()

    first = _trainer(tmp_path / "split", cache_dir, *common)
    first.run(max_steps=4)  # stops at the step-4 checkpoint, as if interrupted
    assert (tmp_path / "split" / "checkpoints" / "step-4" / "manifest.json").is_file()
    second = _trainer(tmp_path / "split", cache_dir, *common)
    second.resume(tmp_path / "split")
    assert second.step == 4
    second.run()

    losses = {r["step"]: r["loss"] for r in _records(tmp_path / "straight", "train")}
    resumed = {r["step"]: r["loss"] for r in _records(tmp_path / "split", "train")}
    assert sorted(resumed) == sorted(losses) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(losses[step], abs=1e-6), step
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[key], value, rtol=0, atol=1e-6)
    np.testing.assert_allclose(second.backend.state_dict()["mem0.values"]["values"],
                               straight.backend.state_dict()["mem0.values"]["values"], atol=1e-6)


def test_old_checkpoints_are_pruned(tmp_path: Path, cache_dir: Path) -> None:
    trainer = _trainer(tmp_path / "run", cache_dir, "train.max_steps=4", "train.checkpoint_every=1",
                       "train.keep_checkpoints=2", "train.eval_every=0")
    trainer.run()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-3", "step-4"]


def test_autocast_is_bf16_only_when_asked_or_fast() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig(autocast="off"), cpu) is None
    assert autocast_dtype(TrainConfig(autocast="bf16"), cpu) is torch.bfloat16
    assert autocast_dtype(TrainConfig(autocast="auto"), cpu) in (None, torch.bfloat16)


def test_weight_decay_applies_to_matrices_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_tucker_cores_and_gains_are_not_decayed_while_every_other_matrix_is() -> None:
    model = LanguageModel(ModelConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=8,
                                      memory=MemoryConfig(num_keys=4, d_k=4, d_v=8, topk=2, placement="0:1")))
    decay, no_decay = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "memories.0.tucker.cores" in kept and model.memories[0].tucker.cores.dim() == 4
    assert {"memories.0.k_norm_row.weight", "memories.0.q_norm_col.weight", "norm.weight"} <= kept
    assert {"memories.0.keys_row", "memories.0.w_q.weight", "memories.0.w_out.weight", "tok_emb.weight"} <= decayed
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert all(p.dim() >= 2 for p in decay["params"])


def test_train_config_validates_its_fields() -> None:
    with pytest.raises(ValueError, match="train.max_steps"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="train.eval_batches"):
        replace(TrainConfig(), eval_batches=0)
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(beta2=1.0)
    assert DataConfig().vocab_size == 8192
