"""MoE FFN (DESIGN §3, the paper's competitor): top-2 routing and balance loss against loop references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_workers.moe import MoE, MoEConfig, balance_loss, route
from model_workers.ultramem import ModelConfigError


def make_moe(seed: int = 0, **kw) -> MoE:
    cfg = MoEConfig(**{"num_experts": 4, "top_k": 2, **kw})
    moe = MoE(cfg, d_model=6, hidden=5).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return moe


def test_top2_output_equals_a_per_token_loop_over_its_two_experts():
    moe = make_moe()
    x = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, _ = moe(x)
    xf = x.view(10, 6)
    for n in range(10):
        probs = torch.softmax(xf[n] @ moe.router.weight.T, dim=-1)
        top = probs.topk(2)
        expect = torch.zeros(6, dtype=torch.float64)
        for p, e in zip(top.values / top.values.sum(), top.indices.tolist()):
            hidden = F.silu(xf[n] @ moe.w1[e]) * (xf[n] @ moe.w3[e])
            expect += p * (hidden @ moe.w2[e])
        torch.testing.assert_close(y.view(10, 6)[n], expect)


def test_balance_loss_equals_the_loop_reference_and_is_coef_when_uniform():
    moe = make_moe(balance_loss_coef=0.1)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, loss = moe(x)
    logits = (x.view(12, 6) @ moe.router.weight.T).detach()
    probs = torch.softmax(logits, -1)
    chosen = probs.topk(2).indices
    frac = [sum(int((chosen[n] == e).sum()) for n in range(12)) / 24 for e in range(4)]
    expect = 0.1 * 4 * sum(frac[e] * probs[:, e].mean().item() for e in range(4))
    assert loss.item() == pytest.approx(expect)
    # a perfectly balanced assignment with uniform probabilities gives exactly coef
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    experts = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert balance_loss(uniform, experts, 0.1).item() == pytest.approx(0.1)


def test_route_renormalizes_the_top_k_weights():
    _, experts, weights = route(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2)
    assert experts.tolist() == [[3, 2]]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


def test_gradients_reach_the_router_and_only_the_experts_used():
    moe = make_moe()
    x = torch.randn(1, 1, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, loss = moe(x)
    (y.sum() + loss).backward()
    used = set(route(x.view(1, 6) @ moe.router.weight.T, 2)[1].flatten().tolist())
    assert moe.router.weight.grad.abs().sum() > 0
    for e in range(4):
        assert (moe.w1.grad[e].abs().sum() > 0) == (e in used)


def test_invalid_moe_config_names_the_field():
    with pytest.raises(ModelConfigError, match="moe.top_k"):
        MoEConfig(num_experts=2, top_k=3)
