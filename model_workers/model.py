"""The language model (DESIGN §3): a pre-norm decoder-only transformer plus memory layers.

Blocks: h += Attn(RMSNorm(h)); x = RMSNorm(h); h += FFN(x) (+ memory outputs due after this block).
FFN kinds: dense SwiGLU, MoE (top-2 of N), or dense SwiGLU with PKM/UltraMem/UltraMemV2 memory layers
beside it: a memory layer reads x of block i and its output is added to the residual after block j
(skip-layer, `MemoryConfig.placement`; UltraMemV2: "full", one beside every block's FFN, DESIGN §3.3).
Rotary positions, tied input/output embeddings, a KV cache for decoding.

Memory values are not parameters: they come from a `ValueBackend` (values.py). Training recipe:
    out = model(tokens, targets); (out.loss + out.aux_loss).backward()
    dense_opt.step(); model.push_value_grads(lr, step, max_steps); model.after_optimizer_step()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_workers.layers import (
    Attention,
    KVCache,
    RMSNorm,
    Rotary,
    SwiGLU,
    swiglu_hidden,
    swiglu_init_output_var,
)
from model_workers.moe import MoE, MoEConfig
from model_workers.schedule import value_lr_multiplier
from model_workers.ultramem import MemoryConfig, MemoryLayer, ModelConfigError
from model_workers.values import LocalBackend, ValueBackend
from storage.layout import TableSpec

FfnKind = Literal["dense", "pkm", "ultramem", "ultramem_v2", "moe"]
MEMORY_KINDS = ("pkm", "ultramem", "ultramem_v2")


@dataclass(frozen=True)
class ModelConfig:
    """The whole model; ``memory`` is used when ffn_kind is pkm/ultramem/ultramem_v2, ``moe`` when it is moe."""

    vocab_size: int = 8192  # tokenizer vocabulary
    d_model: int = 256  # D
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads (head size D / n_heads, even for rotary)
    max_seq_len: int = 256  # longest context (rotary table and KV cache length)
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * D (rounded up to a multiple of 8)
    rope_theta: float = 10000.0  # rotary base
    # dense | pkm | ultramem | ultramem_v2 (memory beside the FFN) | moe. UltraMemV2 runs its FFN narrower
    # (DESIGN §3.3 item 1): lower ffn_mult with it (orchestration/presets/tiny_v2.toml)
    ffn_kind: FfnKind = "ultramem"
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    init_seed: int = 0  # seeds dense init, cores, π and the value tables
    norm_eps: float = 1e-6  # RMSNorm epsilon

    def __post_init__(self) -> None:
        if self.init_seed < 0:
            raise ModelConfigError(f"model.init_seed must be >= 0, got {self.init_seed}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ModelConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ModelConfigError(
                f"model.d_model ({self.d_model}) / n_heads ({self.n_heads}) must be an even integer"
            )
        if self.ffn_kind not in ("dense", *MEMORY_KINDS, "moe"):
            raise ModelConfigError(
                f"model.ffn_kind must be dense, pkm, ultramem, ultramem_v2 or moe, got {self.ffn_kind!r}"
            )
        if self.ffn_mult <= 0:
            raise ModelConfigError(f"model.ffn_mult must be > 0, got {self.ffn_mult}")
        if self.has_memory:
            if self.memory.kind != self.ffn_kind:
                raise ModelConfigError(
                    f"model.ffn_kind={self.ffn_kind!r} needs memory.kind={self.ffn_kind!r}"
                )
            for read, add in self.placements:
                if add >= self.n_layers:
                    raise ModelConfigError(
                        f"memory.placement {read}:{add} is past the last block ({self.n_layers - 1})"
                    )

    @property
    def has_memory(self) -> bool:
        return self.ffn_kind in MEMORY_KINDS

    @property
    def placements(self) -> tuple[tuple[int, int], ...]:
        """(read block, add block) per memory layer (`memory.placement`, "full" = i:i for every block);
        () without memory."""
        return self.memory.placements_for(self.n_layers) if self.has_memory else ()


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    loss: Tensor | None  # mean cross-entropy over targets != -1, or None without targets
    aux_loss: Tensor  # scalar: Tucker aux losses + MoE balance losses (0 if none); add it to loss


class Block(nn.Module):
    """Pre-norm block; returns the new residual and the normalized FFN input (what memories read)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.ffn_kind == "moe":
            hidden = swiglu_hidden(cfg.d_model, cfg.moe.expert_ffn_mult)
            self.ffn: nn.Module = MoE(cfg.moe, cfg.d_model, hidden)
        else:
            self.ffn = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.ffn_mult))

    def forward(
        self, h: Tensor, rotary: Rotary, cache: KVCache | None, layer: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        h = h + self.attn(self.attn_norm(h), rotary, cache, layer)
        x = self.ffn_norm(h)
        if isinstance(self.ffn, MoE):
            y, aux = self.ffn(x)
            return h + y, x, aux
        return h + self.ffn(x), x, None


class LanguageModel(nn.Module):
    """Decoder-only LM with optional PKM/UltraMem/MoE layers (see module docstring for the recipe)."""

    def __init__(self, cfg: ModelConfig, backend: ValueBackend | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        placements = cfg.placements
        self.placements = placements
        self.memories = nn.ModuleList(
            MemoryLayer(
                cfg.memory, cfg.d_model, k, len(placements), seed=cfg.init_seed * 1_000_003 + 17 * k + 1
            )
            for k in range(len(placements))
        )
        self._init_dense(torch.Generator().manual_seed(cfg.init_seed))
        for layer in self.memories:  # DESIGN §3.1 step 7: value σ (ffn_matched: output var = the FFN's)
            layer.calibrate_value_std(self.ffn_init_output_var())
        self.backend: ValueBackend | None = None
        if self.memories:
            self.set_backend(backend if backend is not None else LocalBackend(self.memory_tables()))

    INIT_STD = 0.02  # GPT-2 init of the dense weights

    def ffn_init_output_var(self) -> float:
        """Per-element variance of a block's dense SwiGLU FFN output at init (analytic, unit-RMS input)."""
        cfg = self.cfg
        out_std = self.INIT_STD / math.sqrt(2 * cfg.n_layers)
        return swiglu_init_output_var(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.ffn_mult), self.INIT_STD, out_std)

    @torch.no_grad()
    def _init_dense(self, gen: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02²), residual output projections N(0, (0.02/√(2L))²); tied lm head."""
        std, out_std = self.INIT_STD, self.INIT_STD / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_emb.weight, 0.0, std, generator=gen)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, 0.0, std, generator=gen)
            nn.init.normal_(block.attn.proj.weight, 0.0, out_std, generator=gen)
            if isinstance(block.ffn, MoE):
                block.ffn.reset_parameters(gen, std, out_std)
            else:
                nn.init.normal_(block.ffn.w1.weight, 0.0, std, generator=gen)
                nn.init.normal_(block.ffn.w3.weight, 0.0, std, generator=gen)
                nn.init.normal_(block.ffn.w2.weight, 0.0, out_std, generator=gen)

    # ------------------------------------------------------------------ value tables
    PRE_VALUE_SEED = 8  # P_tab's seed = the layer's + 8: never another layer's (layer seeds step by 17)

    def memory_tables(self) -> list[TableSpec]:
        """The sparse tables the memory layers need: "mem{k}.values" (P = K² rows, d_v wide) and, with
        pre-values (DESIGN §3.3), "mem{k}.pre_values" beside it: the same rows and partitions, d_p wide,
        the same optimizer (and value LR)."""
        mc = self.cfg.memory
        args = (("beta1", 0.9), ("beta2", 0.95), ("weight_decay", mc.value_weight_decay))
        common = {
            "rows": mc.physical_rows,
            "dtype": mc.value_dtype,
            "num_partitions": min(mc.num_partitions, mc.physical_rows),
            "optimizer": mc.value_optimizer,
            "optimizer_args": args if mc.value_optimizer == "adamw" else (("weight_decay", mc.value_weight_decay),),
        }
        specs = []
        for layer in self.memories:
            specs.append(TableSpec(name=layer.table, dim=layer.d_v, init_std=layer.value_std, seed=layer.seed,
                                   **common))
            if layer.pre_table is not None:
                specs.append(TableSpec(name=layer.pre_table, dim=mc.d_p, init_std=layer.pre_value_std,
                                       seed=layer.seed + self.PRE_VALUE_SEED, **common))
        return specs

    def set_backend(self, backend: ValueBackend) -> None:
        """Attach a backend after checking it serves every table with the right shape."""
        have = backend.tables()
        for spec in self.memory_tables():
            got = have.get(spec.name)
            if got is None or (got.rows, got.dim) != (spec.rows, spec.dim):
                raise ModelConfigError(
                    f"backend lacks table {spec.name} [{spec.rows}, {spec.dim}] (has {got})"
                )
        self.backend = backend
        for layer in self.memories:
            layer.backend = backend

    def init_memory_tables(self, backend: ValueBackend) -> None:
        """(Re)create every value table in ``backend`` with its initial values, then attach it."""
        for spec in self.memory_tables():
            backend.add_table(spec, init=True)
        self.set_backend(backend)

    # ------------------------------------------------------------------ forward
    def forward(
        self, tokens: Tensor, targets: Tensor | None = None, *, cache: KVCache | None = None
    ) -> ModelOutput:
        """tokens int64 [B, T] (positions cache.pos.. with a cache) -> ModelOutput (logits [B, T, V]).

        With ``cache.positions`` set (batched decoding), T must be 1 and row b is at its own position.
        """
        b, t = tokens.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and cache.positions is not None:  # batched decoding: per-row positions
            start = int(cache.positions.max()) if cache.positions.numel() else 0
        if start + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + t} positions exceeds max_seq_len {self.cfg.max_seq_len}")
        h = self.tok_emb(tokens)  # (B, T, D)
        aux = h.new_zeros((), dtype=torch.float32)
        due: dict[int, list[tuple[int, Any]]] = {}
        for i, block in enumerate(self.blocks):
            h, x, block_aux = block(h, self.rotary, cache, i)
            if block_aux is not None:
                aux = aux + block_aux
            for k, (read, add) in enumerate(self.placements):
                if read == i:  # memory reads the normalized FFN input of block i (lookup in flight) ...
                    due.setdefault(add, []).append((k, self.memories[k].begin(x)))
            for k, pending in due.pop(i, []):  # ... and is added after block j (skip-layer): blocks
                h = h + self.memories[k].finish(pending)  # i+1..j ran while the values travelled
        if cache is not None:
            if cache.positions is not None:
                cache.positions += t
            else:
                cache.pos += t
        for layer in self.memories:
            aux = aux + layer.aux_loss()
        logits = F.linear(self.norm(h), self.tok_emb.weight)  # tied embeddings, (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(b * t, -1), targets.reshape(-1), ignore_index=-1)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux)

    # ------------------------------------------------------------------ training hooks
    def push_value_grads(self, lr: float, step: int, max_steps: int | None = None) -> None:
        """After backward: push each memory layer's fetched-row grads (values, and pre-values at the same
        LR) at lr * value_lr_multiplier(step)."""
        if not self.memories:
            return
        assert self.backend is not None  # set in __init__ whenever there are memories
        value_lr = lr * value_lr_multiplier(step, self.cfg.memory, max_steps)
        for layer in self.memories:
            for table, rows, grads in layer.pending_table_grads():
                self.backend.push_grads(table, rows, grads, value_lr, step)

    def after_optimizer_step(self) -> None:
        """Per-step memory refresh: TDQKR rank-1 filters from the updated cores (fp32 SVD, sign aligned)."""
        for layer in self.memories:
            layer.after_optimizer_step()

    def memory_metrics(self, reset: bool = True) -> dict[str, float]:
        """Per layer "mem{k}/{coverage,kl_uniform,top1_score,output_std,tdqkr_recall}" and "moe{i}/max_load"."""
        out: dict[str, float] = {}
        for k, layer in enumerate(self.memories):
            out.update({f"mem{k}/{name}": v for name, v in layer.metrics(reset).items()})
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoE):
                out.update({f"moe{i}/{name}": v for name, v in block.ffn.metrics(reset).items()})
        return out

    # ------------------------------------------------------------------ decoding
    def new_cache(self, batch: int) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to max_seq_len positions."""
        p = self.tok_emb.weight
        hs = self.cfg.d_model // self.cfg.n_heads
        shape = (batch, self.cfg.n_heads, self.cfg.max_seq_len, hs)
        n = self.cfg.n_layers
        return KVCache([p.new_zeros(shape) for _ in range(n)], [p.new_zeros(shape) for _ in range(n)])

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample continuations with the KV cache: tokens [B, T] -> [B, T + max_new_tokens] (prompt kept).

        temperature 0 is greedy; top_p < 1 samples from the nucleus. When the context fills up, the
        cache is rebuilt from the last max_seq_len // 2 tokens (rotary positions are relative).
        """
        if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("generate: need max_new_tokens >= 0, temperature >= 0, 0 < top_p <= 1")
        out = tokens
        window = max(self.cfg.max_seq_len // 2, 1)
        ctx = tokens[:, -self.cfg.max_seq_len :]
        cache = self.new_cache(tokens.shape[0])
        logits = self(ctx, cache=cache).logits[:, -1]  # prefill
        for n in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, generator)  # (B, 1)
            out = torch.cat([out, nxt], dim=1)
            if n == max_new_tokens - 1:
                break
            if cache.pos >= self.cfg.max_seq_len:  # full: re-prefill the recent window
                cache = self.new_cache(tokens.shape[0])
                logits = self(out[:, -window:], cache=cache).logits[:, -1]
            else:
                logits = self(nxt, cache=cache).logits[:, -1]
        return out


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] -> next tokens [B, 1]: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator)
