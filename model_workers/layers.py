"""Dense transformer parts (DESIGN §3): RMSNorm, rotary positions, causal attention with a KV cache,
SwiGLU FFN. Pre-norm blocks are assembled in model.py.

Legend: B batch, T new tokens, S cached positions, D model width, nh heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # half: reduce in fp32
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(xf.dtype)).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position tables cos/sin [max_seq_len, hs/2] (rotate-half convention)."""

    def __init__(self, head_size: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (L, hs/2)
        # derived from the config: not saved in checkpoints
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, start: int | Tensor) -> Tensor:
        """x [B, nh, T, hs] at positions start..start+T-1 -> rotated x, same shape.

        ``start`` is one int for the whole batch, or int64 [B] per sequence (batched decoding).
        """
        t = x.shape[2]
        if isinstance(start, Tensor):
            pos = start.view(-1, 1) + torch.arange(t, device=start.device)  # (B, T)
            cos = self.cos[pos].unsqueeze(1).to(x.dtype)  # (B, 1, T, hs/2)
            sin = self.sin[pos].unsqueeze(1).to(x.dtype)
        else:
            cos = self.cos[start : start + t].to(x.dtype)  # (T, hs/2)
            sin = self.sin[start : start + t].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


@dataclass
class KVCache:
    """Keys and values of every layer for decoding: keys[l], values[l] [B, nh, max_len, hs].

    ``pos`` counts the positions filled, the same for every row. Batched decoding of sequences of
    different lengths sets ``positions`` instead: int64 [B], the positions filled per row (rows
    are independent; decoding then takes one new token per row).
    """

    keys: list[Tensor]
    values: list[Tensor]
    pos: int = 0  # positions already filled (all rows)
    positions: Tensor | None = None  # int64 [B]: per-row positions filled; overrides pos when set

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions and an optional KV cache."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_size = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, rotary: Rotary, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x [B, T, D] -> [B, T, D]; with a cache, x holds positions cache.pos.. and is appended to it."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q = q.view(b, t, self.n_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(b, t, self.n_heads, self.head_size).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_size).transpose(1, 2)
        if cache is not None and cache.positions is not None:
            y = self._attend_per_row(q, k, v, rotary, cache, layer)
            return self.proj(y.transpose(1, 2).contiguous().view(b, t, d))
        start = cache.pos if cache is not None else 0
        q, k = rotary(q, start), rotary(k, start)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            cache.keys[layer][:, :, start : start + t] = k.to(cache.keys[layer].dtype)
            cache.values[layer][:, :, start : start + t] = v.to(cache.values[layer].dtype)
            k_all = cache.keys[layer][:, :, : start + t].to(q.dtype)  # (B, nh, S+T, hs)
            v_all = cache.values[layer][:, :, : start + t].to(q.dtype)
            mask = None
            if t > 1:  # query i (position start+i) sees keys at positions <= start+i
                pos_q = torch.arange(start, start + t, device=x.device).unsqueeze(1)
                mask = pos_q >= torch.arange(start + t, device=x.device).unsqueeze(0)  # (T, S+T)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(b, t, d)  # (B, T, D)
        return self.proj(y)

    def _attend_per_row(
        self, q: Tensor, k: Tensor, v: Tensor, rotary: Rotary, cache: KVCache, layer: int
    ) -> Tensor:
        """One new token per row at its own position cache.positions[b]: q, k, v [B, nh, 1, hs] -> y."""
        assert cache.positions is not None and q.shape[2] == 1  # engine invariant: decode steps only
        pos = cache.positions  # (B,)
        q, k = rotary(q, pos), rotary(k, pos)
        rows = torch.arange(q.shape[0], device=q.device)
        cache.keys[layer][rows, :, pos] = k[:, :, 0].to(cache.keys[layer].dtype)  # (B, nh, hs)
        cache.values[layer][rows, :, pos] = v[:, :, 0].to(cache.values[layer].dtype)
        s = int(pos.max()) + 1
        k_all = cache.keys[layer][:, :, :s].to(q.dtype)  # (B, nh, S, hs)
        v_all = cache.values[layer][:, :, :s].to(q.dtype)
        # row b sees its own positions 0..pos[b]; later slots hold another sequence's leftovers
        mask = (torch.arange(s, device=q.device).unsqueeze(0) <= pos.unsqueeze(1)).view(-1, 1, 1, s)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, nh, 1, hs)


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(W1 x) * W3 x), hidden width ``hidden``."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def swiglu_hidden(d_model: int, mult: float, multiple_of: int = 8) -> int:
    """SwiGLU hidden width: mult * D rounded up to a multiple of ``multiple_of``."""
    hidden = int(mult * d_model)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def swiglu_init_output_var(d_model: int, hidden: int, in_std: float, out_std: float) -> float:
    """Per-element variance of SwiGLU(x) at init for an input of unit RMS (an RMSNorm output, gain 1),
    W1, W3 ~ N(0, in_std²), W2 ~ N(0, out_std²): hidden·out_std²·s²·E[silu(a)²] with a, b ~ N(0, s²),
    s² = D·in_std² (Gauss-Hermite quadrature for the expectation)."""
    s2 = d_model * in_std**2
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # ∫ f(z) e^{-z²/2} dz
    a = nodes * math.sqrt(s2)
    silu_sq = (a / (1.0 + np.exp(-a))) ** 2
    e_silu_sq = float(np.sum(weights * silu_sq) / math.sqrt(2 * math.pi))
    return hidden * out_std**2 * s2 * e_silu_sq
