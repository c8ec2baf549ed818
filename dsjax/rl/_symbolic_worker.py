"""Expression whitelist shared by the reward checkers, and the SymPy worker process.

Imported as a module (by :mod:`dsjax.rl.rewards_math`), it only provides :func:`parse_checked`, which turns an
already-converted expression string (Python syntax: numbers, single-letter symbols, ``pi``, ``+ - * / **``,
parentheses and a few one-argument functions) into a validated :mod:`ast` tree. ``ast.parse`` only parses; nothing
is compiled or executed.

Run as a script (``python -P _symbolic_worker.py``; see :mod:`dsjax.rl.rewards_symbolic`) it is the SymPy worker:
it reads one JSON request per line on stdin (``{"a": expr, "b": expr, "rel_tol": 1e-6}``), re-validates both
expressions with the same whitelist, builds SymPy objects by walking the trees (never ``sympify``/``parse_expr``),
and answers one line ``{"equal": true|false}``. The parent kills it when an answer is late. It is run by path, so it
imports nothing from ``dsjax`` (whose ``__init__`` loads JAX).
"""

from __future__ import annotations

import ast
import re

MAX_EXPR_CHARS = 512
MAX_NODES = 256
MAX_DEPTH = 64
MAX_LITERAL_CHARS = 400
MAX_SCI_EXPONENT = 400
MAX_CONST_EXPONENT = 1000  # |n| in x ** n when n is a literal (symbolic stage)

FUNCTIONS = frozenset({"sqrt", "sin", "cos", "tan", "ln", "log", "exp"})
GREEK = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda_", "mu", "sigma", "phi", "omega",
                   "tau", "rho", "eta", "xi", "zeta", "kappa", "nu", "chi", "psi"})
CONSTANTS = frozenset({"pi"})
_SCI = re.compile(r"[eE]([+-]?\d+)$")


class Rejected(ValueError):
    """The expression is outside the whitelist (too long, too deep, a forbidden node or a tower of powers)."""


def _literal_text(src: str, node: ast.Constant) -> str:
    text = ast.get_source_segment(src, node)
    if text is None:
        raise Rejected("literal without source")
    return text


def parse_checked(src: str) -> ast.Expression:
    """``ast.parse(src, mode="eval")`` plus the whitelist; raises :class:`Rejected` for anything else."""
    if not isinstance(src, str) or not src or len(src) > MAX_EXPR_CHARS or not src.isascii():
        raise Rejected("empty, too long or non-ASCII")
    try:
        tree = ast.parse(src, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as e:
        raise Rejected(f"unparsable: {type(e).__name__}") from None
    # iterative walk: (node, depth, inside_exponent)
    stack = [(tree.body, 1, False)]
    count = 0
    while stack:
        node, depth, in_exp = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            raise Rejected("too many nodes or too deep")
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
                raise Rejected(f"operator {type(node.op).__name__}")
            if isinstance(node.op, ast.Pow):
                if in_exp:
                    raise Rejected("power inside an exponent")
                n = _arith_bound(node.right)
                if n is not None and not abs(n) <= MAX_CONST_EXPONENT:  # also catches inf/nan
                    raise Rejected("exponent too large")
                stack.append((node.left, depth + 1, in_exp))
                stack.append((node.right, depth + 1, True))
            else:
                stack.append((node.left, depth + 1, in_exp))
                stack.append((node.right, depth + 1, in_exp))
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.UAdd, ast.USub)):
                raise Rejected(f"operator {type(node.op).__name__}")
            stack.append((node.operand, depth + 1, in_exp))
        elif isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):
                raise Rejected("non-numeric constant")
            text = _literal_text(src, node)
            if len(text) > MAX_LITERAL_CHARS:
                raise Rejected("literal too long")
            m = _SCI.search(text)
            if m and abs(int(m.group(1))) > MAX_SCI_EXPONENT:
                raise Rejected("scientific exponent too large")
        elif isinstance(node, ast.Name):
            name = node.id
            if not (name in CONSTANTS or name in GREEK or (len(name) == 1 and name.isascii() and name.isalpha())):
                raise Rejected(f"name {name!r}")
        elif isinstance(node, ast.Call):
            if (not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or len(node.args) != 1
                    or node.keywords or isinstance(node.args[0], ast.Starred)):
                raise Rejected("call")
            stack.append((node.args[0], depth + 1, in_exp))
        else:
            raise Rejected(f"node {type(node).__name__}")
    return tree


def _arith_bound(node: ast.AST, depth: int = 0) -> float | None:
    """Float value of a symbol-free exponent (no powers inside, so it cannot blow up), else None; inf if too deep."""
    if depth > MAX_DEPTH:
        return float("inf")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value) if abs(node.value) < 1e300 else float("inf")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _arith_bound(node.operand, depth + 1)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _arith_bound(node.left, depth + 1), _arith_bound(node.right, depth + 1)
        if a is None or b is None:
            return None
        try:
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            return a / b
        except (ZeroDivisionError, OverflowError):
            return float("inf")
    return None


def has_symbols(tree: ast.Expression) -> bool:
    """Whether the (validated) tree has names or calls, i.e. is more than plain arithmetic."""
    return any(isinstance(n, (ast.Name, ast.Call)) for n in ast.walk(tree))


# ----------------------------------------------------------------------------------------------- worker process
def _to_sympy(sp, src: str, node: ast.AST, symbols: dict):
    from fractions import Fraction

    if isinstance(node, ast.Expression):
        return _to_sympy(sp, src, node.body, symbols)
    if isinstance(node, ast.Constant):
        if type(node.value) is int:
            return sp.Integer(node.value)
        f = Fraction(_literal_text(src, node))
        return sp.Rational(f.numerator, f.denominator)
    if isinstance(node, ast.Name):
        if node.id == "pi":
            return sp.pi
        if node.id == "e":
            return sp.E
        return symbols.setdefault(node.id, sp.Symbol(node.id))
    if isinstance(node, ast.UnaryOp):
        v = _to_sympy(sp, src, node.operand, symbols)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _to_sympy(sp, src, node.left, symbols), _to_sympy(sp, src, node.right, symbols)
        op = type(node.op)
        if op is ast.Add:
            return a + b
        if op is ast.Sub:
            return a - b
        if op is ast.Mult:
            return a * b
        if op is ast.Div:
            return a / b
        return a ** b
    if isinstance(node, ast.Call):
        fn = {"sqrt": sp.sqrt, "sin": sp.sin, "cos": sp.cos, "tan": sp.tan, "ln": sp.log, "log": sp.log,
              "exp": sp.exp}[node.func.id]
        return fn(_to_sympy(sp, src, node.args[0], symbols))
    raise Rejected(type(node).__name__)


_POINTS = ((5377, 10000), (12913, 10000), (-7182, 10000), (24451, 10000))


def symbolic_equal(sp, a_src: str, b_src: str, rel_tol: float) -> bool:
    """Equal by a numeric screen (50 digits, at 3 points for the free symbols), then ``simplify(a - b) == 0``.

    Closed forms are decided by the numeric check at ``rel_tol``; a mismatch at any point means "not equal" without
    running ``simplify`` (most wrong answers stop here, cheaply).
    """
    symbols: dict = {}
    a = _to_sympy(sp, a_src, parse_checked(a_src), symbols)
    b = _to_sympy(sp, b_src, parse_checked(b_src), symbols)
    if a.has(sp.zoo, sp.nan, sp.oo, -sp.oo) or b.has(sp.zoo, sp.nan, sp.oo, -sp.oo):
        return False
    free = sorted(a.free_symbols | b.free_symbols, key=str)
    checked = 0
    for k in range(3):
        subs = {s: sp.Rational(*_POINTS[(k + j) % len(_POINTS)]) for j, s in enumerate(free)}
        av, bv = sp.N(a.subs(subs), 50), sp.N(b.subs(subs), 50)
        if not (av.is_number and bv.is_number) or any(v.has(sp.zoo, sp.nan, sp.oo, -sp.oo) for v in (av, bv)):
            continue  # a pole or a branch point: try the next point
        if abs(av - bv) > rel_tol * max(abs(av), abs(bv)) + sp.Float(1e-40):
            return False
        checked += 1
        if not free:
            return True
    return bool(sp.simplify(a - b) == 0)


def _main() -> None:
    import json
    import os
    import sys

    try:
        import resource

        limit = 2 << 30  # 2 GiB of address space: a runaway simplify dies instead of swapping
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    parent = os.getppid()

    def orphan_watch():  # a worker stuck in simplify must not outlive its parent
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    import threading

    threading.Thread(target=orphan_watch, daemon=True).start()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # nothing SymPy prints can corrupt the protocol
    try:
        import sympy as sp
    except ImportError:
        out.write("nosympy\n")
        return
    out.write("ready\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            equal = symbolic_equal(sp, req["a"], req["b"], float(req.get("rel_tol", 1e-6)))
            out.write(json.dumps({"equal": bool(equal)}) + "\n")
        except Exception as e:  # noqa: BLE001 -- any failure is "not shown equal"
            out.write(json.dumps({"equal": False, "error": type(e).__name__}) + "\n")


if __name__ == "__main__":
    _main()
