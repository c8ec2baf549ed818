"""LaTeX (or plain) answer text -> a Python-syntax expression string for the whitelist parser.

A small recursive-descent translator over at most 512 characters and 40 nesting levels; it only produces text
(nothing is evaluated). Supported: numbers (``1.5e-3``), ``+ - * /``, ``\\cdot``/``\\times``/``\\div``, ``^`` and
``**``, ``{}``/``()`` groups, ``\\frac{a}{b}``/``\\frac12``, ``\\sqrt{x}``/``\\sqrt[n]{x}``/``sqrt(x)``,
``\\sin \\cos \\tan \\ln \\log \\exp``, ``\\pi``, Greek letters, single-letter symbols (a run of letters is a
product, ``xy`` -> ``x*y``), and implicit products (``2\\sqrt{2}``, ``2(3)``). As in LaTeX, an unbraced argument
of ``\\frac``, ``\\sqrt`` or ``^`` is one character (``x^23`` is ``x**2*3``). Anything else (``_``, ``!``, ``|``,
``,``, ``[`` outside ``\\sqrt[n]``, ``\\infty``, unknown commands) gives None.
"""

from __future__ import annotations

import re

from dsjax.rl._symbolic_worker import FUNCTIONS

__all__ = ["latex_to_expression", "FUNCTIONS"]

_TOKEN = re.compile(r"""
   (?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  |(?P<cmd>\\[A-Za-z]+)
  |(?P<esc>\\.)
  |(?P<word>[A-Za-z]+)
  |(?P<pow>\*\*)
  |(?P<ws>\s+)
  |(?P<op>.)
""", re.X | re.S)
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "sigma", "phi", "omega", "tau",
          "rho", "eta", "xi", "zeta", "kappa", "nu", "chi", "psi", "varepsilon", "varphi"}
_CMD_OPS = {"cdot": "*", "times": "*", "ast": "*", "div": "/"}
_MAX_NEST = 40


class _Fail(Exception):
    pass


class _Converter:
    """Tokens in, ``(kind, text)`` output tokens out; raises :class:`_Fail` on anything unsupported."""

    def __init__(self, s: str):
        self.toks = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(s) if m.lastgroup != "ws"]
        self.i = 0
        self.out: list[tuple[str, str]] = []

    def peek(self):
        return self.toks[self.i] if self.i < len(self.toks) else (None, None)

    def emit(self, kind: str, text: str) -> None:
        self.out.append((kind, text))

    def seq(self, stop: str | None, depth: int) -> None:
        if depth > _MAX_NEST:
            raise _Fail
        while True:
            kind, text = self.peek()
            if kind is None:
                if stop is None:
                    return
                raise _Fail
            if kind == "op" and text == stop:
                self.i += 1
                return
            self.item(depth)

    def group(self, stop: str, depth: int) -> None:
        self.emit("(", "(")
        self.seq(stop, depth + 1)
        self.emit(")", ")")

    def arg(self, depth: int, latex: bool) -> None:
        """One argument (of ``\\frac``, ``\\sqrt``, ``^`` or a function), emitted in parentheses."""
        if depth > _MAX_NEST:
            raise _Fail
        kind, text = self.peek()
        if kind is None:
            raise _Fail
        self.i += 1
        if kind == "op" and text == "{":
            return self.group("}", depth)
        if kind == "op" and text == "(":
            return self.group(")", depth)
        if kind == "op" and text in "+-":
            self.emit("(", "(")
            self.emit("op", text)
            self.arg(depth + 1, latex)
            return self.emit(")", ")")
        if kind in ("num", "word") and latex and len(text) > 1:  # LaTeX takes one character: \frac12, x^23
            if text[0] == ".":
                raise _Fail
            self.toks.insert(self.i, (kind, text[1:]))
            text = text[0]
        self.emit("(", "(")
        if kind == "num":
            self.emit("num", text)
        elif kind == "word":
            self.word(text, depth + 1)
        elif kind == "cmd":
            self.i -= 1
            self.item(depth + 1)
        else:
            raise _Fail
        self.emit(")", ")")

    def func(self, name: str, depth: int, latex: bool) -> None:
        if name == "sqrt" and self.peek() == ("op", "["):  # \sqrt[n]{x} -> ((x)**(1/(n)))
            self.i += 1
            start = len(self.out)
            self.seq("]", depth + 1)
            index = self.out[start:]
            del self.out[start:]
            self.emit("(", "(")
            self.arg(depth + 1, latex)
            self.out += [("op", "**"), ("(", "("), ("num", "1"), ("op", "/"), ("(", "(")] + index
            self.out += [(")", ")"), (")", ")"), (")", ")")]
            return
        self.emit("func", name)
        self.arg(depth + 1, latex)

    def word(self, w: str, depth: int) -> None:
        if w in FUNCTIONS:
            return self.func(w, depth, latex=False)
        if w == "pi":
            return self.emit("name", "pi")
        for ch in w:  # a run of letters is a product of single-letter symbols
            self.emit("name", ch)

    def item(self, depth: int) -> None:
        kind, text = self.peek()
        self.i += 1
        if kind == "num":
            self.emit("num", text)
        elif kind == "word":
            self.word(text, depth)
        elif kind == "pow":
            self.emit("op", "**")
            self.arg(depth + 1, latex=False)
        elif kind == "cmd":
            name = text[1:]
            if name == "frac":
                self.emit("(", "(")
                self.arg(depth + 1, latex=True)
                self.emit("op", "/")
                self.arg(depth + 1, latex=True)
                self.emit(")", ")")
            elif name in FUNCTIONS:
                self.func(name, depth, latex=True)
            elif name == "pi":
                self.emit("name", "pi")
            elif name in _GREEK:
                self.emit("name", {"lambda": "lambda_", "varepsilon": "epsilon", "varphi": "phi"}.get(name, name))
            elif name in _CMD_OPS:
                self.emit("op", _CMD_OPS[name])
            else:
                raise _Fail
        elif kind == "op":
            if text == "{":
                self.group("}", depth)
            elif text == "(":
                self.group(")", depth)
            elif text in "+-*/":
                self.emit("op", text)
            elif text == "^":
                self.emit("op", "**")
                self.arg(depth + 1, latex=True)
            else:
                raise _Fail
        else:
            raise _Fail


_ENDS = ("num", "name", ")")
_STARTS = ("num", "name", "func", "(")


def latex_to_expression(s: str) -> str | None:
    """A cleaned answer (see :func:`dsjax.rl.rewards_math.normalize_answer`) as a Python expression string, or None.

    ``\\frac{a}{b}`` -> ``((a)/(b))``, ``2\\sqrt{2}`` -> ``2*sqrt(2)``, ``x^{2}`` -> ``x**(2)``, ``x^23`` ->
    ``x**(2)*3``; implicit products get ``*``. The result still has to pass
    :func:`dsjax.rl._symbolic_worker.parse_checked`.
    """
    if len(s) > 512:
        return None
    conv = _Converter(s)
    try:
        conv.seq(None, 0)
    except (_Fail, RecursionError):
        return None
    parts: list[str] = []
    prev = None
    for kind, text in conv.out:
        if prev in _ENDS and kind in _STARTS:
            parts.append("*")
        parts.append(text)
        prev = kind
    return "".join(parts) or None
