"""Run config: precedence, unknown keys, types, validation, save/load (orchestration/config.py)."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_workers.data import DataConfig
from model_workers.model import ModelConfig
from model_workers.trainer import TrainConfig
from orchestration.config import (
    RunConfig,
    from_dict,
    load_config,
    parse_override,
    preset_names,
    read_config_file,
    save_config,
    to_dict,
    to_toml,
)
from orchestration.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_then_preset_then_file_then_set(tmp_path: Path) -> None:
    file = _write(tmp_path, "[model]\nd_model = 96\nn_heads = 2\n")
    assert load_config().model.d_model == ModelConfig().d_model
    assert load_config(preset="tiny").model.d_model == 64
    assert load_config(preset="tiny", path=file).model.d_model == 96
    cfg = load_config(preset="tiny", path=file, overrides=["model.d_model=128"])
    assert cfg.model.d_model == 128
    assert cfg.model.n_heads == 2  # from the file, untouched by --set
    assert cfg.model.n_layers == 2  # from the preset, untouched by the file
    assert cfg.train.beta2 == TrainConfig().beta2  # a default nobody touched


def test_later_set_wins_and_nested_sections_merge_key_by_key() -> None:
    cfg = load_config(preset="tiny", overrides=["model.memory.topk=2", "model.memory.topk=3"])
    assert cfg.model.memory.topk == 3
    assert cfg.model.memory.num_keys == 8  # the rest of [model.memory] still comes from the preset


def test_unknown_key_fails_and_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.d_modle=64"])
    msg = str(err.value)
    assert "model.d_modle" in msg and "d_model" in msg and "n_layers" in msg and "\n" not in msg

    with pytest.raises(ConfigError, match=r"unknown config key 'optim'.*model, train, data"):
        load_config(overrides=["optim.lr=1"])
    with pytest.raises(ConfigError, match=r"model\.memory\.top_k.*topk"):
        load_config(path=_write(tmp_path, "[model.memory]\ntop_k = 4\n"))


def test_wrong_types_fail_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model\.d_model must be an integer"):
        load_config(overrides=['model.d_model="wide"'])
    with pytest.raises(ConfigError, match=r"train\.autocast must be one of 'auto', 'bf16', 'off'"):
        load_config(overrides=["train.autocast=fp16"])
    with pytest.raises(ConfigError, match=r"model\.memory\.softmax must be true or false"):
        load_config(overrides=["model.memory.softmax=1"])
    with pytest.raises(ConfigError, match=r"model is a section"):
        load_config(overrides=["model=3"])


def test_values_are_toml_literals_and_bare_words_are_strings() -> None:
    cfg = load_config(overrides=["train.lr=1", "model.ffn_kind=dense", "model.memory.placement='0:1/2:3'",
                                 "model.memory.value_lr_decay_steps=100", "train.autocast=off"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.ffn_kind == "dense"
    assert cfg.model.memory.placement == "0:1/2:3"
    assert cfg.model.memory.value_lr_decay_steps == 100


@given(st.floats(min_value=1e-9, max_value=10.0, allow_nan=False))
def test_float_overrides_parse_exactly(lr: float) -> None:
    assert parse_override(f"train.lr={lr!r}") == {"train": {"lr": lr}}


def test_malformed_set_is_a_config_error() -> None:
    for bad in ("model.d_model", "=3", "model..d_model=3"):
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_override(bad)


def test_owner_validation_and_cross_section_checks_become_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps must be > 0"):
        load_config(overrides=["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"memory\.topk"):
        load_config(overrides=["model.memory.topk=1000"])
    with pytest.raises(ConfigError, match=r"model\.max_seq_len .* data\.seq_len"):
        load_config(preset="tiny", overrides=["data.seq_len=128"])
    with pytest.raises(ConfigError, match=r"model\.vocab_size .* data\.vocab_size"):
        load_config(overrides=["model.vocab_size=300"])


def test_unknown_preset_lists_the_available_ones() -> None:
    assert {"tiny", "small"} <= set(preset_names())
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'; available: .*small.*tiny"):
        load_config(preset="huge")


def test_bad_toml_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "[model\nd_model = 3\n")
    with pytest.raises(ConfigError, match="run.toml: not valid TOML"):
        load_config(path=path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path=tmp_path / "missing.toml")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_saved_config_loads_back_identical(tmp_path: Path, preset: str) -> None:
    cfg = load_config(preset=preset, overrides=["model.memory.value_lr_decay_steps=7", "train.seed=5"])
    save_config(cfg, tmp_path / "config.toml")
    assert load_config(path=tmp_path / "config.toml") == cfg
    assert from_dict(RunConfig, to_dict(cfg)) == cfg  # the JSON form kept in checkpoints
    assert read_config_file(tmp_path / "config.toml")["train"] == to_dict(cfg)["train"]


def test_config_is_frozen_and_composed_of_the_owners_dataclasses() -> None:
    cfg = load_config(preset="tiny")
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.train, TrainConfig)
    assert isinstance(cfg.data, DataConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_toml_writer_quotes_strings_and_nests_tables() -> None:
    text = to_toml({"a": 1, "s": 'say "hi"\n', "f": 0.5, "b": True, "l": [1, 2], "none": None,
                    "t": {"x": 2, "u": {"y": "z"}}})
    assert tomllib.loads(text) == {"a": 1, "s": 'say "hi"\n', "f": 0.5, "b": True, "l": [1, 2],
                                   "t": {"x": 2, "u": {"y": "z"}}}
