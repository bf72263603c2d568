"""Mixture of experts FFN, the paper's competitor (DESIGN §3: top-2 of N SwiGLU experts).

Router: p = softmax(x · W_r) over N experts; each token goes to its top-k experts, weighted by their
probabilities renormalized over the k. Load balancing (Switch/GShard): coef * N * sum_e f_e * P_e
with f_e the fraction of the N*k assignments sent to expert e and P_e the mean router probability.
Dispatch sorts assignments by expert and runs each expert once on its tokens (a loop over experts,
never over tokens).

Legend: N tokens, D model width, X experts, k experts per token, F expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model_workers.ultramem import ModelConfigError


@dataclass(frozen=True)
class MoEConfig:
    """Experts replacing the FFN of every block when ModelConfig.ffn_kind == "moe"."""

    num_experts: int = 8  # X experts per block
    top_k: int = 2  # experts per token (paper's competitor: top-2)
    expert_ffn_mult: float = (
        4 / 3
    )  # expert SwiGLU hidden = mult * D (half the dense 8/3: top-2 = equal compute)
    balance_loss_coef: float = 0.01  # weight of the load-balancing loss in aux_loss

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ModelConfigError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ModelConfigError(f"moe.top_k must be in [1, moe.num_experts], got {self.top_k}")
        if self.expert_ffn_mult <= 0 or self.balance_loss_coef < 0:
            raise ModelConfigError("moe.expert_ffn_mult must be > 0 and moe.balance_loss_coef >= 0")


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logits [N, X] -> (probs [N, X] fp32, experts int64 [N, k], weights [N, k] summing to 1)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(top_k, dim=-1)
    return probs, top.indices, top.values / top.values.sum(-1, keepdim=True)


def balance_loss(probs: Tensor, experts: Tensor, coef: float) -> Tensor:
    """coef * X * sum_e f_e * P_e; probs [N, X], experts [N, k] -> scalar (coef at a uniform router)."""
    num = probs.shape[-1]
    f = torch.bincount(experts.reshape(-1), minlength=num).to(probs.dtype) / experts.numel()  # (X,)
    return coef * num * (f * probs.mean(0)).sum()


class MoE(nn.Module):
    """x [B, T, D] -> (y [B, T, D], balance loss scalar)."""

    def __init__(self, cfg: MoEConfig, d_model: int, hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        x_, d, f = cfg.num_experts, d_model, hidden
        self.router = nn.Linear(d, x_, bias=False)
        self.w1 = nn.Parameter(torch.empty(x_, d, f))
        self.w3 = nn.Parameter(torch.empty(x_, d, f))
        self.w2 = nn.Parameter(torch.empty(x_, f, d))
        self.register_buffer("load", torch.zeros(x_, dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator, std: float, out_std: float) -> None:
        """Experts and router N(0, std²), output projections N(0, out_std²)."""
        for w in (self.router.weight, self.w1, self.w3):
            nn.init.normal_(w, 0.0, std, generator=gen)
        nn.init.normal_(self.w2, 0.0, out_std, generator=gen)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's SwiGLU on x [n, D] -> [n, D]."""
        return (F.silu(x @ self.w1[e].to(x.dtype)) * (x @ self.w3[e].to(x.dtype))) @ self.w2[e].to(x.dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape
        xf = x.reshape(b * t, d)
        probs, experts, weights = route(self.router(xf), self.cfg.top_k)  # (N, X), (N, k), (N, k)
        flat_expert = experts.reshape(-1)  # (N*k,)
        flat_token = torch.arange(b * t, device=x.device).repeat_interleave(self.cfg.top_k)
        flat_weight = weights.reshape(-1, 1).to(x.dtype)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.cfg.num_experts)
        if self.training:
            self.load += counts.to(self.load.device)
        out = torch.zeros_like(xf)
        start = 0
        for e, c in enumerate(counts.tolist()):  # a loop over experts, not tokens
            if c:
                pick = order[start : start + c]
                tok = flat_token[pick]
                out = out.index_add(0, tok, self.expert(e, xf[tok]) * flat_weight[pick])
                start += c
        return out.view(b, t, d), balance_loss(probs, experts, self.cfg.balance_loss_coef)

    @torch.no_grad()
    def metrics(self, reset: bool = True) -> dict[str, float]:
        """Max expert load relative to uniform (1.0 = perfectly balanced) since the last reset."""
        total = int(self.load.sum())
        out = {"max_load": float(self.load.max()) * self.cfg.num_experts / total} if total else {}
        if reset:
            self.load.zero_()
        return out
