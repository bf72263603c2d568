"""Run configuration: TOML -> nested frozen dataclasses (DESIGN §7, STYLE habits 6-8).

Each package owns its config dataclass (ModelConfig beside the model, TrainConfig beside the
trainer, DataConfig beside the data); this module only composes them into a `RunConfig` and is the
one place that reads TOML. Building is generic: it walks the dataclass fields and their types, so
a field added to any owner's config is configurable here without touching this file.

Resolution order (later wins): dataclass defaults < preset < TOML file < `--set section.key=value`
(values parsed as TOML literals; a bare word that is not a TOML literal is taken as a string).
Unknown keys fail and list the valid ones; a value of the wrong type or out of range fails naming
the field. The resolved config is saved with the run (`config.toml`) and with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_workers.data import DataConfig
from model_workers.model import ModelConfig
from model_workers.trainer import TrainConfig
from orchestration.cluster import DistributedConfig
from orchestration.errors import ConfigError

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is rebuilt from; one section per owning package."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cluster: DistributedConfig = field(default_factory=DistributedConfig)  # ignored by --local

    def __post_init__(self) -> None:
        # cross-section checks: each owner validates its own fields
        if self.model.vocab_size < self.data.vocab_size:
            raise ValueError(f"model.vocab_size ({self.model.vocab_size}) must be >= data.vocab_size "
                             f"({self.data.vocab_size}): every token id needs an embedding")
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(f"model.max_seq_len ({self.model.max_seq_len}) must be >= data.seq_len "
                             f"({self.data.seq_len})")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, by introspection


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert it (list -> tuple, int -> float)."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} is a section; expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{where} must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: no type fits {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (arg,) = typing.get_args(tp) or (Any,)
        return [_convert(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value  # Any or an annotation we do not police


def from_dict(cls: type, data: Mapping[str, Any], where: str = "") -> Any:
    """Build the dataclass `cls` from a nested dict; missing fields keep their defaults.

    Raises ConfigError naming the field for an unknown key (listing the valid ones), a value of the
    wrong type, or a value the owner's `__post_init__` rejects.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        section = f"[{where}]" if where else "the top level"
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; valid keys in {section}: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    # a nested section only partly given keeps the defaults of the rest
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and _is_dataclass_type(hints[f.name]) and f.init:
            kwargs[f.name] = from_dict(hints[f.name], {}, f"{where}.{f.name}" if where else f.name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # the owner's __post_init__ said no
        raise ConfigError(f"{where + ': ' if where else ''}{err}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass -> nested dict of TOML/JSON-able values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------------------------------------
# sources: presets, files, overrides


def preset_names() -> list[str]:
    """Presets shipped in orchestration/presets/*.toml."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The dict of preset `name`; ConfigError listing the presets when there is none."""
    path = PRESET_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(preset_names())}")
    return read_config_file(path)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (or a JSON one, as saved in checkpoints) into a nested dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {err}") from None


def parse_override(item: str) -> dict[str, Any]:
    """`section.key=value` -> {"section": {"key": value}}; value parsed as a TOML literal."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects section.key=value, got {item!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word (ffn_kind=ultramem) is a string
    out: dict[str, Any] = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: keys of `top` win; tables merge key by key."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve(layers: Iterable[Mapping[str, Any]]) -> RunConfig:
    """Merge config dicts in order (later wins) over the dataclass defaults, then validate."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = merge(merged, layer)
    return from_dict(RunConfig, merged)


def load_config(*, preset: str | None = None, path: str | Path | None = None,
                overrides: Iterable[str] = (), base: Mapping[str, Any] | None = None) -> RunConfig:
    """defaults < base (e.g. a checkpoint's saved config) < preset < file < overrides -> RunConfig."""
    layers: list[Mapping[str, Any]] = [base or {}]
    if preset:
        layers.append(load_preset(preset))
    if path:
        layers.append(read_config_file(path))
    layers.extend(parse_override(o) for o in overrides)
    return resolve(layers)


# ---------------------------------------------------------------------------------------------
# writing


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def to_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """A nested dict of scalars/lists -> TOML text (None values are left out)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping) and v is not None]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{prefix}.{k}" if prefix else k
            out += f"\n[{name}]\n" + to_toml(v, name)
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as TOML (loadable again with `--config`)."""
    Path(path).write_text(to_toml(to_dict(cfg)), encoding="utf-8")
