"""Query whitening (MemoryConfig.query_norm, the fix of the memory collapse; docs/quality.md)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers.query_norm import BatchWhitening
from model_workers.ultramem import MemoryConfig, MemoryLayer, ModelConfigError
from model_workers.values import LocalBackend
from storage.layout import TableSpec

SMALL = dict(num_keys=16, d_k=8, d_v=16, heads=2, topk=4, expansion=4, placement="0:0", num_partitions=4)


def layer_of(cfg: MemoryConfig, d_model: int = 32) -> MemoryLayer:
    layer = MemoryLayer(cfg, d_model, index=0, num_memory_layers=1, seed=5)
    spec = TableSpec(name=layer.table, rows=cfg.physical_rows, dim=cfg.d_v, num_partitions=4, seed=1)
    layer.backend = LocalBackend([spec])
    return layer


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(64, 256))
def test_training_batches_come_out_white(seed: int, n: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=gen)).Q
    mix = torch.diag(torch.rand(8, generator=gen) * 3 + 0.3) @ rotation  # correlated, condition <= 11
    q = torch.randn(n, 8, generator=gen) @ mix + 3.0  # correlated, off-centre
    out = BatchWhitening(8, momentum=0.1, eps=1e-6).train()(q)
    cov = (out - out.mean(0)).T @ (out - out.mean(0)) / n
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(cov, torch.eye(8), atol=1e-2, rtol=0)


def test_evaluation_uses_running_statistics_so_a_token_does_not_see_its_batch() -> None:
    white = BatchWhitening(4, momentum=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):  # running statistics converge to the stream's
        white(torch.randn(128, 4, generator=gen) * 2 + 1)
    white.eval()
    batch = torch.randn(16, 4, generator=gen)
    alone = white(batch[:1])
    torch.testing.assert_close(white(batch)[:1], alone)
    assert white.running_mean.sub(1).abs().max() < 0.3


def test_nearly_rank_one_inputs_collapse_without_whitening_and_spread_with_it() -> None:
    """The measured failure: x with one dominant direction across tokens makes every token pick
    the same slots; whitening the query spreads them over the table."""
    gen = torch.Generator().manual_seed(3)
    d = 32
    direction = torch.randn(d, generator=gen)
    x = torch.randn(512, 1, generator=gen) * direction + 0.01 * torch.randn(512, d, generator=gen)
    used = {}
    for mode in ("none", "whiten"):
        layer = layer_of(MemoryConfig(**SMALL, query_norm=mode), d).train()
        q_row, q_col = layer.query(x)
        virtual, _ = layer.retrieve(*layer.key_scores(q_row, q_col))
        used[mode] = virtual.unique().numel()
    assert used["none"] * 5 < used["whiten"]
    assert used["whiten"] > 0.5 * SMALL["expansion"] * SMALL["num_keys"] ** 2


def test_whitening_passes_gradcheck_in_float64() -> None:
    white = BatchWhitening(3, momentum=0.1).double().train()
    q = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(white, (q,))


def test_bad_query_norm_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ModelConfigError, match="query_norm"):
        MemoryConfig(query_norm="layer")  # type: ignore[arg-type]
    with pytest.raises(ModelConfigError, match="query_stats_momentum"):
        MemoryConfig(query_stats_momentum=0.0)
