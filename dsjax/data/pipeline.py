"""Grain input pipelines for pretraining and SFT: deterministic, packed, sharded per process, resumable.

Pipeline (every stage is a pure function of its index, so the same config gives bitwise the same batches)::

    MapDataset.source(documents)            # the split's documents (sources.py), four ints each, no text
      [process_index::process_count]        # disjoint shard per process
      .shuffle(seed)                        # if cfg.shuffle; before repeat, so every epoch is reshuffled
      .repeat(num_epochs)                   # None = forever
      .map(encode)                          # read + tokenise: [bos] + tokens + [eos], per-token loss mask
      .to_iter_dataset()
      pack to [T]                           # pretraining: ConcatThenSplit, then a window shuffle of rows;
                                            # SFT: FirstFitPack (examples are never split)
      .batch(b, drop_remainder=True)        # b = batch_size // process_count
      finalise                              # rename, pad tokens with pad_id, mask segment starts

Packing. Pretraining uses ``ConcatThenSplitIterDataset``: no padding (except the last row of a finite run); a
document that does not fit in the rest of a row is split and its remainder starts the next row as a **new
segment whose positions restart at 0** (the model cannot attend across rows anyway, so RoPE positions stay
within ``[0, T)``). The rows of one long document would otherwise arrive back to back, so rows are then
shuffled in windows of :data:`SHUFFLE_WINDOW_ROWS` (restoring a state re-packs at most one window). SFT uses
``FirstFitPackIterDataset`` so that a completion is never separated from its prompt; examples longer than T are
truncated to T (losing their eos) and rows are padded.

Grain 0.2.18's ConcatThenSplit state does not survive JSON (its empty-slice sentinel is a tuple that JSON
turns into a list, and a resumed iterator then emits different rows); the outermost iterator converts it back,
so always checkpoint the iterator returned by ``iter(make_dataset(...))`` (or a prefetch wrapper around it).

Outputs, each int32 ``[b, T]``: ``tokens``; ``segment_ids`` (1, 2, ... per packed segment in a row, 0 on
padding); ``positions`` (0.. within the segment); ``loss_mask`` (1 where the token is a training *target*:
pretraining every real token except the first of each segment, so never a bos; SFT only completion tokens
and the final eos; 0 on padding). The loss at position i predicts ``tokens[i + 1]`` where
``segment_ids[i + 1] == segment_ids[i] != 0`` and ``loss_mask[i + 1] == 1``.

Resume: ``it = iter(ds)``; ``it.get_state()`` is a small JSON-serialisable dict; ``it.set_state(state)`` on a
fresh iterator of the same config resumes with exactly the same batches. The state also records the process
index/count and a config fingerprint, and ``set_state`` refuses (``DataError``) a state from another layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import grain
import numpy as np

from dsjax.data import sources, synthetic
from dsjax.data.sources import DataError

__all__ = ["DataConfig", "SOURCES", "make_dataset", "SHUFFLE_WINDOW_ROWS"]

SOURCES = ("default", "text", "jsonl", "sft", "arithmetic")
SPLITS = ("train", "valid")
SHUFFLE_WINDOW_ROWS = 256  # packed rows shuffled together after ConcatThenSplit (pretraining, shuffle=True)
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
_STATE_VERSION = 1


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
    raise DataError(f"{field}={value!r}: {problem}. Fix: {fix}.")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to read and how to batch it. See the module docstring for the pipeline and its outputs.

    Attributes:
      source: ``"default"`` (standard library sources), ``"text"`` (one document per file), ``"jsonl"`` (one
        document per line, ``text_field``), ``"sft"`` (JSONL with ``prompt_field``/``completion_field``) or
        ``"arithmetic"`` (synthetic, ``arithmetic_examples`` of them; text = prompt + completion).
      paths: file globs for text/jsonl/sft (``**`` allowed), expanded, sorted and de-duplicated.
      tokenizer: ``"bytes"`` or the path of a HF ``tokenizer.json`` (or its directory).
      bos_id, eos_id: override the special ids of a HF tokenizer.
      seq_len: packed row length T.
      batch_size: GLOBAL batch in rows; each process yields ``batch_size // process_count``.
      seed: shuffle seed (and the arithmetic generator's seed).
      num_epochs: None repeats forever.
      split: ``"train"`` or ``"valid"`` (a stable ~1% hold-out of documents, at least one).
      arithmetic_ops, arithmetic_max_digits: difficulty of the synthetic task (operators drawn from, most digits
        per operand); see :func:`dsjax.data.synthetic.arithmetic_example`.
    """

    source: str = "default"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    tokenizer: str = "bytes"
    bos_id: int | None = None
    eos_id: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    split: str = "train"
    arithmetic_examples: int = 100_000
    arithmetic_ops: str = "+-*"
    arithmetic_max_digits: int = 5

    def __post_init__(self):
        if self.source not in SOURCES:
            _fail("source", self.source, "unknown source", f"use one of {SOURCES}")
        if isinstance(self.paths, str):
            _fail("paths", self.paths, "must be a tuple of globs, not a string", f"write paths=({self.paths!r},)")
        if isinstance(self.paths, list):
            object.__setattr__(self, "paths", tuple(self.paths))
        if not isinstance(self.paths, tuple) or not all(isinstance(p, str) and p for p in self.paths):
            _fail("paths", self.paths, "must be a tuple of non-empty strings", "e.g. paths=('data/*.txt',)")
        if self.source in ("text", "jsonl", "sft") and not self.paths:
            _fail("paths", self.paths, f"source={self.source!r} reads files", "give one or more file globs")
        if self.source in ("default", "arithmetic") and self.paths:
            _fail("paths", self.paths, f"source={self.source!r} reads no files", "set source='text'/'jsonl'/'sft'"
                  " to read them, or leave paths empty")
        for name in ("text_field", "prompt_field", "completion_field", "tokenizer"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, getattr(self, name), "must be a non-empty string", f"set {name}")
        for name in ("bos_id", "eos_id"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                _fail(name, v, "must be None or a token id >= 0", f"set {name}=None to read it from the tokenizer")
        if not _is_int(self.seq_len) or self.seq_len < 2:
            _fail("seq_len", self.seq_len, "must be an integer > 1", "set seq_len to e.g. 256")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            _fail("batch_size", self.batch_size, "must be an integer >= 1", "set batch_size to e.g. 8")
        if not _is_int(self.seed) or self.seed < 0:
            _fail("seed", self.seed, "must be an integer >= 0", "set seed to e.g. 0")
        if not isinstance(self.shuffle, bool):
            _fail("shuffle", self.shuffle, "must be a bool", "set shuffle=True or False")
        if self.num_epochs is not None and (not _is_int(self.num_epochs) or self.num_epochs < 1):
            _fail("num_epochs", self.num_epochs, "must be None (forever) or an integer >= 1", "set num_epochs=None")
        if self.split not in SPLITS:
            _fail("split", self.split, "unknown split", f"use one of {SPLITS}")
        if not _is_int(self.arithmetic_examples) or self.arithmetic_examples < 1:
            _fail("arithmetic_examples", self.arithmetic_examples, "must be an integer >= 1", "set e.g. 100_000")
        try:
            synthetic.arithmetic_example(0, 0, ops=self.arithmetic_ops, max_digits=self.arithmetic_max_digits)
        except ValueError as e:
            raise DataError(f"DataConfig.arithmetic_ops / arithmetic_max_digits: {e}") from None

    def fingerprint(self) -> str:
        """A short hash of the fields that define the batch stream (checked when a state is restored)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "num_epochs"}  # may grow on resume
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _documents(cfg: DataConfig) -> sources.Documents:
    if cfg.source == "default":
        return sources.index_default()
    if cfg.source == "arithmetic":
        return sources.index_range(cfg.arithmetic_examples, "arithmetic")
    files = sources.expand_globs(cfg.paths)
    if cfg.source == "text":
        return sources.index_files(files)
    fields = (cfg.text_field,) if cfg.source == "jsonl" else (cfg.prompt_field, cfg.completion_field)
    return sources.index_jsonl(files, fields)


def _encode_array(tokenizer, text: str) -> np.ndarray:
    if hasattr(tokenizer, "encode_array"):
        return tokenizer.encode_array(text)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


class _Encode:
    """Document reference -> ``{"tokens": int32 [n], "loss_mask": int32 [n]}`` (picklable)."""

    def __init__(self, cfg: DataConfig, tokenizer, docs: sources.Documents):
        self._cfg, self._tok, self._docs = cfg, tokenizer, docs
        self._bos = np.array([tokenizer.bos_id], np.int32)
        self._eos = np.array([tokenizer.eos_id], np.int32)

    def __call__(self, ref: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
        cfg, docs = self._cfg, self._docs
        file_id, start, end, ordinal = ref
        if cfg.source == "sft":
            rec = sources.read_jsonl_record(docs.paths[file_id], start, end, ordinal,
                                            (cfg.prompt_field, cfg.completion_field))
            prompt = _encode_array(self._tok, rec[cfg.prompt_field])
            completion = _encode_array(self._tok, rec[cfg.completion_field])
            tokens = np.concatenate([self._bos, prompt, completion, self._eos])
            mask = np.zeros(len(tokens), np.int32)
            mask[1 + len(prompt):] = 1
            return {"tokens": tokens[: cfg.seq_len], "loss_mask": mask[: cfg.seq_len]}
        if cfg.source == "arithmetic":
            ex = synthetic.arithmetic_example(cfg.seed, start, ops=cfg.arithmetic_ops,
                                              max_digits=cfg.arithmetic_max_digits)
            text, first, last = ex["prompt"] + ex["completion"], True, True
        elif cfg.source == "jsonl":
            rec = sources.read_jsonl_record(docs.paths[file_id], start, end, ordinal, (cfg.text_field,))
            text, first, last = rec[cfg.text_field], True, True
        else:
            size = docs.sizes[file_id]
            text, first, last = sources.read_piece(docs.paths[file_id], start, end, size), start == 0, end == size
        parts = [self._bos] if first else []
        parts += [_encode_array(self._tok, text)] + ([self._eos] if last else [])
        tokens = np.concatenate(parts).astype(np.int32)
        mask = np.ones(len(tokens), np.int32)
        mask[:1] = 0  # the first token of a document (bos or a piece's first token) is never a target
        return {"tokens": tokens, "loss_mask": mask}


class _Finalize:
    """Packed batch -> the four output arrays, each int32 ``[b, T]`` (picklable)."""

    def __init__(self, pad_id: int):
        self._pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        seg = batch["tokens_segment_ids"].astype(np.int32)
        pos = batch["tokens_positions"].astype(np.int32)
        tokens = np.where(seg == 0, self._pad_id, batch["tokens"]).astype(np.int32)
        mask = np.where((seg == 0) | (pos == 0), 0, batch["loss_mask"]).astype(np.int32)
        return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def _tuples(state: Any) -> Any:
    """Undoes JSON's tuple -> list on ConcatThenSplit's ``remainder_slices`` (grain 0.2.18 compares tuples)."""
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuples(v))
                for k, v in state.items()}
    return state


class _StateIterator(grain.DatasetIterator):
    """Passes elements through; makes the state JSON-native and checks it belongs to this pipeline."""

    def __init__(self, parent: grain.DatasetIterator, meta: dict[str, Any]):
        super().__init__(parent)
        self._meta = meta

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"dsjax_data": dict(self._meta), "pipeline": json.loads(json.dumps(self._parent.get_state()))}

    def set_state(self, state: dict[str, Any]) -> None:
        meta = state.get("dsjax_data") if isinstance(state, dict) else None
        if meta is None or "pipeline" not in state:
            raise DataError("data iterator state: not a dsjax.data state (no 'dsjax_data' key). Fix: restore a "
                            "state saved from a make_dataset() iterator, or start the data iterator fresh")
        diff = {k: (meta.get(k), v) for k, v in self._meta.items() if meta.get(k) != v}
        if diff:
            raise DataError(
                f"data iterator state was saved by a different pipeline: {diff} (saved, now). Fix: resume with the "
                "same DataConfig and process count, or start the data iterator fresh (not restoring its state) if "
                "the change is intended")
        self._parent.set_state(_tuples(state["pipeline"]))


class _StateIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, meta: dict[str, Any]):
        super().__init__(parent)
        self._meta = meta

    def __iter__(self) -> _StateIterator:
        return _StateIterator(self._parent.__iter__(), self._meta)

    def __str__(self) -> str:
        return "DsjaxStateIterDataset"


def make_dataset(cfg: DataConfig, tokenizer, *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
    """The packed, batched input pipeline of ``cfg`` for one process.

    Args:
      cfg: the data config.
      tokenizer: from :func:`make_tokenizer` (anything with ``encode``, ``bos_id``, ``eos_id``, ``pad_id``).
      process_index, process_count: this process and the number of processes; default
        ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      A ``grain.IterDataset`` of dicts ``tokens``, ``segment_ids``, ``positions``, ``loss_mask``, each int32
      ``[batch_size // process_count, seq_len]``. Iterate with ``it = iter(ds)``; checkpoint ``it.get_state()``.

    Raises:
      DataError: ``batch_size`` not divisible by ``process_count``, bad files or records, or no documents for
        this process in this split.
    """
    if process_index is None or process_count is None:
        import jax  # noqa: PLC0415  (only needed for the defaults)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not _is_int(process_count) or process_count < 1 or not _is_int(process_index) or not (
            0 <= process_index < process_count):
        raise DataError(f"process_index={process_index!r}, process_count={process_count!r}: need 0 <= index < "
                        "count. Fix: pass jax.process_index() and jax.process_count()")
    if cfg.batch_size % process_count:
        raise DataError(
            f"batch_size={cfg.batch_size}: the global batch must divide evenly over {process_count} processes. "
            f"Fix: use a multiple of {process_count}, e.g. {process_count * max(1, cfg.batch_size // process_count)}")
    b, T = cfg.batch_size // process_count, cfg.seq_len
    all_docs = _documents(cfg)
    docs = all_docs.select(sources.split_indices(all_docs, cfg.split))
    ds = grain.MapDataset.source(docs)[process_index::process_count]
    if len(ds) == 0:
        raise DataError(
            f"source={cfg.source!r}: an epoch yields no documents for process {process_index} of {process_count} "
            f"(split {cfg.split!r} keeps {len(docs)} of {len(all_docs)} documents; about {sources.VALID_PERCENT}% "
            "and at least one are held out for 'valid'). Fix: add data (more files, lines or examples) or use "
            "fewer processes")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    ds = ds.repeat(cfg.num_epochs).map(_Encode(cfg, tokenizer, docs)).to_iter_dataset(_READ_OPTIONS)
    lengths = {"tokens": T, "loss_mask": T}
    if cfg.source == "sft":
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct=lengths, num_packing_bins=max(2 * b, 16), seed=cfg.seed, shuffle_bins=cfg.shuffle)
    else:
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
        if cfg.shuffle:
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=SHUFFLE_WINDOW_ROWS, seed=cfg.seed)
    ds = ds.batch(b, drop_remainder=True).map(_Finalize(tokenizer.pad_id))
    meta = {"version": _STATE_VERSION, "process_index": process_index, "process_count": process_count,
            "config": cfg.fingerprint(), "documents": len(docs)}
    return _StateIterDataset(ds, meta)
