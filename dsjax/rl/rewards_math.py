"""Math answer checking: extraction, normalisation, a safe arithmetic evaluator, and the ``accuracy`` reward.

Nothing here executes model output. Expressions are parsed with ``ast.parse(mode="eval")`` (a parser only) and
checked against a whitelist (:func:`dsjax.rl._symbolic_worker.parse_checked`); arithmetic is evaluated by walking
the tree with :class:`fractions.Fraction`; SymPy runs only in worker processes (:mod:`dsjax.rl.rewards_symbolic`).
Every stage works on bounded input, so a call costs at most linear time in the completion plus the SymPy timeout.

**Extraction** (:func:`extract_answer`): of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces,
``\\{`` ignored) and the last complete ``<answer>...</answer>``, the one that starts later (so a box inside the
answer tags wins). Unterminated ones are skipped. Answers longer than ``MAX_ANSWER_CHARS`` score 0.

**Normalisation** (:func:`normalize_answer`, applied to both sides):

* Unicode: NFKC (fullwidth ``１２３`` -> ``123``, ``½`` -> ``1/2``; superscripts first become ``^{..}``, so ``5²``
  is 25, not 52), format characters removed (zero-width spaces, joiners, BOM, RTL/LTR marks and embeddings), every
  decimal digit mapped to ASCII (Arabic-Indic ``١٢٣`` -> ``123``), ``−`` (U+2212) -> ``-``, ``× · ⋅`` -> ``*``,
  ``÷`` -> ``/``, ``√`` -> ``sqrt``, ``π`` -> ``pi``. Other non-ASCII characters (and control characters such as
  NUL) stay and make the answer unparsable, so it can then only match exactly.
* Dropped: ``$``, ``\\$``, ``\\( \\) \\[ \\]``, ``\\left``/``\\right``, LaTeX spacing (``\\, \\; \\! \\quad ~``),
  degrees (``^\\circ``, ``°``), a trailing ``.``, a leading ``+``, all whitespace; ``\\text{..}``, ``\\mathrm{..}``,
  ``\\textbf{..}``, ``\\mbox{..}``, ``\\operatorname{..}`` are unwrapped; ``\\dfrac``/``\\tfrac``/``\\cfrac`` ->
  ``\\frac``; ``\\%`` -> ``%``.
* ``x = 3``, ``f(x)=2x`` or ``y \\approx 3.14``: only the text after the last ``=`` / ``\\approx`` is kept (not
  when the answer has ``<=``, ``>=`` or ``!=``).
* Thousands separators only in the exact pattern ``1,234`` / ``-12,345,678.5`` (also ``1{,}234``); other commas
  (tuples, intervals) stay and make the answer match exactly only.
* Decimals lose trailing zeros (``3.0`` -> ``3``, ``2.50`` -> ``2.5``).
* Percent rule: an answer ending in ``%`` may stand for either number; ``50%`` matches ``50`` and ``0.5`` (and
  ``50%``), in both directions.
* Words around exactly one number (``The answer is 42 dollars.``, ``5 cm``: every word two or more letters, no
  LaTeX command, the number not touching a letter) stand for that number, on either side. A lone letter (``4x``)
  is a variable, ``3xy`` is a product and ``4 or 5`` has two numbers, so none of them falls back.

**Comparison**, in order: (1) normalised strings equal; (2) numerically, when both sides are plain arithmetic
(integers, decimals, scientific notation ``1.5e-3``, ``\\frac{a}{b}``/``\\frac12``/``a/b``, ``+ - * /``,
parentheses, ``\\cdot``/``\\times``, ``^`` with an integer exponent up to 1024, implicit products such as ``2(3)``;
``2\\frac{1}{2}`` is a product, not a mixed number), with exact rational arithmetic: values written exactly on both
sides (integers, fractions, ``3.0``) must be equal; when either side has a decimal with a nonzero fraction digit
or scientific notation (``0.33333333`` vs ``1/3``) a relative tolerance applies (default 1e-6). So ``1234568``
never matches ``1234567``, but ``1234567.5`` does (4e-7 relative). Numbers beyond 8192 bits, literals over 400
characters and exponents in scientific notation beyond 400 are rejected. (3) Symbolically, when either side has
symbols or functions (``\\sqrt``, ``\\sqrt[n]``, ``\\pi``, ``e``, ``\\sin``, ``\\ln``, single-letter variables,
``x^{n}``), with ``sympy.simplify(a - b) == 0`` (or, for closed forms, a 50-digit numeric check at the same
tolerance, or at 1e-20 when both sides are written exactly: ``\\sqrt{2}`` matches ``1.4142136`` but not ``1.41``) in a
worker process killed after ``symbolic_timeout_s``. Towers of powers (``9**9**9``) are rejected before any stage
evaluates them. Without SymPy installed stage (3) is skipped.
"""

from __future__ import annotations

import ast
import re
import time
import unicodedata
from fractions import Fraction
from typing import Any

from dsjax.rl._symbolic_worker import Rejected, parse_checked
from dsjax.rl.rewards_latex import FUNCTIONS as _FUNCS
from dsjax.rl.rewards_latex import latex_to_expression
from dsjax.rl.rewards_symbolic import symbolic_equal

__all__ = ["MAX_ANSWER_CHARS", "extract_answer", "normalize_answer", "latex_to_expression", "eval_arithmetic",
           "answers_match", "make_accuracy_reward", "accuracy_reward", "reference_answer"]

MAX_ANSWER_CHARS = 5000
MAX_BITS = 8192
MAX_POW_EXPONENT = 1024
EXACT_REL_TOL = 1e-20  # closed forms vs exact values in SymPy: N(., 50) agreement, i.e. equal

# ----------------------------------------------------------------------------------------------------- extraction
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"\\.|[{}]", re.S)


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(start, content) of the last complete ``\\boxed{...}``; linear time even for 1e5 unclosed boxes.

    Scanning the boxes from last to first, each scan stops at the start of the next box: a box still open there
    can never close, because the later box never closes either.
    """
    starts = list(_BOXED.finditer(text))
    limit = len(text)
    for m in reversed(starts):
        depth = 1
        for b in _BRACE.finditer(text, m.end(), limit):
            c = b.group()
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return m.start(), text[m.end():b.start()]
        limit = m.start()
    return None


def _last_answer_tag(text: str) -> tuple[int, str] | None:
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return start, text[start + len("<answer>"):end]


def extract_answer(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}`` or ``<answer></answer>`` (whichever starts later), or None."""
    if not isinstance(text, str):
        return None
    cands = [c for c in (_last_boxed(text), _last_answer_tag(text)) if c is not None]
    if not cands:
        return None
    return max(cands, key=lambda c: c[0])[1]


# -------------------------------------------------------------------------------------------------- normalisation
_SYMBOLS = {0x2212: "-", 0xFE63: "-", 0xFF0D: "-", 0x00D7: "*", 0x22C5: "*", 0x00B7: "*", 0x00F7: "/",
            0x2044: "/", 0x2215: "/", 0x221A: " sqrt ", 0x03C0: " pi "}
_SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-"))
_SUB_SUPER = re.compile("([⁰¹²³⁴⁵⁶⁷⁸⁹⁻]+)|([₀₁₂₃₄₅₆₇₈₉]+)")


def _sub_super(m: re.Match) -> str:
    if m.group(1):
        mark, text = "^", "".join(_SUPERSCRIPTS[c] for c in m.group(1))
    else:
        mark, text = "_", "".join(str(ord(c) - 0x2080) for c in m.group(2))
    return mark + (text if len(text) == 1 else "{" + text + "}")


def _unicode_clean(s: str) -> str:
    """NFKC (after ``x²`` -> ``x^{2}``, ``x₁`` -> ``x_{1}``), format characters dropped, digits to ASCII,
    ``− × · ÷ ⁄ √ π`` to ``- * * / / sqrt pi``."""
    if s.isascii():
        return s
    s = unicodedata.normalize("NFKC", _SUB_SUPER.sub(_sub_super, s))
    out = []
    for ch in s:
        if ch.isascii():
            out.append(ch)
            continue
        cat = unicodedata.category(ch)
        if cat == "Cf":
            continue
        if cat == "Nd":
            out.append(str(unicodedata.decimal(ch)))
        else:
            out.append(_SYMBOLS.get(ord(ch), ch))
    return "".join(out)


_UNWRAP = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_LEFTRIGHT = re.compile(r"\\(?:left|right|big|Big|bigl|bigr|Bigl|Bigr|displaystyle)(?![A-Za-z])")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\circ")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?%?")
_TRAILING_ZEROS = re.compile(r"(-?\d+)\.(\d*?)0+(%?)")


def _clean(s: str) -> str:
    """First normalisation stage (whitespace kept, for the LaTeX converter)."""
    s = _unicode_clean(s)
    s = s.replace("\\$", "").replace("$", "")
    for d in ("\\(", "\\)", "\\[", "\\]"):
        s = s.replace(d, " ")
    s = _UNWRAP.sub(lambda m: " " + m.group(1) + " ", s)
    for f in ("\\dfrac", "\\tfrac", "\\cfrac"):
        s = s.replace(f, "\\frac")
    s = _LEFTRIGHT.sub("", s)
    s = _SPACING.sub(" ", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "%").replace("{,}", ",")
    if not any(op in s for op in ("<=", ">=", "!=", "\\le", "\\ge", "\\ne")):
        parts = re.split(r"=|\\approx(?![A-Za-z])", s)
        if len(parts) > 1 and parts[-1].strip():
            s = parts[-1]
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if s.startswith("+"):
        s = s[1:].lstrip()
    return s


def normalize_answer(s: str) -> str:
    """The canonical string used for the exact-match stage (see the module docstring for the rules)."""
    s = re.sub(r"\s+", "", _clean(s))
    m = _TRAILING_ZEROS.fullmatch(s)
    if m:
        s = m.group(1) + ("." + m.group(2) if m.group(2) else "") + m.group(3)
    return s


# ------------------------------------------------------------------------------------------ arithmetic evaluation
class NotArithmetic(Exception):
    """The expression has symbols, functions or a non-integer power: a job for the symbolic stage."""


class _Invalid(Exception):
    pass


def _bits(q: Fraction) -> int:
    return max(q.numerator.bit_length(), q.denominator.bit_length())


def _ev(src: str, node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) is int:
            return Fraction(node.value)
        return Fraction(ast.get_source_segment(src, node))  # exact decimal; exponent bounded by parse_checked
    if isinstance(node, ast.UnaryOp):
        v = _ev(src, node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _ev(src, node.left), _ev(src, node.right)
        op = type(node.op)
        if op is ast.Add:
            r = a + b
        elif op is ast.Sub:
            r = a - b
        elif op is ast.Mult:
            r = a * b
        elif op is ast.Div:
            if b == 0:
                raise _Invalid
            r = a / b
        else:  # Pow: integer exponent, bounded result size checked before computing
            if b.denominator != 1 or abs(b) > MAX_POW_EXPONENT:
                raise NotArithmetic
            if a == 0 and b < 0:
                raise _Invalid
            if _bits(a) * abs(int(b)) > MAX_BITS:
                raise _Invalid
            r = a ** int(b)
        if _bits(r) > MAX_BITS:
            raise _Invalid
        return r
    raise NotArithmetic  # Name, Call


def eval_arithmetic(expr: str) -> Fraction | None:
    """Exact value of a whitelisted arithmetic expression (Python syntax), None if invalid or out of bounds.

    Raises :class:`NotArithmetic` for valid expressions with symbols/functions. Never executes anything.
    """
    try:
        tree = parse_checked(expr)
    except Rejected:
        return None
    return _eval_tree(expr, tree)


def _eval_tree(src: str, tree: ast.Expression) -> Fraction | None:
    try:
        return _ev(src, tree.body)
    except (_Invalid, ValueError, ZeroDivisionError, OverflowError, RecursionError):
        return None


# ---------------------------------------------------------------------------------------------------- comparison
_WORD = re.compile(r"[A-Za-z]+")
_LONE_NUMBER = re.compile(r"(?<![A-Za-z\d.,])-?\d+(?:,\d{3})*(?:\.\d+)?%?(?![A-Za-z\d])")


def _words_around_number(text: str) -> str:
    """``The answer is 42 dollars`` -> ``42``: words (2+ letters, not function names), no LaTeX, one number."""
    if "\\" in text or len(text) > 512:
        return text
    words = _WORD.findall(text)
    if not words or any(len(w) < 2 for w in words) or all(w in _FUNCS or w == "pi" for w in words):
        return text
    nums = _LONE_NUMBER.findall(text)
    return nums[0].replace(",", "") if len(nums) == 1 else text


_INEXACT = re.compile(r"\.\d*[1-9]|[eE]")  # a decimal with a nonzero fraction digit, or scientific notation


def _forms(clean: str) -> list[tuple[str, ast.Expression, bool]]:
    """(expression, tree, inexact) candidates for one side (two when it ends in ``%``); ``inexact`` when a literal
    is a decimal with a nonzero fraction digit or in scientific notation."""
    text = _words_around_number(clean)
    out = []
    bases = [(text[:-1], False), (text[:-1], True)] if text.endswith("%") else [(text, False)]
    for base, per_cent in bases:
        expr = latex_to_expression(base)
        if expr is None:
            continue
        if per_cent:
            expr = f"({expr})/100"
        try:
            tree = parse_checked(expr)
        except Rejected:
            continue
        inexact = any(isinstance(n, ast.Constant) and type(n.value) is float and
                      _INEXACT.search(ast.get_source_segment(expr, n) or "e") for n in ast.walk(tree))
        out.append((expr, tree, inexact))
    return out


def answers_match(pred: str, ref: str, *, rel_tol: float = 1e-6, symbolic: bool = True,
                  symbolic_timeout_s: float = 1.0) -> bool:
    """Whether the extracted prediction equals the reference (exact, then numeric, then symbolic)."""
    if len(pred) > MAX_ANSWER_CHARS or len(ref) > MAX_ANSWER_CHARS:
        return False
    p_clean, r_clean = _clean(pred), _clean(ref)
    p_norm, r_norm = normalize_answer(pred), normalize_answer(ref)
    if not p_norm:
        return False
    if p_norm == r_norm:
        return True
    p_forms, r_forms = _forms(p_clean), _forms(r_clean)
    tol = Fraction(rel_tol)
    values: dict[str, Any] = {}

    def value(expr, tree):
        if expr not in values:
            try:
                values[expr] = _eval_tree(expr, tree)
            except NotArithmetic:
                values[expr] = NotArithmetic
        return values[expr]

    pending = []
    for pe, pt, p_inexact in p_forms:
        for re_, rt, r_inexact in r_forms:
            inexact = p_inexact or r_inexact
            pv, rv = value(pe, pt), value(re_, rt)
            if isinstance(pv, Fraction) and isinstance(rv, Fraction):
                if pv == rv or (inexact and abs(pv - rv) <= tol * max(abs(pv), abs(rv))):
                    return True
            elif pv is not None and rv is not None:  # at least one has symbols/functions
                pending.append((pe, re_, rel_tol if inexact else EXACT_REL_TOL))
    if not symbolic or not pending:
        return False
    deadline = time.monotonic() + symbolic_timeout_s
    for pe, re_, pair_tol in pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if symbolic_equal(pe, re_, timeout_s=remaining, rel_tol=pair_tol):
            return True
    return False


# -------------------------------------------------------------------------------------------------------- reward
def reference_answer(example: dict) -> str | None:
    """``example["answer"]`` as text (numbers via ``str``; ``#### x`` -> ``x``; a boxed reference is unboxed)."""
    ans = example.get("answer") if isinstance(example, dict) else None
    if ans is None:
        return None
    if hasattr(ans, "item") and not isinstance(ans, str):  # numpy scalar
        ans = ans.item()
    ans = ans if isinstance(ans, str) else str(ans)
    if "####" in ans:
        ans = ans.rsplit("####", 1)[1]
    boxed = extract_answer(ans)
    ans = (boxed if boxed is not None else ans).strip()
    return ans or None


def make_accuracy_reward(*, rel_tol: float = 1e-6, symbolic: bool = True, symbolic_timeout_s: float = 1.0):
    """The ``accuracy`` reward with other settings: 1.0 / 0.0, None when the example has no answer."""

    def accuracy(completion: str, example: dict) -> float | None:
        ref = reference_answer(example)
        if ref is None:
            return None
        pred = extract_answer(completion)
        if pred is None:
            return 0.0
        ok = answers_match(pred, ref, rel_tol=rel_tol, symbolic=symbolic, symbolic_timeout_s=symbolic_timeout_s)
        return 1.0 if ok else 0.0

    return accuracy


accuracy_reward = make_accuracy_reward()
