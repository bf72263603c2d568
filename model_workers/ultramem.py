"""The memory layer: PKM, UltraMem and UltraMemV2 behind one config (DESIGN §3.1, §3.3; arXiv 2411.12364,
2508.18756).

Forward, in the paper's order (steps of DESIGN §3.1):
  1. query   q_row, q_col = split(x · W_q) (shared by the heads or one per head), optional RMSNorm
  2. keys    per-rank scores S_row, S_col [T, H, n, r] against (optionally RMS-normed, learnable gain) sub-keys
  3. TDQKR   rank-1 filter + exact m x m rescoring (tdqkr.py), or additive product keys (pkm.py)
  4. IVE     physical row = π(g) mod P, projector = π(g) div P (ive.py)
  5-6. MCS + pooling, then one W_out (E·d_v -> D); the model adds y after block j (skip-layer)
  9. utilization metrics (coverage, KL to uniform, top-1 score, output std, TDQKR recall)
Value rows are not parameters: they are fetched through a ValueBackend as leaf tensors; after
backward their gradients are pushed back (`push_value_grads`), so a remote table plugs in unchanged.
With `MemoryConfig.lookup = "pooled"` steps 5-6 run in the backend instead (ive.pooled_lookup): no
row reaches the worker, and the backend updates the rows during backward at the step and value LR
announced by `ValueBackend.begin_step` (train_step calls it before the forward).
Every ablation row of the paper (DESIGN §3.2) is a switch of MemoryConfig, and so is every UltraMemV2
difference (DESIGN §3.3): placement "full", one shared IVE projector (`shared_projector`: one [d_v] sum
per token, W_out d_v -> D), PEER-style pre-values (`d_p`: a second table P_tab beside the values, each
selected row weighted by ⟨x·W_p, P_tab[row]⟩, prevalues.py) and the value-LR schedule; kind
"ultramem_v2" turns them on by default.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_workers.eval_cache import EvalCache, EvalCached
from model_workers.ive import make_permutation, pooled_lookup, pooled_sum, split_virtual
from model_workers.layers import RMSNorm
from model_workers.pkm import brute_force_product_keys, product_key_topk
from model_workers.prevalues import pre_value_std, pre_value_weight, weight_scores
from model_workers.query_norm import BatchWhitening
from model_workers.tdqkr import (
    DecodeKeys,
    TuckerCores,
    brute_force_topk,
    key_matrix,
    rank_scores,
    recall,
    tdqkr_topk,
    tdqkr_topk_decode,
)
from model_workers.transfer import Arrival, HostStaging

if TYPE_CHECKING:  # pragma: no cover
    from model_workers.values import ValueBackend


class ModelConfigError(ValueError):
    """A model/memory/MoE config field is out of range; the message names the field."""


FULL = "full"  # placement of UltraMemV2 (DESIGN §3.3 item 1): a memory layer beside every block's FFN


def parse_placement(text: str, n_layers: int | None = None) -> tuple[tuple[int, int], ...]:
    """'i:j/i:j' -> ((i, j), ...): memory read at block i (0-based), added after block j >= i.

    A lone 'i' means 'i:i' (read and add at the same block, beside its FFN); "full" means 'i:i' for
    every one of the `n_layers` blocks (so it needs `n_layers`).
    """
    if text.strip() == FULL:
        if n_layers is None:
            raise ModelConfigError("memory.placement = 'full' needs the block count: use ModelConfig.placements")
        return tuple((i, i) for i in range(n_layers))
    pairs = []
    for part in text.split("/"):
        bits = part.strip().split(":")
        try:
            read, add = (int(bits[0]), int(bits[-1])) if len(bits) in (1, 2) else (None, None)
        except ValueError:
            read, add = None, None
        if read is None or add is None or read < 0 or add < read:
            raise ModelConfigError(
                f"memory.placement: bad entry {part!r} in {text!r}; want 'i:j' with 0 <= i <= j"
            )
        pairs.append((read, add))
    return tuple(pairs)


@dataclass(frozen=True)
class MemoryConfig:
    """One memory layer design; every UltraMem component is a switch (DESIGN §3.2 ablation rows)."""

    # "pkm" requires additive keys (tucker_rank 0, cores 1); "ultramem_v2" (DESIGN §3.3) changes the
    # defaults of the V2 switches below (placement, shared_projector, d_p, value_lr_schedule), each of
    # which can still be set by hand (ablations)
    kind: Literal["pkm", "ultramem", "ultramem_v2"] = "ultramem"
    num_keys: int = 64  # K sub-keys per side of the physical table: P = K*K rows per memory layer
    d_k: int = 64  # query / sub-key width
    d_v: int = 128  # value width when half_dv_proj (paper: D/2); otherwise values are D wide
    heads: int = 2  # H key heads, each picks top-m
    topk: int = 16  # m slots per head
    softmax: bool = False  # PKM normalizes the m scores; UltraMem uses raw scores ("rm softmax")
    half_dv_proj: bool = True  # values d_v wide + a linear projection W_out to D ("half d_v + proj")
    share_query: bool = True  # one query for all heads ("share query")
    # RMSNorm over d_k on q_row/q_col and on every sub-key, each with a learnable gain (init
    # 1/d_k^0.33; the released code's query and keys norms) ("q/k norm")
    qk_norm: bool = True
    # statistics of x·W_q over the batch's tokens before the q-norm: "none" = DESIGN §3.1 step 1 (the
    # paper's path; the default since the init fix, which it beat at K = 32 and 256: docs/quality.md
    # §3); "batchnorm" = PKM's query batchnorm (Lample et al. 2019), per query dimension, gradient
    # through the statistics, running statistics in evaluation and decoding; "whiten" = full query
    # whitening (query_norm.BatchWhitening), which stopped the memory collapse of the old init
    query_norm: Literal["none", "batchnorm", "whiten"] = "none"
    query_stats_momentum: float = 0.1  # EMA weight of each training batch in the running statistics
    expansion: int = 4  # E virtual values per physical row (IVE); 1 = off
    tucker_rank: int = 2  # r of TDQKR; 0 = additive product keys (PKM), 1 = rank-1 Tucker
    # TDQKR candidates per side: "top" = top-m of the rank-1 filter (the paper); "signed" = top-m and
    # bottom-m, 2m x 2m rescoring (tdqkr.filter_candidates; finds the slots whose two sub-key scores
    # are both large negative, which "top" misses: docs/quality.md)
    tdqkr_filter: Literal["top", "signed"] = "top"
    cores: int = 2  # h cores of MCS; 1 = off; needs tucker_rank >= 1 when > 1
    # value table init (DESIGN §3.1 step 7): "ffn_matched" picks σ so that, at init, the layer's output
    # variance equals the backbone FFN's (LanguageModel measures both: MemoryLayer.calibrate_value_std);
    # "fixed" uses value_std (the released v1 code: 0.02); "legacy" is the formula used before the init
    # fix, σ² = E/(2·m·H·L) for UltraMem and d^-0.5 for PKM, ~300x too large on a 0.02-init backbone
    value_init: Literal["ffn_matched", "fixed", "legacy"] = "ffn_matched"
    value_std: float = 0.02  # σ of the values when value_init = "fixed"
    aux_loss_alpha: float = 0.0  # Tucker aux loss weight (paper 0.001); 0 = off
    # value LR multiplier: "linear_decay" from value_lr_mult to value_lr_mult_final (DESIGN §3.1 step 8),
    # or "constant" value_lr_mult at every step (V2: a constant 1x ends slightly better on long runs).
    # None = the kind's choice: "constant" for ultramem_v2, else "linear_decay"
    value_lr_schedule: Literal["linear_decay", "constant"] | None = None
    # value LR multiplier at step 0 (paper range 4-10); None = 4.0 with "linear_decay", 1.0 with "constant"
    value_lr_mult: float | None = None
    value_lr_mult_final: float = 1.0  # ... decayed linearly to this (equal to value_lr_mult = constant)
    value_lr_decay_steps: int | None = None  # length of the decay; None = the run's max steps
    # "i:j/i:j": one memory layer per entry, read at block i, added after j; "full": one beside the FFN of
    # every block (i:i for all i, UltraMemV2). None = the kind's choice: "full" for ultramem_v2, else "1:2"
    placement: str | None = None
    # IVE with one shared projector (DESIGN §3.3 item 2): all E virtual blocks pool into one [d_v] sum per
    # token and one W_out d_v -> D follows (pooled answers E times smaller). None = on for ultramem_v2
    shared_projector: bool | None = None
    # d_p: width of the PEER-style pre-value table P_tab [P, d_p] (DESIGN §3.3 item 3): a selected row
    # weighs ⟨x·W_p, P_tab[row]⟩ · s_j. 0 = no pre-values; None = d_v // 3 for ultramem_v2 (V2's best
    # d_p : d_v = 1 : 3), else 0
    d_p: int | None = None
    value_optimizer: Literal["adamw", "adagrad", "sgd"] = "adamw"  # sparse optimizer of the tables
    value_weight_decay: float = 0.0  # decoupled weight decay on touched value rows
    value_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # table storage dtype
    num_partitions: int = 256  # NP of each table (>= the largest shard count expected)
    recall_sample_tokens: int = 32  # tokens per forward kept to measure TDQKR recall vs brute force
    # how steps 5-6 reach the table: "rows" fetches the selected rows and pools here (gradients
    # pushed after backward); "pooled" has the backend pool where the table lives and exchange only
    # partial sums and score gradients (DESIGN §4.2). Same results to float tolerance. rows stays
    # the training default: on `small` (P = 4096 rows, 4096 tokens a step) every row repeats ~16x
    # in a batch, so deduped rows are far fewer bytes than per-token sums; bench/train.py measured
    # remote rows 0.99x and remote pooled 0.95x of local tokens/s (2 cores, 2 shards). Pooled pays
    # off when unique rows per token >> E x shards (big tables, decoding: bench/wire.py, 1/13 of the
    # bytes per decoded token). Serving always uses pooled (DESIGN §6; engine.serving_config).
    # On shards with a RAM budget smaller than a step's rows, rows mode reads each row once a step
    # and pooled once per ~1 MB call: 2.5-2.8x the shard CPU (docs/benchmarks.md, beyond-ram).
    lookup: Literal["rows", "pooled"] = "rows"

    def __post_init__(self) -> None:
        self._resolve_kind_defaults()
        positive = ("num_keys", "d_k", "d_v", "heads", "topk", "expansion", "cores", "num_partitions")
        for name in positive:
            if getattr(self, name) < 1:
                raise ModelConfigError(f"memory.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind not in ("pkm", "ultramem", "ultramem_v2"):
            raise ModelConfigError(f"memory.kind must be 'pkm', 'ultramem' or 'ultramem_v2', got {self.kind!r}")
        if isinstance(self.d_p, bool) or not isinstance(self.d_p, int) or self.d_p < 0:
            raise ModelConfigError(f"memory.d_p must be an int >= 0 (0 = no pre-values), got {self.d_p!r}")
        if not isinstance(self.shared_projector, bool):
            raise ModelConfigError(f"memory.shared_projector must be true or false, got {self.shared_projector!r}")
        if self.value_lr_schedule not in ("linear_decay", "constant"):
            raise ModelConfigError(
                f"memory.value_lr_schedule must be 'linear_decay' or 'constant', got {self.value_lr_schedule!r}"
            )
        if self.tucker_rank < 0:
            raise ModelConfigError(f"memory.tucker_rank must be >= 0, got {self.tucker_rank}")
        if self.topk > self.num_keys:
            raise ModelConfigError(f"memory.topk ({self.topk}) must be <= memory.num_keys ({self.num_keys})")
        if self.tucker_rank == 0 and self.cores != 1:
            raise ModelConfigError(
                "memory.cores > 1 (MCS) needs memory.tucker_rank >= 1 (additive keys have one score)"
            )
        if self.kind == "pkm" and (self.tucker_rank != 0 or self.cores != 1):
            raise ModelConfigError(
                "memory.kind='pkm' uses additive product keys: set tucker_rank=0 and cores=1"
            )
        if self.d_v % self.cores:
            raise ModelConfigError(
                f"memory.d_v ({self.d_v}) must be divisible by memory.cores ({self.cores})"
            )
        if self.aux_loss_alpha < 0:
            raise ModelConfigError(f"memory.aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
        if self.value_lr_mult <= 0 or self.value_lr_mult_final <= 0:
            raise ModelConfigError("memory.value_lr_mult and memory.value_lr_mult_final must be > 0")
        if self.value_lr_decay_steps is not None and self.value_lr_decay_steps < 0:
            raise ModelConfigError(
                f"memory.value_lr_decay_steps must be >= 0, got {self.value_lr_decay_steps}"
            )
        if not 0 < self.query_stats_momentum <= 1:
            raise ModelConfigError(
                f"memory.query_stats_momentum must be in (0, 1], got {self.query_stats_momentum}"
            )
        if self.value_weight_decay < 0 or self.recall_sample_tokens < 0:
            raise ModelConfigError("memory.value_weight_decay and memory.recall_sample_tokens must be >= 0")
        if self.query_norm not in ("none", "batchnorm", "whiten"):
            raise ModelConfigError(f"memory.query_norm must be none, batchnorm or whiten, got {self.query_norm!r}")
        if self.tdqkr_filter not in ("top", "signed"):
            raise ModelConfigError(f"memory.tdqkr_filter must be 'top' or 'signed', got {self.tdqkr_filter!r}")
        if self.tdqkr_filter == "signed" and self.tucker_rank == 0:
            raise ModelConfigError(
                "memory.tdqkr_filter='signed' needs memory.tucker_rank >= 1 (additive keys have no filter)"
            )
        if self.value_init not in ("ffn_matched", "fixed", "legacy"):
            raise ModelConfigError(
                f"memory.value_init must be ffn_matched, fixed or legacy, got {self.value_init!r}"
            )
        if not (math.isfinite(self.value_std) and self.value_std > 0):
            raise ModelConfigError(f"memory.value_std must be finite and > 0, got {self.value_std}")
        if self.lookup not in ("rows", "pooled"):
            raise ModelConfigError(f"memory.lookup must be 'rows' or 'pooled', got {self.lookup!r}")
        if not isinstance(self.placement, str):
            raise ModelConfigError(f"memory.placement must be a string, got {self.placement!r}")
        parse_placement(self.placement, n_layers=1)  # syntax only ("full" is checked by ModelConfig)

    def _resolve_kind_defaults(self) -> None:
        """Fill the fields left None with the kind's choice, so a built config (and the config saved
        with a run) always holds concrete values."""
        v2 = self.kind == "ultramem_v2"
        chosen: dict[str, Any] = {
            "placement": FULL if v2 else "1:2",
            "shared_projector": v2,
            "d_p": max(self.d_v // 3, 1) if v2 and isinstance(self.d_v, int) else 0,
            "value_lr_schedule": "constant" if v2 else "linear_decay",
        }
        for name, value in chosen.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.value_lr_mult is None:
            object.__setattr__(self, "value_lr_mult", 1.0 if self.value_lr_schedule == "constant" else 4.0)

    @classmethod
    def pkm(cls, **overrides: Any) -> MemoryConfig:
        """The paper's first ablation row: product-key memory with softmax, D-wide values, query
        batchnorm (Lample et al. 2019), no UltraMem extras; values ffn_matched like every layer."""
        base: dict[str, Any] = {
            "kind": "pkm",
            "softmax": True,
            "half_dv_proj": False,
            "share_query": False,
            "qk_norm": False,
            "expansion": 1,
            "tucker_rank": 0,
            "cores": 1,
            "value_lr_mult": 1.0,
            "value_lr_mult_final": 1.0,
            "query_norm": "batchnorm",
        }
        return cls(**{**base, **overrides})

    @classmethod
    def ultramem_v2(cls, **overrides: Any) -> MemoryConfig:
        """UltraMemV2 (DESIGN §3.3): a layer beside every block's FFN, one shared IVE projector,
        pre-values with d_p = d_v // 3, constant 1x value LR, Tucker aux loss off."""
        return cls(**{"kind": "ultramem_v2", "aux_loss_alpha": 0.0, **overrides})

    @property
    def placements(self) -> tuple[tuple[int, int], ...]:
        """The (read block, add block) pairs, one per memory layer ("full" needs ModelConfig.placements)."""
        assert self.placement is not None  # resolved in __post_init__
        return parse_placement(self.placement)

    def placements_for(self, n_layers: int) -> tuple[tuple[int, int], ...]:
        """The (read block, add block) pairs of a model with `n_layers` blocks ("full": i:i for every i)."""
        assert self.placement is not None  # resolved in __post_init__
        return parse_placement(self.placement, n_layers)

    @property
    def pool_blocks(self) -> int:
        """Sums per token that pooling makes: E, or 1 with the shared projector (DESIGN §3.3 item 2)."""
        return 1 if self.shared_projector else self.expansion

    @property
    def physical_rows(self) -> int:
        """P = K * K rows of each memory layer's table."""
        return self.num_keys * self.num_keys

    @property
    def side_keys(self) -> tuple[int, int]:
        """(n_row, n_col) virtual sub-keys per side, n_row * n_col = E * K * K (n = √E·K for square E)."""
        a = max(d for d in range(1, math.isqrt(self.expansion) + 1) if self.expansion % d == 0)
        return a * self.num_keys, (self.expansion // a) * self.num_keys

    def value_dim(self, d_model: int) -> int:
        """Width of a value row: d_v with the projection, else d_model (PKM values live in model space)."""
        return self.d_v if self.half_dv_proj else d_model

    def uses_projection(self) -> bool:
        """W_out exists when values are narrower than D or several projectors are needed (IVE)."""
        return self.half_dv_proj or self.pool_blocks > 1

    def value_init_std(self, num_memory_layers: int, d_model: int) -> float | None:
        """σ of the value table from the config alone: value_std ("fixed"), the old formula ("legacy":
        σ² = E/(2·m·H·L), PKM d^-0.5), or None ("ffn_matched": it needs the layer and the backbone)."""
        if self.value_init == "fixed":
            return self.value_std
        if self.value_init == "legacy":
            if self.kind == "pkm":
                return self.value_dim(d_model) ** -0.5
            return math.sqrt(self.expansion / (2 * self.topk * self.heads * num_memory_layers))
        return None


@dataclass
class _Read:
    """A memory read between its read block (`MemoryLayer.begin`) and its add block (`finish`)."""

    shape: torch.Size  # x's [B, T, D]
    dtype: torch.dtype
    virtual: Tensor  # [N, H*m] virtual slots
    scores: Tensor  # [N, H*m, h]
    projector: Tensor  # [N, H*m]
    s_row: Tensor | None  # per-rank scores (None on the decode path, which never builds them)
    s_col: Tensor | None
    pooled: Tensor | None = None  # pooled mode: [N, E, d_v], already looked up ...
    pooled_future: Future[Arrival] | None = None  # ... or, without autograd, in flight
    unique: Tensor | None = None  # rows mode: unique physical rows [U] (on the device) ...
    inverse: Tensor | None = None  # ... and where each selection's row sits in them [N, H*m]
    values: Future[Arrival] | None = None  # ... and the lookup in flight -> [U, d_v] on the device
    q_p: Tensor | None = None  # pre-values (DESIGN §3.3): the projected query x·W_p [N, d_p] ...
    pre_values: Future[Arrival] | None = None  # ... rows mode: the P_tab lookup in flight -> [U, d_p]


class MemoryLayer(EvalCached):
    """One PKM/UltraMem layer: x [B, T, D] (normalized FFN input of its read block) -> y [B, T, D].

    In eval the normed sub-keys (in the layout of the score matmul) are cached until the keys change
    (model_workers/eval_cache.py), so a decode step does not rebuild them from the parameters; without
    autograd, TDQKR with a shared query takes `tdqkr_topk_decode` (no [N, H, n, r] score tensors).
    """

    def __init__(
        self, cfg: MemoryConfig, d_model: int, index: int, num_memory_layers: int, seed: int,
        *, slot_buffers: bool = True,
    ) -> None:
        """`slot_buffers=False` leaves out π and the hit counts ([E·P] each): a parameters-only twin
        for `calibrate_value_std` when this layer lives on the meta device (planning)."""
        super().__init__()
        self.cfg, self.d_model, self.index = cfg, d_model, index
        self.table = f"mem{index}.values"
        # the pre-value table P_tab [P, d_p] (DESIGN §3.3 item 3): the same rows as the value table
        self.pre_table: str | None = f"mem{index}.pre_values" if cfg.d_p else None
        self.num_memory_layers = num_memory_layers
        self.seed = seed
        self.n_row, self.n_col = cfg.side_keys
        self.d_v = cfg.value_dim(d_model)
        self.rank = max(cfg.tucker_rank, 1)  # additive keys are stored as rank 1
        q_heads = 1 if cfg.share_query else cfg.heads
        self.w_q = nn.Linear(d_model, q_heads * 2 * cfg.d_k, bias=False)  # W_q: D -> 2·d_k (per head)
        q_dim = q_heads * 2 * cfg.d_k
        self.q_stats: nn.Module | None = None  # no affine: the q-norm gain (or the keys) scale the scores
        if cfg.query_norm == "batchnorm":
            self.q_stats = nn.BatchNorm1d(q_dim, momentum=cfg.query_stats_momentum, affine=False)
        elif cfg.query_norm == "whiten":
            self.q_stats = BatchWhitening(q_dim, cfg.query_stats_momentum)
        self.q_norm_row = RMSNorm(cfg.d_k) if cfg.qk_norm else None
        self.q_norm_col = RMSNorm(cfg.d_k) if cfg.qk_norm else None
        # the keys' norm over d_k with a learnable gain (the released code's keys_norm, DESIGN §3.1 step 2)
        self.k_norm_row = RMSNorm(cfg.d_k) if cfg.qk_norm else None
        self.k_norm_col = RMSNorm(cfg.d_k) if cfg.qk_norm else None
        self.keys_row = nn.Parameter(torch.empty(cfg.heads, self.n_row, cfg.d_k, self.rank))
        self.keys_col = nn.Parameter(torch.empty(cfg.heads, self.n_col, cfg.d_k, self.rank))
        gen = torch.Generator().manual_seed(seed)
        self.tucker = (
            TuckerCores(cfg.heads, cfg.tucker_rank, cfg.cores, gen) if cfg.tucker_rank >= 1 else None
        )
        # π: persistent so every checkpoint carries it (DESIGN §3.1 step 4)
        num_virtual = cfg.expansion * cfg.physical_rows if slot_buffers else 1
        self.register_buffer("permutation", make_permutation(num_virtual, seed, identity=cfg.expansion == 1))
        # W_out: E·d_v -> D (one W_e per projector), or d_v -> D with the shared projector (DESIGN §3.3)
        self.w_out = (
            nn.Linear(cfg.pool_blocks * self.d_v, d_model, bias=False) if cfg.uses_projection() else None
        )
        self.w_p = nn.Linear(d_model, cfg.d_p, bias=False) if cfg.d_p else None  # W_p: D -> d_p
        self.pre_value_std: float | None = pre_value_std(cfg.d_p) if cfg.d_p else None
        self.register_buffer("hits", torch.zeros(num_virtual, dtype=torch.int64), persistent=False)
        self.backend: ValueBackend | None = None
        # (table, unique rows [U], fetched leaf [U, dim]) on the device, until `pending_table_grads`
        self._pending: list[tuple[str, Tensor, Tensor]] = []
        # the device <-> host copies of this layer's lookups, in reused (pinned on CUDA) host buffers
        self.staging = HostStaging()
        # top-1 score sum, output sum, output sum of squares: accumulated on the device (no sync per step)
        self._stats = torch.zeros(3, dtype=torch.float64)
        self._score_count = 0  # (token, head) pairs behind the top-1 sum
        self._out_count = 0
        self._sample: tuple[Tensor, Tensor, Tensor] | None = None  # s_row, s_col, found (for recall)
        self.reset_parameters(gen)
        # σ of the value table; "ffn_matched" is set by LanguageModel (calibrate_value_std) once the
        # backbone's FFN output variance is known
        self.value_std: float | None = cfg.value_init_std(num_memory_layers, d_model)

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator) -> None:
        """DESIGN §3.1 step 7: keys N(0, 1/d_k), W_q N(0, 1/d_k) (the released code's), W_out
        N(0, 1/(E·d_v)) (1/d_v with the shared projector), q-norm and k-norm gains d_k^-0.33; W_p N(0, 1/D)
        (prevalues.py). Values: see `calibrate_value_std`; pre-values N(0, 1/d_p)."""
        cfg = self.cfg
        nn.init.normal_(self.w_q.weight, 0.0, cfg.d_k**-0.5, generator=gen)
        nn.init.normal_(self.keys_row, 0.0, cfg.d_k**-0.5, generator=gen)
        nn.init.normal_(self.keys_col, 0.0, cfg.d_k**-0.5, generator=gen)
        for norm in (self.q_norm_row, self.q_norm_col, self.k_norm_row, self.k_norm_col):
            if norm is not None:
                norm.weight.fill_(cfg.d_k**-0.33)
        if self.w_out is not None:
            nn.init.normal_(self.w_out.weight, 0.0, (cfg.pool_blocks * self.d_v) ** -0.5, generator=gen)
        if self.w_p is not None:
            nn.init.normal_(self.w_p.weight, 0.0, self.d_model**-0.5, generator=gen)

    @torch.no_grad()
    def unit_value_output_var(self, tokens: int = 1024) -> float:
        """Per-element variance of the output y at the current (init) parameters if the values were
        N(0, 1), in expectation over the values and π (a selection's projector is uniform over E):
        E[y²] = (1/D)·Σ_c w_c·mean_t Σ_j s_c[t, j]², w_c = Σ over the W_out columns of slice c of
        |column|², averaged over the E projectors (one shared projector: DESIGN §3.3; d_v/h without
        W_out). With pre-values each s_c[t, j]² is multiplied by E[a_j²] = σ_p²·|q_p[t]|² (in
        expectation over P_tab ~ N(0, σ_p²), prevalues.py). The selections and scores s come from a
        fixed probe of N(0, 1) inputs (unit RMS, like the normed FFN input the layer reads), with the
        probe's own batch statistics (whitening / batchnorm); no running statistic, hit count or
        other state changes."""
        gen = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(tokens, self.d_model, generator=gen).to(self.w_q.weight)
        q = self.w_q(x)
        if isinstance(self.q_stats, BatchWhitening):
            mean = q.mean(0)
            cov = (q - mean).T @ (q - mean) / tokens
            q = self.q_stats._whiten(q, mean, self.q_stats._cholesky(cov))
        elif isinstance(self.q_stats, nn.BatchNorm1d):
            q = F.batch_norm(q, None, None, training=True, eps=self.q_stats.eps)
        _, scores = self.retrieve(*self.key_scores(*self._split_query(q)))
        h, e = scores.shape[-1], self.cfg.pool_blocks
        per_token = scores.double().pow(2).reshape(tokens, -1, h).sum(1)  # (T, h)
        if self.w_p is not None and self.pre_value_std is not None:
            a2 = self.pre_value_std**2 * self.w_p(x).double().pow(2).sum(-1)  # (T,) E[a_j²] per token
            per_token = per_token * a2.unsqueeze(-1)
        per_core = per_token.mean(0)  # (h,)
        width = self.d_v // h
        if self.w_out is not None:
            cols = self.w_out.weight.double().pow(2).sum(0).view(e, h, width).sum(-1).mean(0)  # (h,)
        else:
            cols = torch.full((h,), float(width), dtype=torch.float64)
        return float((cols * per_core).sum()) / self.d_model

    def calibrate_value_std(self, target_var: float) -> float:
        """value_init = "ffn_matched": σ (3 significant digits, so every process that builds the model
        agrees on its table spec) with which the output variance at init equals `target_var`."""
        if self.cfg.value_init == "ffn_matched":
            if self.w_q.weight.is_meta:  # planning on the meta device: the same parameters, on the CPU
                with torch.device("cpu"):
                    twin = MemoryLayer(self.cfg, self.d_model, self.index, self.num_memory_layers, self.seed,
                                       slot_buffers=False)
                    unit = twin.unit_value_output_var()
            else:
                unit = self.unit_value_output_var()
            sigma = math.sqrt(target_var / unit)
            self.value_std = float(f"{sigma:.3g}")
        assert self.value_std is not None
        return self.value_std

    # ----------------------------------------------------------------------------- retrieval
    def query(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Step 1: x [N, D] -> q_row, q_col [N, H or 1, d_k]."""
        q = self.w_q(x)  # (N, Hq*2*d_k)
        if self.q_stats is not None:
            q = self.q_stats(q)
        return self._split_query(q)

    def _split_query(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """q [N, Hq*2*d_k] after the batch statistics -> q_row, q_col [N, Hq, d_k], q-normed."""
        q = q.view(q.shape[0], -1, 2, self.cfg.d_k)  # (N, Hq, 2, d_k)
        q_row, q_col = q[:, :, 0], q[:, :, 1]
        if self.q_norm_row is not None and self.q_norm_col is not None:
            q_row, q_col = self.q_norm_row(q_row), self.q_norm_col(q_col)
        return q_row, q_col

    def key_scores(self, q_row: Tensor, q_col: Tensor) -> tuple[Tensor, Tensor]:
        """Step 2: per-rank scores S_row [N, H, n_row, r], S_col [N, H, n_col, r]."""
        return self._side_scores(q_row, self.keys_row, "row"), self._side_scores(q_col, self.keys_col, "col")

    def _key_sources(self, side: str) -> tuple[Tensor, ...]:
        """The parameters a side's normed keys are made of: the keys and (with qk_norm) the k-norm gain."""
        keys, norm = (self.keys_row, self.k_norm_row) if side == "row" else (self.keys_col, self.k_norm_col)
        return (keys,) if norm is None else (keys, norm.weight)

    def _normed(self, side: str, dtype: torch.dtype) -> Tensor:
        """A side's keys [H, n, d_k, r], each key vector RMS-normed over d_k times the learnable gain
        (init d_k^-0.33, like the query's) if qk_norm, in `dtype`."""
        keys, *gain = self._key_sources(side)
        if not gain:
            return keys.to(dtype)
        norm = self.k_norm_row if side == "row" else self.k_norm_col
        assert norm is not None
        kf = keys.float() if keys.dtype in (torch.float16, torch.bfloat16) else keys
        normed = kf * torch.rsqrt(kf.pow(2).mean(2, keepdim=True) + norm.eps)
        return (normed * gain[0].to(kf.dtype).view(-1, 1)).to(dtype)

    def _side_scores(self, q: Tensor, keys: Tensor, side: str) -> Tensor:
        """q [N, H or 1, d_k], keys [H, n, d_k, r] -> [N, H, n, r]; prepared keys cached in eval."""
        shared = q.shape[1] == 1
        sources = self._key_sources(side)

        def prepare() -> Tensor:
            k = self._normed(side, q.dtype)  # (H, n, d_k, r)
            return key_matrix(k) if shared else k  # a shared query needs only the (d_k, H*n*r) matrix

        if EvalCache.usable(self, sources):
            prepared = self.eval_cache.get((side, q.dtype, shared), sources, prepare)
        else:
            prepared = prepare()
        return rank_scores(q, keys, prepared) if shared else rank_scores(q, prepared)

    def retrieve(self, s_row: Tensor, s_col: Tensor) -> tuple[Tensor, Tensor]:
        """Step 3: -> virtual_index [N, H, m], scores [N, H, m, h] (softmax over m if configured)."""
        m = self.cfg.topk
        if self.tucker is None:
            virtual, scores = product_key_topk(s_row[..., 0], s_col[..., 0], m)
            scores = scores.unsqueeze(-1)  # (N, H, m, 1)
        else:
            t = self.tucker
            virtual, scores = tdqkr_topk(s_row, s_col, t.cores, t.filter_u, t.filter_v, m,
                                         signed=self.cfg.tdqkr_filter == "signed")
        if self.cfg.softmax:
            scores = torch.softmax(scores.float(), dim=2).to(scores.dtype)
        return virtual, scores

    def _decoding(self, q_row: Tensor) -> bool:
        """Whether steps 2-3 may take the decode path: TDQKR, a shared query, eval without autograd."""
        if self.tucker is None or q_row.shape[1] != 1:
            return False
        return EvalCache.usable(self, (*self._key_sources("row"), *self._key_sources("col"), self.tucker.cores))

    def retrieve_decode(self, q_row: Tensor, q_col: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 2-3 from the queries [N, 1, d_k] -> virtual_index [N, H, m], scores [N, H, m, h].

        The same selection as `retrieve(*key_scores(...))` with scores to float rounding
        (tdqkr.tdqkr_topk_decode); the filter-folded keys are cached until keys or filter change.
        """
        t, dtype = self.tucker, q_row.dtype
        assert t is not None
        row = self.eval_cache.get(("decode", "row", dtype), (*self._key_sources("row"), t.filter_u),
                                  lambda: DecodeKeys.make(self._normed("row", dtype), t.filter_u))
        col = self.eval_cache.get(("decode", "col", dtype), (*self._key_sources("col"), t.filter_v),
                                  lambda: DecodeKeys.make(self._normed("col", dtype), t.filter_v))
        virtual, scores = tdqkr_topk_decode(q_row[:, 0], q_col[:, 0], row, col, t.cores, self.cfg.topk,
                                            signed=self.cfg.tdqkr_filter == "signed")
        if self.cfg.softmax:
            scores = torch.softmax(scores.float(), dim=2).to(scores.dtype)
        return virtual, scores

    # ----------------------------------------------------------------------------- values
    def _backend(self) -> ValueBackend:
        if self.backend is None:
            raise RuntimeError(f"{self.table}: no ValueBackend attached (LanguageModel.set_backend)")
        return self.backend

    def fetch(self, rows: Tensor) -> Tensor:
        """Fetch the rows [N, J] through the backend -> values [N, J, d_v] (grad lands on a leaf)."""
        return self._fetch_table(self.table, rows, "lookup", "answer")

    def _fetch_table(self, table: str, rows: Tensor, lookup_key: str, answer_key: str) -> Tensor:
        """Rows [N, J] of `table` through the backend -> [N, J, width]: unique rows in one
        device-to-host copy (staging `lookup_key`), the answer back through `answer_key`; with grad
        enabled the answer is a leaf whose gradient is pushed after backward (`_pending`)."""
        unique, inverse = torch.unique(rows, return_inverse=True)  # on the device
        (unique_host,) = self.staging.to_host(lookup_key, unique)  # the one device-to-host copy
        leaf = self.staging.to_device(answer_key, self._backend().fetch_rows(table, unique_host),
                                      rows.device)  # (U, width)
        if torch.is_grad_enabled():
            leaf.requires_grad_(True)
            self._pending.append((table, unique, leaf))
        return F.embedding(inverse, leaf)  # (N, J, width)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> y [B, T, D] (to be added to the residual after the add block)."""
        return self.finish(self.begin(x))

    def begin(self, x: Tensor) -> _Read:
        """Steps 1-4 at the read block, and the value lookup started: x [B, T, D] -> a pending read.

        In rows mode the rows are requested from the backend without waiting, so the dense blocks
        before the add block run while the lookup travels (`finish` waits for it); in pooled mode
        the same happens without autograd (decoding, `ValueBackend.pooled_async`). The request
        leaves the device in one copy (model_workers/transfer.py); the answer comes back with a
        non_blocking copy (on CUDA, on a side stream as soon as it arrives).
        """
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        q_row, q_col = self.query(xf)  # step 1
        s_row = s_col = None
        if self._decoding(q_row):  # steps 2-3 for decoding, without the [N, H, n, r] score tensors
            virtual, scores = self.retrieve_decode(q_row, q_col)
        else:
            s_row, s_col = self.key_scores(q_row, q_col)  # step 2
            virtual, scores = self.retrieve(s_row, s_col)  # step 3
        n, h = b * t, scores.shape[-1]
        virtual = virtual.reshape(n, -1)  # (N, H*m)
        scores = scores.reshape(n, -1, h)  # (N, H*m, h)
        rows, projector = split_virtual(virtual, self.permutation, self.cfg.physical_rows)  # step 4
        if self.cfg.shared_projector:  # DESIGN §3.3 item 2: every virtual block pools into one sum
            projector = torch.zeros_like(projector)
        read = _Read(x.shape, x.dtype, virtual, scores, projector, s_row, s_col)
        if self.w_p is not None:
            read.q_p = self.w_p(xf)  # (N, d_p), DESIGN §3.3 item 3
        e = self.cfg.pool_blocks
        if self.cfg.lookup == "pooled":  # steps 5-6 where the table lives: (N, E, d_v)
            # with pre-values the backend also gets q_p and weighs each slot by ⟨q_p, P_tab[row]⟩ itself
            pre_table = self.pre_table if read.q_p is not None else None
            if not torch.is_grad_enabled():  # decoding: overlap the hop (as rows mode)
                token = torch.arange(n, dtype=torch.int64).repeat_interleave(rows.shape[1])  # (N*H*m,)
                q_p = () if read.q_p is None else (read.q_p.detach().float(),)
                host = self.staging.to_host(  # the one device-to-host copy
                    "lookup", rows.reshape(-1), projector.reshape(-1), scores.reshape(-1, h).detach().float(), *q_p)
                pre = {} if pre_table is None else {"pre_table": pre_table, "q_p": host[3]}
                answer = self._backend().pooled_async(self.table, host[0], host[1], token, host[2], n, e, **pre)
                read.pooled_future = self.staging.to_device_async("answer", answer, x.device)
            else:
                read.pooled = pooled_lookup(self._backend(), self.table, rows, projector, scores, e,
                                            staging=self.staging, pre_table=pre_table, q_p=read.q_p)
        else:
            read.unique, read.inverse = torch.unique(rows, return_inverse=True)  # on the device
            (unique_host,) = self.staging.to_host("lookup", read.unique)  # the one device-to-host copy
            answer = self._backend().fetch_rows_async(self.table, unique_host)
            read.values = self.staging.to_device_async("answer", answer, x.device)
            if self.pre_table is not None:  # P_tab rows of the same unique rows, in flight beside the values
                pre = self._backend().fetch_rows_async(self.pre_table, unique_host)
                read.pre_values = self.staging.to_device_async("pre_answer", pre, x.device)
        return read

    def finish(self, read: _Read) -> Tensor:
        """Steps 5-7 after the add block: wait for the values, pool, project -> y [B, T, D]."""
        b, t, d = read.shape
        n = b * t
        if read.pooled_future is not None:
            o = read.pooled_future.result().get()  # (N, E, d_v)
        elif read.pooled is not None:
            o = read.pooled
        else:
            assert read.values is not None and read.unique is not None and read.inverse is not None
            leaf = self._arrived(self.table, read.values, read.unique)  # (U, d_v), on the device
            values = F.embedding(read.inverse, leaf)  # (N, H*m, d_v)
            scores = read.scores
            if read.pre_values is not None and read.q_p is not None and self.pre_table is not None:
                pre = F.embedding(read.inverse, self._arrived(self.pre_table, read.pre_values, read.unique))
                scores = weight_scores(scores, pre_value_weight(read.q_p, pre))  # a_j · s_j, (N, H*m, h)
            o = pooled_sum(values, read.projector, scores, self.cfg.pool_blocks)  # steps 5-6: (N, E, d_v)
        o = o.reshape(n, -1).to(read.dtype)  # (N, E*d_v)
        y = self.w_out(o) if self.w_out is not None else o
        if self.training:
            assert read.s_row is not None and read.s_col is not None  # the decode path is eval-only
            self._record(read.virtual, read.scores, y, read.s_row, read.s_col)
        return y.view(b, t, d)

    def _arrived(self, table: str, answer: Future[Arrival], unique: Tensor) -> Tensor:
        """Wait for a rows-mode lookup -> the leaf [U, dim] on the device (kept for its gradient)."""
        leaf = answer.result().get()
        if torch.is_grad_enabled():
            leaf.requires_grad_(True)
            self._pending.append((table, unique, leaf))
        return leaf

    def after_optimizer_step(self) -> None:
        """Per-step refresh: the TDQKR rank-1 filter from the new cores."""
        if self.tucker is not None:
            self.tucker.refresh_filter()

    def aux_loss(self) -> Tensor:
        """Tucker aux loss (0 unless tucker_rank >= 2 and aux_loss_alpha > 0)."""
        if self.tucker is None:
            return self.keys_row.new_zeros(())
        return self.tucker.aux_loss(self.cfg.aux_loss_alpha)

    # ----------------------------------------------------------------------------- training hooks
    def pending_table_grads(self) -> list[tuple[str, Tensor, Tensor]]:
        """(table, rows int64 [N], grads float32 [N, dim]) per table fetched in rows mode since the last
        call (then forgotten): the value table, and P_tab with pre-values. On the host, read from the
        device in one copy; views of this layer's staging buffer, valid until the next call."""
        by_table: dict[str, list[tuple[Tensor, Tensor]]] = {}
        for table, rows, leaf in self._pending:
            if leaf.grad is not None:
                by_table.setdefault(table, []).append((rows, leaf.grad))
        self._pending.clear()
        parts: list[Tensor] = []
        for got in by_table.values():
            parts.append(torch.cat([r for r, _ in got]))  # (N,), on the device
            parts.append(torch.cat([g.detach().float() for _, g in got]))  # (N, dim)
        if not parts:
            return []
        host = self.staging.to_host("grads", *parts)  # the one device-to-host copy
        return [(table, host[2 * i], host[2 * i + 1]) for i, table in enumerate(by_table)]

    def pending_grads(self) -> tuple[Tensor, Tensor] | None:
        """The value table's rows int64 [N] and grads float32 [N, d_v] of `pending_table_grads` (the
        rest is forgotten), or None when no value row got a gradient."""
        for table, rows, grads in self.pending_table_grads():
            if table == self.table:
                return rows, grads
        return None

    @torch.no_grad()
    def _record(self, virtual: Tensor, scores: Tensor, y: Tensor, s_row: Tensor, s_col: Tensor) -> None:
        """Accumulate step 9's statistics on the device: no host sync here (`metrics` reads them)."""
        slots = virtual.reshape(-1)
        self.hits.index_add_(0, slots, torch.ones_like(slots))  # bincount would sync on CUDA (its size)
        total = scores.float().sum(-1).view(virtual.shape[0], self.cfg.heads, -1)  # (N, H, m)
        yf = y.detach().float()
        sums = torch.stack([total.max(-1).values.sum(), yf.sum(), yf.pow(2).sum()]).to(torch.float64)
        if self._stats.device != sums.device:  # first step on this device
            self._stats = self._stats.to(sums.device)
        self._stats += sums
        self._score_count += total.shape[0] * total.shape[1]
        self._out_count += yf.numel()
        k = min(self.cfg.recall_sample_tokens, virtual.shape[0])
        if k:
            found = virtual[:k].view(k, self.cfg.heads, -1)
            self._sample = (s_row[:k].detach().float(), s_col[:k].detach().float(), found)

    @torch.no_grad()
    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Step 9: coverage, KL(hits || uniform), top-1 score, output std, TDQKR recall (sampled)."""
        out: dict[str, float] = {}
        total = int(self.hits.sum())
        if total:
            p = self.hits.double() / total
            nz = p[p > 0]
            out["coverage"] = float((self.hits > 0).double().mean())
            out["kl_uniform"] = float((nz * torch.log(nz * self.hits.numel())).sum())
        top1_sum, s1, s2 = self._stats.tolist()
        if self._score_count:
            out["top1_score"] = top1_sum / self._score_count
        if self._out_count:
            mean = s1 / self._out_count
            out["output_std"] = math.sqrt(max(s2 / self._out_count - mean * mean, 0.0))
        if self._sample is not None:
            s_row, s_col, found = self._sample
            m = self.cfg.topk
            if self.tucker is None:
                ref, _ = brute_force_product_keys(s_row[..., 0], s_col[..., 0], m)
            else:
                ref, _ = brute_force_topk(s_row, s_col, self.tucker.cores.detach().float(), m)
            out["tdqkr_recall"] = recall(found, ref)
        if reset:
            self.hits.zero_()
            self._stats.zero_()
            self._score_count = 0
            self._out_count = 0
            self._sample = None
        return out
