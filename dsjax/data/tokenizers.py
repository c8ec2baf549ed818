"""Tokenizers: a built-in byte-level tokenizer and a thin wrapper over a HF ``tokenizer.json``.

Both follow the :class:`Tokenizer` protocol. ``encode`` never adds special tokens; the pipeline adds ``bos`` and
``eos`` itself. The ``tokenizers`` package is imported only when a HF tokenizer is made.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from dsjax.data.sources import DataError

if TYPE_CHECKING:
    from dsjax.data.pipeline import DataConfig

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "make_tokenizer", "check_vocab"]

# Special tokens looked up in a tokenizer.json when DataConfig.bos_id / eos_id are not given (first match wins).
BOS_TOKENS = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]")
EOS_TOKENS = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>", "[SEP]")
PAD_TOKENS = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline (and sampling code) needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        ...

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special tokens are skipped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: pad 0, bos 1, eos 2, byte ``b`` -> ``b + 3``; 259 ids in all."""

    vocab_size = 259
    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns int32 ``[n]`` (fast path used by the pipeline)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        data = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A HF ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` (e.g. DeepSeek-V3's byte-level BPE).

    Attributes:
      vocab_size: ``get_vocab_size(with_added_tokens=True)``.
      bos_id, eos_id: given, or the id of the first of :data:`BOS_TOKENS` / :data:`EOS_TOKENS` present.
      pad_id: the first of :data:`PAD_TOKENS` present, else ``eos_id`` (padding is identified by
        ``segment_ids == 0``, never by the token value).
    """

    def __init__(self, path: str, *, bos_id: int | None = None, eos_id: int | None = None):
        try:
            import tokenizers  # noqa: PLC0415  (optional dependency, imported lazily)
        except ImportError as e:
            raise DataError(
                f"tokenizer={path!r} needs the 'tokenizers' package. Fix: pip install -e '.[hf]' "
                "(or tokenizers>=0.19), or use tokenizer='bytes'"
            ) from e
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise DataError(
                f"tokenizer={path!r}: no such file. Fix: point DataConfig.tokenizer at a HF tokenizer.json "
                "(or the directory holding it), or use tokenizer='bytes'"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(
                f"tokenizer={path!r}: cannot load it as a HF tokenizer.json ({e}). Fix: use the tokenizer.json "
                "saved by tokenizers/transformers (not tokenizer_config.json)"
            ) from e
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_id = self._special("bos_id", bos_id, BOS_TOKENS)
        self.eos_id = self._special("eos_id", eos_id, EOS_TOKENS)
        pad = self._find(PAD_TOKENS)
        self.pad_id = self.eos_id if pad is None else pad

    def _find(self, candidates: tuple[str, ...]) -> int | None:
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return None

    def _special(self, name: str, given: int | None, candidates: tuple[str, ...]) -> int:
        if given is None:
            given = self._find(candidates)
            if given is None:
                raise DataError(
                    f"{self.path}: none of the usual {name[:3]} tokens {list(candidates)} is in the vocabulary. "
                    f"Fix: set DataConfig.{name} to the id to use"
                )
        if not 0 <= given < self.vocab_size:
            raise DataError(
                f"{name}={given}: outside the tokenizer's {self.vocab_size} ids. Fix: use an id in "
                f"[0, {self.vocab_size})"
            )
        return int(given)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns int32 ``[n]``."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


def make_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer:
    """The tokenizer named by ``cfg.tokenizer``: ``"bytes"`` or a path to a HF ``tokenizer.json``.

    Raises:
      DataError: the file is missing or unreadable, special tokens cannot be found, or ``bos_id``/``eos_id``
        are given for the byte tokenizer (whose ids are fixed).
    """
    if cfg.tokenizer == "bytes":
        for name in ("bos_id", "eos_id"):
            value = getattr(cfg, name)
            if value is not None and value != getattr(ByteTokenizer, name):
                raise DataError(
                    f"{name}={value}: the byte tokenizer's ids are fixed (pad 0, bos 1, eos 2). Fix: leave "
                    f"{name}=None, or use a HF tokenizer.json"
                )
        return ByteTokenizer()
    return HFTokenizer(cfg.tokenizer, bos_id=cfg.bos_id, eos_id=cfg.eos_id)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Raises DataError if the tokenizer can produce ids the model's embedding does not have."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model_vocab_size}. "
            f"Fix: set the model's vocab_size >= {tokenizer.vocab_size}, or use the tokenizer the model was "
            "trained with"
        )
