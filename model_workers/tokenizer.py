"""Byte-level BPE tokenizer for the corpus (DESIGN §1: "a small real corpus").

A thin wrapper over HuggingFace `tokenizers`: byte-level pre-tokenization (every UTF-8 string
round-trips exactly, no unknown token), a BPE model trained on the train split only, and one
special token, `<|endoftext|>`, that separates documents. The wrapper is saved with every run as
`tokenizer.json` (the library's own format, readable by any HF tokenizer).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"  # document separator; id 0 (the trainer adds special tokens first)


class Tokenizer:
    """Byte-level BPE: str -> token ids and back."""

    def __init__(self, hf: _HFTokenizer) -> None:
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer has no {EOT} token")
        # the EOT id only ever comes from data.py between documents: a literal "<|endoftext|>" in
        # some text is encoded as ordinary bytes, so decode(encode(text)) == text for every text
        hf.encode_special_tokens = True
        self._hf = hf
        self.eot_id: int = eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a byte-level BPE with at most `vocab_size` tokens (the 256 bytes + merges + EOT)."""
        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size must be >= 258 (256 bytes + 1 merge + EOT), got {vocab_size}")
        hf = _HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        logger.info("trained BPE tokenizer: %d tokens", hf.get_vocab_size())
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a `tokenizer.json` written by `save`."""
        return cls(_HFTokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (HF format)."""
        self._hf.save(str(path))

    def to_json(self) -> str:
        """The tokenizer as the JSON text `save` writes."""
        return self._hf.to_str()

    @property
    def vocab_size(self) -> int:
        """Number of token ids in use (<= the vocab_size asked for when training)."""
        return self._hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """One string -> token ids (no special tokens added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many strings -> token ids each (parallel inside the library)."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> string; EOT is dropped (skip_special_tokens)."""
        return self._hf.decode(list(ids), skip_special_tokens=True)
