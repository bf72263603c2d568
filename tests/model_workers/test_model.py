"""The language model (DESIGN §3): config checks, KV-cache decoding, skip-layer wiring, the train hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_workers.model import LanguageModel, ModelConfig
from model_workers.moe import MoEConfig
from model_workers.ultramem import MemoryConfig, ModelConfigError
from model_workers.values import LocalBackend

MEM = {"num_keys": 8, "d_k": 8, "d_v": 16, "heads": 2, "topk": 4, "placement": "0:1"}


def tiny(kind: str = "ultramem", **kw) -> ModelConfig:
    mem = MemoryConfig.pkm(**{**MEM, "d_v": 32, "placement": "1"}) if kind == "pkm" else MemoryConfig(**MEM)
    base = {
        "vocab_size": 50,
        "d_model": 32,
        "n_layers": 3,
        "n_heads": 4,
        "max_seq_len": 24,
        "ffn_kind": kind,
        "memory": mem,
        "moe": MoEConfig(num_experts=4),
    }
    return ModelConfig(**{**base, **kw})


def tokens(b: int = 2, t: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"ffn_kind": "pkm"}, "memory.kind"),
        ({"memory": MemoryConfig(**{**MEM, "placement": "1:3"})}, "placement"),
        ({"n_heads": 3}, "n_heads"),
        ({"ffn_kind": "sparse"}, "ffn_kind"),
        ({"init_seed": -1}, "init_seed"),
    ],
)
def test_invalid_model_config_names_the_field(kw, field):
    with pytest.raises(ModelConfigError, match=field):
        tiny(**kw)


@pytest.mark.parametrize("kind", ["dense", "pkm", "ultramem", "moe"])
def test_forward_gives_logits_mean_cross_entropy_and_aux_loss(kind):
    model = LanguageModel(tiny(kind))
    x = tokens()
    out = model(x[:, :-1], x[:, 1:])
    assert out.logits.shape == (2, 9, 50)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(18, 50), x[:, 1:].reshape(-1)))
    assert out.aux_loss.shape == () and (out.aux_loss.item() > 0) == (kind == "moe")
    assert model(x).loss is None


def test_tucker_aux_loss_is_part_of_aux_loss_when_enabled():
    cfg = tiny(memory=MemoryConfig(**{**MEM, "aux_loss_alpha": 1.0}))
    model = LanguageModel(cfg)
    assert model(tokens()).aux_loss.item() == pytest.approx(model.memories[0].aux_loss().item())


@pytest.mark.parametrize("kind", ["dense", "pkm", "ultramem", "moe"])
def test_kv_cache_decoding_equals_the_full_forward(kind):
    model = LanguageModel(tiny(kind)).eval()
    x = tokens(t=12)
    full = model(x).logits
    cache = model.new_cache(2)
    parts = [model(x[:, :5], cache=cache).logits]  # prefill 5, then 1 at a time, then a chunk of 3
    parts += [model(x[:, i : i + 1], cache=cache).logits for i in range(5, 9)]
    parts.append(model(x[:, 9:], cache=cache).logits)
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_greedy_generate_with_the_cache_equals_full_recompute():
    model = LanguageModel(tiny("ultramem")).eval()
    prompt = tokens(t=6, seed=3)
    out = model.generate(prompt, max_new_tokens=10, temperature=0.0)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_past_the_context_keeps_going_from_a_recent_window():
    model = LanguageModel(tiny("dense")).eval()
    out = model.generate(tokens(t=20), max_new_tokens=30, temperature=0.0)
    assert out.shape == (2, 50)


def test_sampling_is_reproducible_with_a_generator_and_top_p_keeps_the_nucleus():
    model = LanguageModel(tiny("dense")).eval()
    p = tokens(b=1, t=4)
    a = model.generate(p, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(p, 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    tiny_p = model.generate(p, 8, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(6))
    assert torch.equal(tiny_p, model.generate(p, 8, temperature=0.0))  # nucleus of one = greedy


def test_future_tokens_do_not_change_earlier_logits():
    model = LanguageModel(tiny("ultramem")).eval()
    x = tokens(t=10)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % 50
    torch.testing.assert_close(model(x).logits[:, :7], model(y).logits[:, :7])


def test_memory_output_is_added_after_its_add_block_from_the_ffn_input_of_its_read_block():
    model = LanguageModel(tiny("ultramem", memory=MemoryConfig(**{**MEM, "placement": "0:2"})))
    x = tokens()
    h = model.tok_emb(x)
    for i, block in enumerate(model.blocks):
        h = h + block.attn(block.attn_norm(h), model.rotary)
        xn = block.ffn_norm(h)
        if i == 0:
            mem = model.memories[0](xn)
        h = h + block.ffn(xn) + (mem if i == 2 else 0)
    logits = F.linear(model.norm(h), model.tok_emb.weight)
    torch.testing.assert_close(model(x).logits, logits)


def test_same_seed_gives_the_same_model_and_embeddings_are_tied():
    a, b = LanguageModel(tiny()), LanguageModel(tiny())
    c = LanguageModel(tiny(init_seed=1))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    assert not torch.equal(a.memories[0].permutation, c.memories[0].permutation)
    assert "memories.0.permutation" in a.state_dict()
    assert all(p is not a.tok_emb.weight for n, p in a.named_parameters() if n != "tok_emb.weight")


def test_memory_tables_name_each_layer_and_carry_the_value_init():
    model = LanguageModel(tiny(memory=MemoryConfig(**{**MEM, "placement": "0:1/1:2"})))
    specs = model.memory_tables()
    assert [s.name for s in specs] == ["mem0.values", "mem1.values"]
    assert all(s.rows == 64 and s.dim == 16 for s in specs)
    # ffn_matched (the default): each layer's σ from its own calibration, deterministic per config
    assert [s.init_std for s in specs] == [m.value_std for m in model.memories]
    again = LanguageModel(tiny(memory=MemoryConfig(**{**MEM, "placement": "0:1/1:2"})))
    assert again.memory_tables() == specs
    values = model.backend.fetch_rows("mem0.values", torch.arange(64))
    assert values.std().item() == pytest.approx(specs[0].init_std, rel=0.2)
    fixed = LanguageModel(tiny(memory=MemoryConfig(**{**MEM, "value_init": "fixed", "value_std": 0.05})))
    assert [s.init_std for s in fixed.memory_tables()] == [0.05]


def test_a_backend_missing_a_table_is_rejected():
    with pytest.raises(ModelConfigError, match="mem0.values"):
        LanguageModel(tiny(), backend=LocalBackend())


def test_init_memory_tables_resets_the_values_of_a_backend():
    model = LanguageModel(tiny())
    backend = LocalBackend()
    model.init_memory_tables(backend)
    assert model.backend is backend and model.memories[0].backend is backend
    torch.testing.assert_close(
        backend.fetch_rows("mem0.values", torch.arange(64)),
        LanguageModel(tiny()).backend.fetch_rows("mem0.values", torch.arange(64)),
    )


def test_push_value_grads_updates_fetched_rows_at_lr_times_the_value_multiplier():
    cfg = tiny(memory=MemoryConfig(**{**MEM, "value_optimizer": "sgd"}))
    model = LanguageModel(cfg)
    before = model.backend.fetch_rows("mem0.values", torch.arange(64))
    x = tokens()
    out = model(x[:, :-1], x[:, 1:])
    out.loss.backward()
    rows, grads = [t.clone() for t in model.memories[0].pending_grads()]
    model.memories[0]._pending.clear()
    out = model(x[:, :-1], x[:, 1:])  # same batch again, same grads
    out.loss.backward()
    model.push_value_grads(lr=0.1, step=25, max_steps=100)  # multiplier 4 -> 1: 3.25 at 25%
    after = model.backend.fetch_rows("mem0.values", torch.arange(64))
    expect = before - 0.1 * 3.25 * torch.zeros(64, 16).index_add(0, rows, grads)
    torch.testing.assert_close(after, expect)
    assert model.memories[0].pending_grads() is None


def test_after_optimizer_step_refreshes_the_tdqkr_filter():
    model = LanguageModel(tiny())
    tucker = model.memories[0].tucker
    with torch.no_grad():
        tucker.cores.copy_(torch.diag(torch.tensor([0.0, 3.0])).expand_as(tucker.cores))
    model.after_optimizer_step()
    torch.testing.assert_close(tucker.filter_u.abs(), torch.tensor([[0.0, 1.0]] * 2))


def test_training_steps_lower_the_loss_and_report_memory_metrics():
    torch.manual_seed(0)
    model = LanguageModel(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(b=4, t=16)
    losses = []
    for step in range(15):
        out = model(x[:, :-1], x[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.push_value_grads(3e-3, step, max_steps=15)
        model.after_optimizer_step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
    metrics = model.memory_metrics()
    assert {
        "mem0/coverage",
        "mem0/kl_uniform",
        "mem0/top1_score",
        "mem0/output_std",
        "mem0/tdqkr_recall",
    } <= set(metrics)
    assert 0 < metrics["mem0/tdqkr_recall"] <= 1
    assert model.memory_metrics() == {}
