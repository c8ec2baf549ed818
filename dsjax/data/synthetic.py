"""A deterministic synthetic task: multi-digit arithmetic with a digit-by-digit scratchpad.

Every example is a function of ``(seed, index)`` only, so a data set of any size needs no storage and the same
example comes back on any machine. An example is a dict of three strings::

    prompt     = "Q: 47+85=?\\nA: "
    completion = "<think>7+5=12, write 2 carry 1. 4+8+1=13, write 13.</think> <answer>132</answer>"
    answer     = "132"

Scratchpads, working from the rightmost digit (a missing digit of the shorter operand is written as 0):

* ``a+b``: ``"{x}+{y}[+1]={s}, write {s % 10}[ carry 1]."`` per column; the last column writes the whole sum.
* ``a-b``: when ``a < b``, first ``"{a}<{b}: compute {b}-{a}, negate."``; per column ``"{x}[-1]-{y}={d},
  write {d}."`` or, when the column needs a borrow, ``"borrow: 1{x}[-1]-{y}={d}, write {d}."`` (the ``-1`` in the
  next column is that borrow). Leading zeros are written in the scratchpad and dropped in the answer.
* ``a*b``: one partial product per digit of ``b`` (``"{a}*{d}={p}[, shifted {j}: {p * 10**j}]."``), then
  ``"Sum: p0+p1+...={a*b}."`` when ``b`` has more than one digit.

The answer is always ``str(int)`` of the exact result. Nothing here is ever evaluated as code. Prompt plus
completion is at most :data:`MAX_EXAMPLE_CHARS` characters (ASCII), so an example fits ``seq_len=256`` bytes.
"""

from __future__ import annotations

import json
import os

import grain
import numpy as np

__all__ = [
    "OPS",
    "MAX_EXAMPLE_CHARS",
    "arithmetic_example",
    "arithmetic_dataset",
    "write_arithmetic_jsonl",
    "format_prompt",
    "parse_answer",
]

OPS = ("+", "-", "*")
MAX_ADD_DIGITS = 5  # operands of + and - have 1..5 digits
MAX_MUL_DIGITS = (3, 2)  # a*b: a has 1..3 digits, b has 1..2 digits
MAX_EXAMPLE_CHARS = 250  # bound on len(prompt + completion) for the digit counts above (tested)


def format_prompt(a: int, op: str, b: int) -> str:
    """The prompt for ``a op b``; GRPO and evaluation build prompts with this too."""
    return f"Q: {a}{op}{b}=?\nA: "


def _digits(n: int) -> list[int]:
    """Digits of a non-negative int, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _add_steps(a: int, b: int) -> str:
    da, db = _digits(a), _digits(b)
    n = max(len(da), len(db))
    da += [0] * (n - len(da))
    db += [0] * (n - len(db))
    carry, steps = 0, []
    for i in range(n):
        s = da[i] + db[i] + carry
        lhs = f"{da[i]}+{db[i]}" + ("+1" if carry else "")
        if i == n - 1:
            steps.append(f"{lhs}={s}, write {s}.")
        else:
            steps.append(f"{lhs}={s}, write {s % 10}" + (" carry 1." if s >= 10 else "."))
        carry = int(s >= 10)
    return " ".join(steps)


def _sub_steps(a: int, b: int) -> str:
    """Column subtraction of ``a - b`` for ``a >= b``."""
    da, db = _digits(a), _digits(b)
    db += [0] * (len(da) - len(db))
    borrow, steps = 0, []
    for x, y in zip(da, db):
        lhs = f"{x}-1" if borrow else f"{x}"
        t = x - borrow
        if t >= y:
            steps.append(f"{lhs}-{y}={t - y}, write {t - y}.")
            borrow = 0
        else:
            steps.append(f"borrow: 1{lhs}-{y}={t + 10 - y}, write {t + 10 - y}.")
            borrow = 1
    return " ".join(steps)


def _mul_steps(a: int, b: int) -> str:
    parts, steps = [], []
    for j, d in enumerate(_digits(b)):
        p = a * d
        shifted = p * 10**j
        parts.append(shifted)
        steps.append(f"{a}*{d}={p}" + (f", shifted {j}: {shifted}." if j else "."))
    if len(parts) > 1:
        steps.append("Sum: " + "+".join(str(p) for p in parts) + f"={a * b}.")
    return " ".join(steps)


def _operand(rng: np.random.Generator, max_digits: int) -> int:
    n = int(rng.integers(1, max_digits + 1))
    lo = 0 if n == 1 else 10 ** (n - 1)
    return int(rng.integers(lo, 10**n))


def _check_difficulty(ops: str | tuple[str, ...], max_digits: int) -> tuple[str, ...]:
    ops_t = tuple(ops)
    if not ops_t or any(o not in OPS for o in ops_t) or len(set(ops_t)) != len(ops_t):
        raise ValueError(f"ops={ops!r}: must be distinct operators from {''.join(OPS)!r}, e.g. '+-'")
    if isinstance(max_digits, bool) or not isinstance(max_digits, int) or not 1 <= max_digits <= MAX_ADD_DIGITS:
        raise ValueError(f"max_digits={max_digits!r}: must be an integer in [1, {MAX_ADD_DIGITS}]")
    return ops_t


def arithmetic_example(rng_or_seed: int | np.random.Generator, index: int = 0, *, ops: str | tuple[str, ...] = OPS,
                       max_digits: int = MAX_ADD_DIGITS) -> dict[str, str]:
    """One arithmetic problem with its scratchpad completion.

    Args:
      rng_or_seed: an int seed (the example is then a pure function of ``(seed, index, ops, max_digits)``) or a
        ``np.random.Generator`` to draw from (``index`` is then ignored; the caller owns determinism).
      index: example index, >= 0.
      ops: the operators to draw from (uniformly), a subset of ``"+-*"``; fewer operators = an easier task.
      max_digits: operands of ``+``/``-`` have 1..max_digits digits (``*``: at most min(3, max_digits) by
        min(2, max_digits)); 1..5.

    Returns:
      ``{"prompt": str, "completion": str, "answer": str}``; ``answer`` is the exact result as ``str(int)``,
      also found between ``<answer>`` and ``</answer>`` at the end of ``completion``.
    """
    if isinstance(rng_or_seed, np.random.Generator):
        rng = rng_or_seed
    else:
        if int(index) < 0 or int(rng_or_seed) < 0:
            raise ValueError(f"seed={rng_or_seed!r}, index={index!r}: both must be >= 0")
        rng = np.random.default_rng([int(rng_or_seed), int(index)])
    ops_t = _check_difficulty(ops, max_digits)
    op = ops_t[int(rng.integers(len(ops_t)))]
    if op == "*":
        a = _operand(rng, min(MAX_MUL_DIGITS[0], max_digits))
        b = _operand(rng, min(MAX_MUL_DIGITS[1], max_digits))
        result, steps = a * b, _mul_steps(a, b)
    else:
        a, b = _operand(rng, max_digits), _operand(rng, max_digits)
        if op == "+":
            result, steps = a + b, _add_steps(a, b)
        elif a >= b:
            result, steps = a - b, _sub_steps(a, b)
        else:
            result, steps = a - b, f"{a}<{b}: compute {b}-{a}, negate. " + _sub_steps(b, a)
    completion = f"<think>{steps}</think> <answer>{result}</answer>"
    return {"prompt": format_prompt(a, op, b), "completion": completion, "answer": str(result)}


class _ArithmeticSource:
    """Random-access source of ``n`` examples (picklable, so it works with multiprocess prefetch)."""

    def __init__(self, n: int, seed: int, ops: str = "".join(OPS), max_digits: int = MAX_ADD_DIGITS):
        self._n, self._seed, self._ops, self._max_digits = n, seed, ops, max_digits

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> dict[str, str]:
        if not 0 <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} examples")
        return arithmetic_example(self._seed, index, ops=self._ops, max_digits=self._max_digits)

    def __repr__(self) -> str:
        return f"ArithmeticSource(n={self._n}, seed={self._seed}, ops={self._ops!r}, max_digits={self._max_digits})"


def arithmetic_dataset(n: int, seed: int = 0, *, ops: str | tuple[str, ...] = OPS,
                       max_digits: int = MAX_ADD_DIGITS) -> grain.MapDataset:
    """``n`` examples as a ``grain.MapDataset`` of ``{"prompt", "completion", "answer"}`` dicts.

    Element ``i`` is ``arithmetic_example(seed, i, ops=ops, max_digits=max_digits)``; chain ``.shuffle()``,
    ``.batch()`` etc. as needed.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: must be an integer >= 1")
    return grain.MapDataset.source(_ArithmeticSource(n, seed, "".join(_check_difficulty(ops, max_digits)),
                                                     max_digits))


def write_arithmetic_jsonl(path: str | os.PathLike[str], n: int, seed: int = 0, *,
                           ops: str | tuple[str, ...] = OPS, max_digits: int = MAX_ADD_DIGITS) -> str:
    """Writes ``n`` examples as JSONL (``prompt``, ``completion``, ``answer`` per line) for ``source="sft"``.

    The file is written to a temporary name next to ``path`` and renamed into place, so a reader never sees a
    half-written file. Parent directories are created. Returns the path written.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r}: must be an integer >= 1")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n):
            ex = arithmetic_example(seed, i, ops=ops, max_digits=max_digits)
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def parse_answer(text: str) -> str | None:
    """The text between the last ``<answer>`` and the following ``</answer>``, stripped; None if absent."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    end = text.find("</answer>", start)
    return text[start + len("<answer>") : end].strip() if end >= 0 else None

