"""The quality experiment (issue 9, DESIGN §3.2): every variant at equal compute on the same data.

An `ExperimentConfig` (TOML, `orchestration/presets/quality*.toml`) names a shared dense backbone
(a `RunConfig` dict: model sizes, train schedule, data), the memory sizes, the variants and a token
budget. For each variant `variant_config` builds its `ModelConfig`, then `match_compute` widens or
narrows the dense FFN (`model.ffn_mult`) until its analytic forward FLOPs per token are within
`flops_tolerance` of the full UltraMem's, so every row of the table costs the same compute:

    dense          FFN only (wider, to pay for the memory's FLOPs)
    pkm            the paper's first ablation row as in the PKM paper: product keys, softmax, query
                   batchnorm, D-wide values, one layer with UltraMem's sparse parameter count (K'² rows
                   x D = L x K² x d_v); values ffn_matched like UltraMem's (the init fix is not PKM's
                   to lose)
    pkm_2x         the same PKM with the rows of all UltraMem layers (K' = K·√L), so D-wide values
                   give it ~2x UltraMem's sparse parameters (the PKM row before issue 15)
    moe            top-2 of N SwiGLU experts in every block; expert width gives equal active FLOPs,
                   N gives total parameters equal to UltraMem's (dense + values)
    ultramem       everything on (DESIGN §3.1)
    no_ive         E = 1;  no_tdqkr: additive product keys (then one core: MCS needs TDQKR)
    no_mcs         one core;  no_vlr_decay: value LR = dense LR (no 4x -> 1x)
    no_split       one big memory (same rows in total) read and added at one block, no skip-layer
    no_qnorm       no query statistics (DESIGN §3.1 step 1, the library default): the same as
                   `ultramem` unless the backbone pins another query_norm (older presets pin "whiten")
    whiten         UltraMem with query whitening over the batch's tokens (ours, not in the paper), so
                   whiten − ultramem is what whitening does from the default
    ultramem_signed  UltraMem with the signed TDQKR filter (top-m and bottom-m per side, 2m x 2m
                   rescoring; not in the paper): its larger grid is counted, so its FFN narrows a little
    ultramem_v2    UltraMemV2 (DESIGN §3.3, the kind's defaults): a memory layer beside every block's
                   FFN, one shared projector, pre-values (d_p = d_v / 3), constant 1x value LR; each
                   layer's rows (K'² with K' = K·√(L·d_v / (n_layers·(d_v + d_p)))) give it UltraMem's
                   sparse parameters (values + pre-values); query norm and value init as the backbone's

Each (variant, seed) run trains with `LocalTrainer` in this process into `<out>/<variant>/seed-<s>/`
and leaves `result.json` last, so a rerun skips finished runs (resume). Seeds set both the init
(`model.init_seed`) and the data order (`train.seed`): variants with one seed see the same batches.
FLOPs are counted analytically (`flops_per_token`, multiply-adds x 2, forward only; top-k and
softmax are not counted), parameters by instantiating the model.

A `[sweep]` table (`sweep_points`, CLI form `parse_sweep`) makes a grid of whole experiments, one
per point (`num_keys`: the memory size, P = K^2 rows per layer; `tokens`: the budget), each
compute-matched to its own UltraMem; `paired_delta` compares two variants on the seeds they share.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model_workers.layers import swiglu_hidden
from model_workers.model import ModelConfig
from model_workers.ultramem import MemoryConfig
from orchestration.config import PRESET_DIR, RunConfig, merge, read_config_file, resolve, to_dict
from orchestration.errors import ConfigError

VARIANTS = ("dense", "pkm", "pkm_2x", "moe", "ultramem", "no_ive", "no_tdqkr", "no_mcs", "no_vlr_decay", "no_split",
            "no_qnorm", "whiten", "ultramem_signed", "ultramem_v2")
LEAVE_ONE_OUT = ("no_ive", "no_tdqkr", "no_mcs", "no_vlr_decay", "no_split")
RESULT = "result.json"


@dataclass(frozen=True)
class ExperimentConfig:
    """What `ultramem experiment quality` runs; read from TOML by `load_experiment`."""

    base: dict[str, Any] = field(default_factory=dict)  # RunConfig dict shared by every variant
    variants: tuple[str, ...] = VARIANTS  # rows of the table, in order
    seeds: tuple[int, ...] = (1, 2, 3)  # init + data-order seeds (the CLI's --seeds wins)
    tokens: int = 2_000_000  # training tokens per run (steps = tokens / (batch * seq_len))
    flops_tolerance: float = 0.05  # |FLOPs/token of a variant / UltraMem's - 1| allowed
    moe_experts: int = 0  # 0 = choose N so MoE's total parameters match UltraMem's
    threads: int = 0  # torch threads per run; 0 = torch's default
    sweep: tuple[tuple[str, tuple[int, ...]], ...] = ()  # [sweep] axes: the grid of sub-experiments

    def __post_init__(self) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"experiment.variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ConfigError("experiment.seeds must be a non-empty list of integers >= 0")
        if self.tokens <= 0 or not 0 < self.flops_tolerance < 1 or self.moe_experts < 0 or self.threads < 0:
            raise ConfigError("experiment: need tokens > 0, 0 < flops_tolerance < 1, moe_experts >= 0, threads >= 0")
        _check_sweep(self.sweep)

    def run_config(self) -> RunConfig:
        """The shared backbone as a validated RunConfig."""
        return resolve([self.base])

    def steps(self) -> int:
        """Optimizer steps per run for the token budget."""
        data = self.run_config().data
        return max(1, round(self.tokens / (data.batch_size * data.seq_len)))


def load_experiment(path: str | Path | None = None, *, quick: bool = False) -> ExperimentConfig:
    """Read an experiment TOML ([experiment] + the RunConfig sections); default: the quality preset."""
    if path is None:
        path = PRESET_DIR / ("quality_quick.toml" if quick else "quality.toml")
    data = read_config_file(path)
    exp = dict(data.pop("experiment", {}))
    sweep = data.pop("sweep", {})
    if not isinstance(sweep, dict):
        raise ConfigError("[sweep] must be a table of axis = [values]")
    known = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"base", "sweep"}
    unknown = sorted(set(exp) - known)
    if unknown:
        raise ConfigError(f"unknown key experiment.{unknown[0]}; valid: {', '.join(sorted(known))}")
    for key in ("variants", "seeds"):
        if key in exp:
            exp[key] = tuple(exp[key])
    exp["sweep"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sweep.items())
    cfg = ExperimentConfig(base=data, **exp)
    cfg.run_config()  # fail early on a bad backbone
    sweep_points(cfg)  # ... and on a sweep point the backbone cannot take (topk > num_keys)
    return cfg


# ----------------------------------------------------------------------------------- sweep

# axis -> what it sets: num_keys = model.memory.num_keys (P = K^2 physical rows per memory layer;
# PKM and no_split grow with it as K*sqrt(layers)); tokens = experiment.tokens (the budget)
SWEEP_AXES = ("num_keys", "tokens")
SWEEP = "sweep.json"


def _check_sweep(axes: Any) -> None:
    """ConfigError unless `axes` is ((name, (int > 0, ...)), ...) with known, distinct names."""
    names = [a[0] for a in axes] if isinstance(axes, tuple) else []
    for axis in axes:
        name, values = axis if isinstance(axis, tuple) and len(axis) == 2 else (None, None)
        if name not in SWEEP_AXES:
            raise ConfigError(f"sweep: unknown axis {name!r}; choose from {', '.join(SWEEP_AXES)}")
        if (not isinstance(values, tuple) or not values
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values)):
            raise ConfigError(f"sweep.{name} must be a non-empty list of integers > 0, got {values!r}")
        if len(set(values)) != len(values):
            raise ConfigError(f"sweep.{name} repeats a value: {list(values)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: axis given twice in {names}")


def parse_sweep(items: Iterable[str]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """CLI form of [sweep]: ["num_keys=32,64", "tokens=307200"] -> (("num_keys", (32, 64)), ("tokens", (307200,)))."""
    axes = []
    for item in items:
        name, sep, raw = item.partition("=")
        try:
            values = tuple(int(v.replace("_", "")) for v in raw.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--sweep expects axis=int,int,..., got {item!r}") from None
        if not sep:
            raise ConfigError(f"--sweep expects axis=int,int,..., got {item!r}")
        axes.append((name.strip(), values))
    out = tuple(axes)
    _check_sweep(out)
    return out


def sweep_points(exp: ExperimentConfig) -> list[tuple[str, dict[str, int], ExperimentConfig]]:
    """The grid of `exp.sweep`: (name "num_keys-32_tokens-614400", {axis: value}, its experiment); [] if none.

    Each point is a whole experiment (all variants compute-matched to that point's UltraMem), so
    FLOPs/token rise with K (key scoring) and every variant's dense width rises with them.
    """
    if not exp.sweep:
        return []
    names = [name for name, _ in exp.sweep]
    out = []
    for combo in itertools.product(*(values for _, values in exp.sweep)):
        point = dict(zip(names, combo))
        base, tokens = exp.base, point.get("tokens", exp.tokens)
        if "num_keys" in point:
            base = merge(base, {"model": {"memory": {"num_keys": point["num_keys"]}}})
        sub = dataclasses.replace(exp, base=base, tokens=tokens, sweep=())
        try:
            sub.run_config()
        except ConfigError as err:
            raise ConfigError(f"sweep point {point}: {err}") from None
        out.append(("_".join(f"{k}-{v}" for k, v in point.items()), point, sub))
    return out


# ----------------------------------------------------------------------------------- variants


def variant_config(name: str, model: ModelConfig) -> ModelConfig:
    """The ModelConfig of variant `name` from the backbone (model.memory = full UltraMem), FFN unmatched."""
    mem = model.memory
    layers = len(mem.placements)
    # one big memory with the rows of all layers: K' = K * sqrt(layers), read and added at one block
    big_keys = round(mem.num_keys * math.sqrt(layers))
    read = mem.placements[0][0]
    one_layer = {"placement": f"{read}:{read}", "num_keys": big_keys}
    if name == "dense":
        return dataclasses.replace(model, ffn_kind="dense")
    if name == "moe":
        return dataclasses.replace(model, ffn_kind="moe")
    if name == "ultramem":
        return dataclasses.replace(model, ffn_kind="ultramem")
    if name in ("pkm", "pkm_2x"):
        # equal sparse parameters: K'² rows of D = layers · K² rows of d_v
        keys = big_keys if name == "pkm_2x" else round(mem.num_keys * math.sqrt(layers * mem.d_v / model.d_model))
        pkm = MemoryConfig.pkm(num_keys=keys, d_k=mem.d_k, d_v=mem.d_v, heads=mem.heads, topk=min(mem.topk, keys),
                               placement=one_layer["placement"], num_partitions=mem.num_partitions,
                               recall_sample_tokens=mem.recall_sample_tokens, value_init=mem.value_init,
                               value_std=mem.value_std)
        return dataclasses.replace(model, ffn_kind="pkm", memory=pkm)
    if name == "ultramem_v2":  # equal sparse parameters: n_layers · K'² · (d_v + d_p) = layers · K² · d_v
        d_p = max(1, mem.d_v // 3)
        keys = round(mem.num_keys * math.sqrt(layers * mem.d_v / (model.n_layers * (mem.d_v + d_p))))
        v2 = MemoryConfig.ultramem_v2(num_keys=keys, d_k=mem.d_k, d_v=mem.d_v, d_p=d_p, heads=mem.heads,
                                      topk=min(mem.topk, keys), tucker_rank=mem.tucker_rank, cores=mem.cores,
                                      expansion=mem.expansion, num_partitions=mem.num_partitions,
                                      recall_sample_tokens=mem.recall_sample_tokens, query_norm=mem.query_norm,
                                      value_init=mem.value_init, value_std=mem.value_std)
        return dataclasses.replace(model, ffn_kind="ultramem_v2", memory=v2)
    changes: dict[str, Any] = {
        "no_ive": {"expansion": 1},
        "no_tdqkr": {"tucker_rank": 0, "cores": 1},
        "no_mcs": {"cores": 1},
        "no_vlr_decay": {"value_lr_mult": 1.0, "value_lr_mult_final": 1.0},
        "no_split": one_layer,
        "no_qnorm": {"query_norm": "none"},
        "whiten": {"query_norm": "whiten"},
        "ultramem_signed": {"tdqkr_filter": "signed"},
    }[name]
    return dataclasses.replace(model, ffn_kind="ultramem", memory=dataclasses.replace(mem, **changes))


# ----------------------------------------------------------------------------------- compute


def _memory_macs(cfg: ModelConfig) -> float:
    """Multiply-adds per token of one memory layer (query, key scores, filter, grid, pooling, W_out)."""
    mem, d = cfg.memory, cfg.d_model
    n_row, n_col = mem.side_keys
    r, h, big_h, m = max(mem.tucker_rank, 1), mem.cores, mem.heads, mem.topk
    d_v = mem.value_dim(d)
    q_heads = 1 if mem.share_query else big_h
    macs = d * q_heads * 2 * mem.d_k  # W_q
    macs += big_h * (n_row + n_col) * mem.d_k * r  # per-rank key scores
    if mem.tucker_rank >= 1:
        macs += big_h * (n_row + n_col) * r  # rank-1 filter projections S·u, S·v
        # candidates per side: m, or top-m + bottom-m (all n when 2m >= n) with the signed filter
        c_row, c_col = (min(2 * m, n_row), min(2 * m, n_col)) if mem.tdqkr_filter == "signed" else (m, m)
        macs += big_h * c_row * c_col * (r * r + r)  # exact c x c grid rescoring
        macs += big_h * m * h * (r * r + r)  # per-core scores of the winners
    else:
        macs += big_h * m * m  # additive grid
    macs += big_h * m * d_v  # MCS weighting + pooling of H*m rows
    if mem.d_p:  # pre-values (DESIGN §3.3): W_p, then one d_p dot product per selected row
        macs += d * mem.d_p + big_h * m * mem.d_p
    if mem.uses_projection():
        macs += mem.pool_blocks * d_v * d  # W_out (E·d_v -> D, or d_v -> D with the shared projector)
    return float(macs)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Analytic forward FLOPs per token (2 x multiply-adds); attention over (seq_len + 1) / 2 keys."""
    d, layers = cfg.d_model, cfg.n_layers
    ctx = (seq_len + 1) / 2
    attn = 4 * d * d + 2 * ctx * d  # qkv + proj, QK^T + AV
    if cfg.ffn_kind == "moe":
        hidden = swiglu_hidden(d, cfg.moe.expert_ffn_mult)
        ffn = d * cfg.moe.num_experts + cfg.moe.top_k * 3 * d * hidden
    else:
        ffn = 3 * d * swiglu_hidden(d, cfg.ffn_mult)
    macs = layers * (attn + ffn) + d * cfg.vocab_size  # + tied LM head
    if cfg.has_memory:
        macs += len(cfg.placements) * _memory_macs(cfg)
    return 2.0 * macs


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """{"total", "dense", "sparse" (value tables), "active" (dense minus unused experts + H·m value rows)}."""
    from model_workers.model import LanguageModel

    model = LanguageModel(cfg)
    dense = sum(p.numel() for p in model.parameters())
    sparse = sum(s.rows * s.dim for s in model.memory_tables())
    active = dense
    if cfg.ffn_kind == "moe":
        hidden = swiglu_hidden(cfg.d_model, cfg.moe.expert_ffn_mult)
        active -= cfg.n_layers * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * cfg.d_model * hidden
    if cfg.has_memory:
        mem = cfg.memory
        active += len(cfg.placements) * mem.heads * mem.topk * mem.value_dim(cfg.d_model)
    return {"total": dense + sparse, "dense": dense, "sparse": sparse, "active": active}


def _fit(make: Callable[[float], ModelConfig], target: float, seq_len: int, lo: float, hi: float) -> ModelConfig:
    """Bisect the multiplier x in [lo, hi] so flops_per_token(make(x)) is closest to target."""
    for _ in range(40):
        mid = (lo + hi) / 2
        if flops_per_token(make(mid), seq_len) < target:
            lo = mid
        else:
            hi = mid
    a, b = make(lo), make(hi)
    return min((a, b), key=lambda c: abs(flops_per_token(c, seq_len) - target))


def match_compute(name: str, model: ModelConfig, seq_len: int, *, moe_experts: int = 0) -> ModelConfig:
    """Variant `name` with its dense FFN (or expert) width set so FLOPs/token equal full UltraMem's.

    MoE: expert width for equal active FLOPs, then the expert count for equal total parameters
    (dense + value tables) unless `moe_experts` fixes it.
    """
    target = flops_per_token(variant_config("ultramem", model), seq_len)
    cfg = variant_config(name, model)
    if name == "ultramem":
        return cfg
    if name == "moe":
        def make_moe(x: float, experts: int = 2) -> ModelConfig:
            return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_ffn_mult=x, num_experts=experts))
        fitted = _fit(make_moe, target, seq_len, 0.05, 16.0)
        hidden = swiglu_hidden(cfg.d_model, fitted.moe.expert_ffn_mult)
        if moe_experts:
            experts = moe_experts
        else:
            want = parameter_counts(variant_config("ultramem", model))["total"]
            per_expert = cfg.n_layers * 3 * cfg.d_model * hidden  # one expert in every block
            rest = parameter_counts(make_moe(fitted.moe.expert_ffn_mult, 2))["total"] - 2 * per_expert
            experts = max(2, round((want - rest) / per_expert))
        return make_moe(fitted.moe.expert_ffn_mult, experts)
    return _fit(lambda x: dataclasses.replace(cfg, ffn_mult=x), target, seq_len, 0.05, 32.0)


@dataclass(frozen=True)
class Variant:
    """One row of the table: its name, model config, FLOPs/token and parameter counts."""

    name: str
    model: ModelConfig
    flops: float  # forward FLOPs per token
    params: dict[str, int]


def plan_variants(exp: ExperimentConfig) -> list[Variant]:
    """Every variant of `exp`, compute-matched; ConfigError if one misses the FLOPs tolerance."""
    run = exp.run_config()
    seq_len = run.data.seq_len
    target = flops_per_token(variant_config("ultramem", run.model), seq_len)
    out = []
    for name in exp.variants:
        model = match_compute(name, run.model, seq_len, moe_experts=exp.moe_experts)
        flops = flops_per_token(model, seq_len)
        if abs(flops / target - 1) > exp.flops_tolerance:
            raise ConfigError(f"variant {name}: {flops:.3g} FLOPs/token is not within "
                              f"{exp.flops_tolerance:.0%} of UltraMem's {target:.3g}; widen the backbone")
        out.append(Variant(name, model, flops, parameter_counts(model)))
    return out


# ----------------------------------------------------------------------------------- runs


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / variant / f"seed-{seed}"


def read_result(path: Path) -> dict[str, Any] | None:
    """The result.json of a finished run, or None (absent or unreadable: run it again)."""
    try:
        return json.loads((path / RESULT).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_one(exp: ExperimentConfig, variant: Variant, seed: int, out: Path, *, progress: bool = False) -> dict[str, Any]:
    """Train one (variant, seed) to the token budget; write and return its result (skip if done)."""
    from model_workers.trainer import LocalTrainer

    path = run_dir(out, variant.name, seed)
    done = read_result(path)
    if done is not None:
        return done
    run = exp.run_config()
    steps = exp.steps()
    train_over = {"seed": seed, "max_steps": steps, "checkpoint_every": 0, "keep_checkpoints": 1}
    if exp.threads:
        train_over["threads"] = exp.threads
    cfg_dict = merge(to_dict(run), {"model": {**to_dict(variant.model), "init_seed": seed}, "train": train_over})
    cfg = resolve([cfg_dict])
    if path.exists():  # an unfinished run: start it again from scratch
        for f in ("metrics.jsonl",):
            (path / f).unlink(missing_ok=True)
    t0 = time.time()
    trainer = LocalTrainer(cfg.model, cfg.train, cfg.data, path, config=to_dict(cfg), progress=progress)
    trainer.save = lambda: path  # type: ignore[method-assign]  # no checkpoints: result.json is the record
    res = trainer.run()
    dead = _dead_rows(trainer)
    result = {
        "variant": variant.name, "seed": seed, "steps": res.steps,
        "tokens": steps * cfg.data.batch_size * cfg.data.seq_len,
        "val_loss": res.val_loss, "val_bpb": res.val_bpb, "train_loss": res.train_loss,
        "unigram_entropy": res.unigram_entropy, "tokens_per_s": res.tokens_per_s, "wall_s": time.time() - t0,
        "flops_per_token": variant.flops, "params": variant.params, "dead_rows": dead,
        "curve": _curve(path),
    }
    tmp = path / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(path / RESULT)  # last: its presence means the run is finished
    return result


def _dead_rows(trainer: Any) -> float | None:
    """Fraction of physical value rows never updated in the whole run (AdamW per-row step == 0)."""
    backend = trainer.backend
    if backend is None:
        return None
    steps = [np.asarray(s["state"]["step"]) for s in backend.state_dict().values() if "step" in s.get("state", {})]
    if not steps:
        return None
    return float(np.mean(np.concatenate([s.reshape(-1) for s in steps]) == 0))


def _curve(path: Path) -> list[dict[str, Any]]:
    """The eval records of metrics.jsonl: step, val_loss, val_bpb, memory metrics."""
    out = []
    with open(path / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "eval":
                out.append({"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
                            "memory": r["memory"]})
    return out


# ----------------------------------------------------------------------------------- summary


def memory_summary(curve: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over memory layers of coverage / KL / top-1 at the last eval, and top-1 averaged over training."""
    if not curve or not any(k.startswith("mem") for k in curve[-1]["memory"]):
        return {}  # dense / MoE: no memory layers
    def layer_mean(mem: Mapping[str, float], key: str) -> float:
        vals = [v for k, v in mem.items() if k.startswith("mem") and k.endswith("/" + key)]
        return float(np.mean(vals)) if vals else float("nan")
    last = curve[-1]["memory"]
    return {
        "coverage": layer_mean(last, "coverage"),
        "kl_uniform": layer_mean(last, "kl_uniform"),
        "top1_score": layer_mean(last, "top1_score"),
        "top1_mean": float(np.nanmean([layer_mean(c["memory"], "top1_score") for c in curve])),
        "output_std": layer_mean(last, "output_std"),
        "tdqkr_recall": layer_mean(last, "tdqkr_recall"),
    }


def summarize(results: Iterable[dict[str, Any]], variants: Iterable[Variant]) -> list[dict[str, Any]]:
    """One row per variant: mean and std over seeds of val loss and bpb, FLOPs, params, diagnostics."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    rows = []
    for v in variants:
        rs = by.get(v.name, [])
        if not rs:
            continue
        loss = np.array([r["val_loss"] for r in rs])
        bpb = np.array([r["val_bpb"] for r in rs])
        mems = [memory_summary(r["curve"]) for r in rs]
        diag = {k: float(np.nanmean([m[k] for m in mems if k in m])) for k in (mems[0] if mems else {})}
        dead = [r["dead_rows"] for r in rs if r.get("dead_rows") is not None]
        rows.append({
            "variant": v.name, "seeds": sorted(r["seed"] for r in rs), "val_loss": float(loss.mean()),
            "val_loss_std": float(loss.std(ddof=1)) if len(rs) > 1 else 0.0, "val_bpb": float(bpb.mean()),
            "val_bpb_std": float(bpb.std(ddof=1)) if len(rs) > 1 else 0.0, "flops_per_token": v.flops,
            "params": v.params, "wall_s": float(sum(r["wall_s"] for r in rs)),
            "dead_rows": float(np.mean(dead)) if dead else None, **diag,
        })
    return rows


def paired_delta(results: Iterable[dict[str, Any]], variant: str, ref: str = "dense") -> tuple[float, float, int]:
    """val loss of `variant` minus `ref`'s on the same seed: (mean, std ddof=1, seeds); nan if no shared seed."""
    loss: dict[tuple[str, int], float] = {(r["variant"], r["seed"]): r["val_loss"] for r in results}
    diffs = [loss[(variant, s)] - loss[(ref, s)] for (v, s) in loss if v == variant and (ref, s) in loss]
    if not diffs:
        return float("nan"), float("nan"), 0
    return float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0, len(diffs)
