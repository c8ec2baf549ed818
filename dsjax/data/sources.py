"""Where documents come from: file discovery, a compact document index, the train/valid split and reading.

A *document* is the unit that is shuffled, tokenised as ``[bos] + tokens + [eos]`` and held out by the split:

* ``"default"`` / ``"text"``: a file. Files over :data:`MAX_DOC_BYTES` are cut into near-equal pieces (at UTF-8
  character boundaries) and each piece is its own document: the first piece carries the file's ``bos``, the
  last its ``eos``. Pieces bound memory (one piece is read at a time, never a whole file), let the shuffle mix
  pieces of a long file with other files, and let a single-file corpus still have a validation hold-out.
* ``"jsonl"`` / ``"sft"``: one non-blank line of a JSONL file. Every line is parsed once while indexing, so a
  bad line fails at start-up with ``file:line`` instead of hours into training.
* ``"arithmetic"``: one synthetic example index.

The index stores four integers per document (no text), so millions of JSONL lines cost tens of MB.
The split hashes a stable key per document: ``(file key, piece or line number)``, where the file key is the
path relative to the non-wildcard prefix of the glob that matched it (relative to the standard library for
the default corpus), so moving a data directory does not change the split.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig

import numpy as np

__all__ = [
    "DataError",
    "MAX_DOC_BYTES",
    "VALID_PERCENT",
    "Documents",
    "default_corpus_files",
    "index_default",
    "expand_globs",
    "index_files",
    "index_jsonl",
    "index_range",
    "split_indices",
    "read_piece",
    "read_jsonl_record",
]

MAX_DOC_BYTES = 1 << 15  # files larger than this (32 KiB) are cut into pieces of at most this many bytes
VALID_PERCENT = 1  # ~1% of documents (at least one) are held out as the "valid" split
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})


class DataError(ValueError):
    """Bad, missing or empty data files, tokenizer problems or an invalid data config.

    The message names the path (``file:line`` for JSONL), field or value and the fix.
    """


@dataclasses.dataclass(frozen=True)
class Documents:
    """A compact table of documents; element ``i`` is the tuple ``(file_id, start, end, ordinal)``.

    For pieces of files, ``[start, end)`` is a byte range and ``ordinal`` the piece number; for JSONL,
    ``[start, end)`` is the line's byte range and ``ordinal`` its 1-based line number; for synthetic sources
    ``file_id`` is -1 and ``start`` the example index.

    Attributes:
      kind: ``"pieces"``, ``"jsonl"`` or ``"range"``.
      paths: file paths indexed by ``file_id``.
      keys: stable split keys of the files, indexed by ``file_id``.
      sizes: file sizes in bytes, indexed by ``file_id``.
      table: int64 ``[n, 4]`` rows ``(file_id, start, end, ordinal)``.
    """

    kind: str
    paths: tuple[str, ...]
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    table: np.ndarray

    def __len__(self) -> int:
        return int(self.table.shape[0])

    def __getitem__(self, index: int) -> tuple[int, int, int, int]:
        file_id, start, end, ordinal = self.table[index]
        return int(file_id), int(start), int(end), int(ordinal)

    def select(self, indices: np.ndarray) -> Documents:
        """The documents at ``indices`` (same files)."""
        return dataclasses.replace(self, table=self.table[np.asarray(indices, dtype=np.int64)])

    def hashes(self) -> np.ndarray:
        """Stable uint64 hash per document of ``(file key, ordinal)``; independent of Python's hash seed."""
        file_hash = np.array(
            [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in self.keys]
            or [0],
            dtype=np.uint64,
        )
        base = file_hash[np.maximum(self.table[:, 0], 0)] if len(self) else np.zeros(0, np.uint64)
        x = base + self.table[:, 3].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        # splitmix64 finaliser
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def default_corpus_files() -> list[str]:
    """The standard library's own ``*.py`` files: the corpus of ``source="default"``, present wherever Python is.

    Recursive under ``sysconfig.get_paths()["stdlib"]``, sorted, skipping ``site-packages``, ``test``/``tests``,
    ``idlelib`` and ``lib2to3`` directories and files that are empty or unreadable.

    Returns:
      Absolute paths.
    """
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in filenames:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                try:
                    if os.path.isfile(path) and os.path.getsize(path) > 0 and os.access(path, os.R_OK):
                        found.append(path)
                except OSError:
                    continue
    return sorted(found)


def index_default() -> Documents:
    """The default corpus as documents, keyed by path relative to the standard library.

    Raises:
      DataError: no standard-library sources were found.
    """
    files = default_corpus_files()
    if not files:
        raise DataError("source='default': found no standard-library *.py files. Fix: use source='text'")
    root = os.path.realpath(sysconfig.get_paths()["stdlib"])
    return index_files([(f, os.path.relpath(f, root)) for f in files], skip_bad=True)


def _glob_base(pattern: str) -> str:
    """The leading directories of ``pattern`` that contain no wildcard."""
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) if fixed else ("" if not pattern.startswith(os.sep) else os.sep)


def expand_globs(patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """Expands file globs (``**`` allowed) into ``(path, key)`` pairs, sorted by path and de-duplicated.

    Raises:
      DataError: a pattern matches no regular file.
    """
    seen: dict[str, tuple[str, str]] = {}
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        matches = [m for m in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(m)]
        if not matches:
            raise DataError(
                f"paths: {pattern!r} matches no files (working directory {os.getcwd()!r}). Fix: check the path, "
                "or use an absolute path; globs such as 'data/**/*.txt' are expanded by dsjax"
            )
        base = _glob_base(pattern)
        for m in matches:
            seen.setdefault(os.path.realpath(m), (m, os.path.relpath(m, base) if base else m))
    return sorted(seen.values())


def _table(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def index_files(files: list[tuple[str, str]], *, skip_bad: bool = False) -> Documents:
    """Indexes files as documents, cutting files over :data:`MAX_DOC_BYTES` into near-equal pieces.

    Args:
      files: ``(path, key)`` pairs.
      skip_bad: skip empty or unreadable files silently (the default corpus) instead of raising.

    Raises:
      DataError: a file is empty or unreadable (unless ``skip_bad``).
    """
    paths, keys, sizes, rows = [], [], [], []
    for path, key in files:
        try:
            size = os.path.getsize(path)
            readable = os.access(path, os.R_OK)
        except OSError as e:
            size, readable = 0, False
            if not skip_bad:
                raise DataError(f"{path}: cannot stat ({e}). Fix: check the file exists and is readable") from e
        if not readable or size == 0:
            if skip_bad:
                continue
            problem = "is empty" if readable else "is not readable"
            raise DataError(f"{path}: file {problem}. Fix: remove it from DataConfig.paths or fix the file")
        file_id = len(paths)
        paths.append(path)
        keys.append(key)
        sizes.append(size)
        n = -(-size // MAX_DOC_BYTES)
        bounds = [size * i // n for i in range(n + 1)]
        rows += [(file_id, bounds[i], bounds[i + 1], i) for i in range(n)]
    return Documents("pieces", tuple(paths), tuple(keys), tuple(sizes), _table(rows))


def index_jsonl(files: list[tuple[str, str]], fields: tuple[str, ...]) -> Documents:
    """Indexes every non-blank line of JSONL files, checking it is an object with string ``fields``.

    Raises:
      DataError: a file is empty or unreadable, has no records, or a line is not JSON or lacks a field
        (the message gives ``file:line``).
    """
    paths, keys, sizes, rows = [], [], [], []
    for path, key in files:
        file_id, count = len(paths), 0
        try:
            with open(path, "rb") as f:
                offset = 0
                for lineno, line in enumerate(f, 1):
                    start, offset = offset, offset + len(line)
                    if not line.strip():
                        continue
                    _parse_record(line, fields, path, lineno)
                    rows.append((file_id, start, offset, lineno))
                    count += 1
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e}). Fix: check the file exists and is readable") from e
        if count == 0:
            raise DataError(
                f"{path}: no JSON records (the file is empty or blank). Fix: remove it from DataConfig.paths"
            )
        paths.append(path)
        keys.append(key)
        sizes.append(offset)
    return Documents("jsonl", tuple(paths), tuple(keys), tuple(sizes), _table(rows))


def index_range(n: int, key: str) -> Documents:
    """``n`` synthetic documents ``0..n-1`` (``file_id`` -1, ``start`` = index)."""
    idx = np.arange(n, dtype=np.int64)
    table = np.stack([np.full(n, -1, np.int64), idx, idx + 1, idx], axis=1)
    return Documents("range", (), (key,), (0,), table)


def split_indices(docs: Documents, split: str) -> np.ndarray:
    """Indices (ascending) of the documents in ``split``.

    ``"valid"`` holds the documents whose stable hash is 0 modulo ``100 // VALID_PERCENT`` (~1%), or, when
    that selects none, the single document with the smallest hash; ``"train"`` holds the rest.
    """
    if len(docs) == 0:
        return np.zeros(0, np.int64)
    h = docs.hashes()
    valid = (h % np.uint64(100 // VALID_PERCENT)) == 0
    if not valid.any():
        valid[int(np.argmin(h))] = True
    return np.flatnonzero(valid if split == "valid" else ~valid)


def _is_continuation(byte: int) -> bool:
    return (byte & 0xC0) == 0x80


def read_piece(path: str, start: int, end: int, size: int) -> str:
    """Reads bytes ``[start, end)`` of a file as text, moved forward to UTF-8 character boundaries.

    A boundary that falls inside a multi-byte character is moved past that character's continuation bytes,
    both where a piece starts and where it ends, so adjacent pieces share no byte and drop none. Invalid
    UTF-8 decodes with replacement characters.

    Raises:
      DataError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start + 3 if end < size else end - start)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}). Fix: check the file exists and is readable") from e
    stop = end - start
    while stop < len(data) and _is_continuation(data[stop]):
        stop += 1
    begin = 0
    if start > 0:
        while begin < min(3, stop) and _is_continuation(data[begin]):
            begin += 1
    return data[begin:stop].decode("utf-8", errors="replace")


def _parse_record(line: bytes, fields: tuple[str, ...], path: str, lineno: int) -> dict[str, str]:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{path}:{lineno}: not valid JSON ({e}). Fix: one JSON object per line") from e
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}. Fix: one object per line"
        )
    for field in fields:
        if field not in record:
            raise DataError(
                f"{path}:{lineno}: no field {field!r} (fields: {sorted(record)[:8]}). Fix: add it, or set the "
                "DataConfig field naming it (text_field / prompt_field / completion_field)"
            )
        if not isinstance(record[field], str):
            raise DataError(
                f"{path}:{lineno}: field {field!r} is a {type(record[field]).__name__}, not a string. "
                "Fix: store text as a JSON string"
            )
    return record


def read_jsonl_record(path: str, start: int, end: int, lineno: int, fields: tuple[str, ...]) -> dict[str, str]:
    """Reads and checks the JSON object on one line (byte range ``[start, end)``, 1-based ``lineno``).

    Raises:
      DataError: the file cannot be read or the line is not an object with string ``fields``.
    """
    try:
        with open(path, "rb") as f:
            f.seek(start)
            line = f.read(end - start)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e}). Fix: check the file exists and is readable") from e
    return _parse_record(line, fields, path, lineno)
