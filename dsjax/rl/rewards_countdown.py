"""The TinyZero Countdown reward: reach ``target`` with each of ``numbers`` exactly once and ``+ - * /``.

Scores (TinyZero ``verl/utils/reward_score/countdown.py``, ``format_score=0.1``, ``score=1.0``):

* ``0.0`` -- no ``<answer>...</answer>`` in the completion;
* ``0.1`` -- an answer tag is there but the equation is wrong: the numbers used are not the given multiset, it
  uses anything but integers, ``+ - * /`` and parentheses (``**``, ``//``, ``%``, decimals, names, ``=``), it
  divides by zero, it cannot be parsed, or its value is not the target. As in TinyZero, *any* answer tag earns
  the format score, even unparsable text; ``make_countdown_reward(require_parsable=True)`` gives 0.0 instead when
  the content is not an arithmetic expression (``**`` still parses, so it keeps 0.1);
* ``1.0`` -- each given number used exactly once and the value equals the target.

Differences from TinyZero, all deliberate: the equation is evaluated by walking its AST with exact
:class:`~fractions.Fraction` arithmetic (TinyZero calls ``eval`` and accepts ``abs(result - target) < 1e-5``), so
``**`` and ``//`` (which its character whitelist lets through to ``eval``) are rejected; the last complete
``<answer>`` anywhere in the completion counts (TinyZero looks only at the last line after ``Assistant:``, an
artefact of its prompt-plus-response strings); answers over 256 characters or 64 nodes are invalid (0.1). Unary
``+``/``-`` are allowed, as in TinyZero. Digits are NFKC/Unicode-normalised like the accuracy reward.

``example``: ``numbers`` (list of ints) and ``target`` (int); None (not applicable) when either is missing.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

from dsjax.rl.rewards_math import _last_answer_tag, _unicode_clean

__all__ = ["make_countdown_reward", "countdown_reward", "parse_countdown_equation"]

MAX_EQUATION_CHARS = 256
MAX_EQUATION_NODES = 64
_ALLOWED_CHARS = re.compile(r"[\d+\-*/()\s]*")


class _Bad(Exception):
    pass


def parse_countdown_equation(text: str) -> tuple[list[int], Fraction | None] | None:
    """(numbers used, exact value or None if invalid) of an arithmetic equation, or None if it is not one.

    Raises nothing; never evaluates anything but ``+ - * /`` on integer literals.
    """
    if len(text) > MAX_EQUATION_CHARS:
        return [], None
    text = _unicode_clean(text).strip()
    if not text or not _ALLOWED_CHARS.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    used: list[int] = []
    count = [0]

    def ev(node: ast.AST, depth: int) -> Fraction:
        count[0] += 1
        if count[0] > MAX_EQUATION_NODES or depth > MAX_EQUATION_NODES:
            raise _Bad
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = ev(node.operand, depth + 1)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left, depth + 1), ev(node.right, depth + 1)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise _Bad  # **, //, %, anything else

    try:
        value = ev(tree.body, 0)
    except (_Bad, ZeroDivisionError, RecursionError):
        return used, None
    return used, value


def make_countdown_reward(*, format_score: float = 0.1, score: float = 1.0, require_parsable: bool = False):
    """The ``countdown`` reward with other scores (see the module docstring)."""

    def countdown(completion: str, example: dict) -> float | None:
        numbers, target = example.get("numbers"), example.get("target")
        if numbers is None or target is None:
            return None
        want = sorted(int(x) for x in numbers)
        target = Fraction(int(target))
        tag = _last_answer_tag(completion)
        if tag is None:
            return 0.0
        parsed = parse_countdown_equation(tag[1])
        if parsed is None:
            return 0.0 if require_parsable else format_score
        used, value = parsed
        if sorted(used) != want or value is None or value != target:
            return format_score
        return score

    return countdown


countdown_reward = make_countdown_reward()
