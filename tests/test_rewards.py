"""Rule-based GRPO rewards: hand-checked cases, registry + batch scoring, and hostile completions (host only)."""

import ast
import builtins
import importlib.util
import math
import pathlib
import random
import threading
import time
import tokenize
from fractions import Fraction

import numpy as np
import pytest

from dsjax.rl import rewards_math, rewards_symbolic
from dsjax.rl.rewards import (REWARDS, Reward, RewardRegistry, accuracy_reward, countdown_reward, extract_answer,
                              format_reward, language_consistency_reward, make_accuracy_reward,
                              make_countdown_reward, make_rewards, normalize_answer, overlong_penalty,
                              overlong_reward, score_batch, warm_up_symbolic)
from dsjax.rl.rewards_countdown import parse_countdown_equation
from dsjax.rl.rewards_math import NotArithmetic, eval_arithmetic

HAS_SYMPY = importlib.util.find_spec("sympy") is not None
needs_sympy = pytest.mark.skipif(not HAS_SYMPY, reason="sympy not installed (symbolic stage skipped)")
CALL_LIMIT_S = 2.0          # CPU seconds of the calling thread: what a super-linear parse of a hostile text costs
WALL_LIMIT_S = 20.0         # wall clock: a hang (the symbolic workers' own time limits are ~1 s)
RL_DIR = pathlib.Path(rewards_math.__file__).parent


@pytest.fixture(scope="module", autouse=True)
def _symbolic_workers():
    warm_up_symbolic()  # worker start-up (~0.5 s) is outside the per-call limits
    yield


def timed(fn, completion, example, limit=CALL_LIMIT_S):
    """``fn(completion, example)``, asserting it took under ``limit`` CPU seconds of this thread and under
    ``WALL_LIMIT_S`` of wall clock. CPU time, not wall time: under ``pytest -n 2`` on 2 cores the other worker's XLA
    threads stretched a 0.16 s call to 2.66 s of wall clock (session 15's CI run)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    out = fn(completion, example)
    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
    name = getattr(fn, "__name__", fn)
    assert dc < limit, f"{name} used {dc:.2f} CPU s on a {len(completion)}-char completion"
    assert dt < WALL_LIMIT_S, f"{name} took {dt:.2f} s (wall) on a {len(completion)}-char completion"
    return out


def acc(completion, answer, **kw):
    return timed(make_accuracy_reward(**kw) if kw else accuracy_reward, completion, {"answer": answer})


# --------------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("completion,answer,expected", [
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{\frac12}", 0.5, 1.0),
    ("<answer>1,000</answer>", 1000, 1.0),
    ("<answer>1,000</answer>", "1{,}000", 1.0),
    (r"\boxed{3.0}", "3", 1.0),
    (r"\boxed{2.50}", "2.5", 1.0),
    (r"\boxed{50\%}", "0.5", 1.0),     # percent rule: 50% stands for 50 or 0.5
    (r"\boxed{50\%}", "50", 1.0),
    (r"\boxed{0.5}", "50%", 1.0),
    (r"\boxed{5}", "50%", 0.0),
    (r"\boxed{x = 4}", 4, 1.0),
    (r"\boxed{x=4}", "4", 1.0),
    (r"$\boxed{\$1,234.50}$", "1234.5", 1.0),
    (r"\boxed{+7}", "7", 1.0),
    (r"\boxed{1.5e-3}", "0.0015", 1.0),
    (r"\boxed{3\times 10^{5}}", "300000", 1.0),
    (r"\boxed{2^{10}}", "1024", 1.0),
    (r"\boxed{0.33333333}", r"\frac{1}{3}", 1.0),  # within 1e-6 relative
    (r"\boxed{0.3333}", "1/3", 0.0),
    (r"\boxed{-\frac{1}{2}}", "-0.5", 1.0),
    (r"\boxed{90^\circ}", "90", 1.0),
    (r"\boxed{\text{5 cm}}", "5", 1.0),
    ("<answer>The answer is 42.</answer>", "42", 1.0),
    ("<answer>4 or 5</answer>", "5", 0.0),
    (r"\boxed{3}", "4", 0.0),
    (r"\boxed{3} then \boxed{4}", "4", 1.0),        # the last box counts
    (r"\boxed{3} then \boxed{4}", "3", 0.0),
    (r"<think>t</think><answer>so \boxed{7}</answer>", "7", 1.0),
    (r"\boxed{6} <answer>7</answer>", "7", 1.0),
    (r"\boxed{7} \boxed{8", "7", 1.0),              # an unterminated box is skipped
    (r"\boxed{\{1,2\}}", r"\{1,2\}", 1.0),          # escaped braces, exact match only
    (r"\fbox{12}", "12", 1.0),
    ("no answer here: 5", "5", 0.0),
    (r"\boxed{}", "", None),
    (r"\boxed{}", "5", 0.0),
    (r"\boxed{1/10}", 0.1, 1.0),
    (r"\boxed{72}", "Natalia sold 48/2 = 24 clips.\n#### 72", 1.0),   # GSM8K reference
    (r"\boxed{72}", np.int64(72), 1.0),
    (r"\boxed{\frac{1}{2}}", r"The answer is $\boxed{0.5}$", 1.0),     # boxed reference is unboxed
    (r"\boxed{(1,2)}", "(1, 2)", 1.0),
    (r"\boxed{1/0}", "1", 0.0),
    (r"\boxed{1234568}", "1234567", 0.0),          # exact values must be equal: no tolerance
    (r"\boxed{1234567.0}", "1234567", 1.0),
    (r"\boxed{1.5e3}", "1500", 1.0),
    (r"\boxed{1234567.0}", "1234568", 0.0),
    ("\\boxed{5\u00b2}", "25", 1.0),                 # superscript: 5^2, not 52
    ("\\boxed{5\u00b2}", "52", 0.0),
    ("\\boxed{\u00bd}", "0.5", 1.0),                  # NFKC: 1/2
    ("\\boxed{3\u00d74}", "12", 1.0),                 # multiplication sign
])
def test_accuracy_hand_checked(completion, answer, expected):
    assert acc(completion, answer) == expected


def _random_latex(rng, depth):
    """(LaTeX, exact value) of a random arithmetic expression."""
    if depth == 0 or rng.random() < 0.3:
        n = rng.randint(1, 20)
        return str(n), Fraction(n), "atom"
    a, av, ak = _random_latex(rng, depth - 1)
    b, bv, bk = _random_latex(rng, depth - 1)
    op = rng.choice("+-*/^")
    if op == "+":
        return f"{a} + {b}", av + bv, "sum"
    if op == "-":
        return f"{a} - \\left({b}\\right)" if bk == "sum" else f"{a} - {b}", av - bv, "sum"
    if op == "*":
        a, b = (f"({a})" if ak == "sum" else a), (f"({b})" if bk == "sum" else b)
        return f"{a} \\cdot {b}", av * bv, "prod"
    if op == "^":
        e = rng.randint(0, 3)
        return f"{{({a})}}^{{{e}}}" if ak != "atom" else f"{a}^{{{e}}}", av ** e, "pow"
    if bv == 0:
        return a, av, ak
    return f"\\frac{{{a}}}{{{b}}}", av / bv, "atom"


def test_accuracy_random_arithmetic():
    rng = random.Random(0)
    for _ in range(300):
        latex, value, _ = _random_latex(rng, 4)
        completion = f"\\boxed{{{latex}}}"
        assert accuracy_reward(completion, {"answer": f"{value.numerator}/{value.denominator}"}) == 1.0, latex
        assert accuracy_reward(completion, {"answer": repr(float(value))}) == 1.0, latex
        assert accuracy_reward(completion, {"answer": str(value + 1)}) == 0.0, latex


def test_accuracy_not_applicable_without_answer():
    assert accuracy_reward(r"\boxed{1}", {}) is None
    assert accuracy_reward(r"\boxed{1}", {"answer": None}) is None
    assert accuracy_reward(r"\boxed{1}", {"answer": "  "}) is None


@needs_sympy
@pytest.mark.parametrize("completion,answer,expected", [
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{2*sqrt(2)}", "sqrt(8)", 1.0),
    ("\\boxed{2\u221a2}", "sqrt(8)", 1.0),            # 2√2
    ("\\boxed{2\u03c0}", r"2\pi", 1.0),
    (r"\boxed{\sqrt[3]{8}}", "2", 1.0),
    (r"\boxed{\frac{1}{\sqrt{4}}}", "0.5", 1.0),
    (r"\boxed{\frac{\pi}{2}}", "pi/2", 1.0),
    (r"\boxed{\sqrt{2}}", "1.4142135623730951", 1.0),   # closed form vs decimal, 1e-6 relative
    (r"\boxed{\sqrt{2}}", "1.41", 0.0),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    (r"\boxed{y = 2x + 1}", "1 + 2x", 1.0),
    (r"\boxed{4x}", "4", 0.0),
    (r"\boxed{e^{2}}", r"\exp(2)", 1.0),
    (r"\boxed{\sqrt{2}\cdot 10^{7}}", "14142136", 0.0),           # both exact: not equal
    (r"\boxed{\sqrt{2}\cdot 10^{7}}", "14142135.6237", 1.0),      # a decimal side: 1e-6 relative
])
def test_accuracy_symbolic(completion, answer, expected):
    assert acc(completion, answer) == expected


@needs_sympy
def test_symbolic_stage_is_killed_at_its_timeout():
    pool = rewards_symbolic._POOL
    kills = pool.kills
    fn = make_accuracy_reward(symbolic_timeout_s=0.3)
    # equal, so the numeric screen passes, and simplify would need well over 10 s: the worker is killed
    t0 = time.perf_counter()
    assert fn(r"\boxed{(x+1)^{400}(x-1)^{400}}", {"answer": "(x^2-1)^{400}"}) == 0.0
    assert time.perf_counter() - t0 < 1.0
    assert pool.kills == kills + 1
    # a wrong answer stops at the numeric screen, without simplify; the pool has recovered
    t0 = time.perf_counter()
    assert fn(r"\boxed{(x+1)^{1000}}", {"answer": "(x+2)^{1000}"}) == 0.0
    assert time.perf_counter() - t0 < 1.0 and pool.kills == kills + 1
    assert timed(fn, r"\boxed{\sqrt{8}}", {"answer": r"2\sqrt{2}"}) == 1.0


def test_without_sympy_the_symbolic_stage_is_skipped(monkeypatch):
    monkeypatch.setattr(rewards_symbolic, "symbolic_available", lambda: False)
    assert acc(r"\boxed{\sqrt{8}}", r"2\sqrt{2}") == 0.0
    assert acc(r"\boxed{\frac{1}{2}}", "0.5") == 1.0
    assert acc(r"\boxed{2\sqrt{2}}", r"2\sqrt{2}") == 1.0   # exact string still matches


def test_extract_and_normalize():
    assert extract_answer(r"a \boxed{\frac{1}{\sqrt{2}}} b") == r"\frac{1}{\sqrt{2}}"
    assert extract_answer("<answer> 5 </answer> and <answer>6") == " 5 "
    assert extract_answer(r"\boxed{") is None
    assert extract_answer("nothing") is None
    assert normalize_answer(r" $\$1,234.00$ ") == "1234"
    assert normalize_answer(r"\left( \dfrac{1}{2} \right)") == r"(\frac{1}{2})"
    assert normalize_answer("x = 3.") == "3"
    assert normalize_answer("(1,234)") == "(1,234)"   # not a thousands separator
    assert normalize_answer("\uff11\uff12\uff13") == "123"   # fullwidth
    assert normalize_answer("\u0661\u0662\u0663") == "123"   # Arabic-Indic
    assert normalize_answer("\u200f\u2212\u200b5") == "-5"   # RTL mark, U+2212 minus, zero-width space


def test_safe_arithmetic():
    assert eval_arithmetic("2**(10)") == 1024
    assert eval_arithmetic("((1)/(3))+1.5e-3") == pytest.approx(1 / 3 + 0.0015)
    for bad in ("9**9**9", "10**10**10", "1/0", "1e401", "2**(5000)", "__import__('os')", "(1).real", "[1]",
                "1 if 1 else 2", "x.y", "'a'", "f(1)", "9" * 600, "(" * 300 + "1" + ")" * 300,
                "(" * 250 + "1" + ")" * 250, "-" * 500 + "1", "2**(" + "-" * 500 + "1)", "1" + "+1" * 255):
        assert eval_arithmetic(bad) is None, bad
    with pytest.raises(NotArithmetic):
        eval_arithmetic("x+1")


# ------------------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize("completion,example,expected", [
    ("<think>r</think><answer>5</answer>", {}, 1.0),
    ("  <think>\nr\n</think>\n\n<answer>\n5\n</answer>\n", {}, 1.0),
    ("<think></think><answer></answer>", {}, 1.0),
    ("r</think> <answer>5</answer>", {"prefix_think": True}, 1.0),     # the prompt ended in <think>
    ("<think>r</think><answer>5</answer>", {"prefix_think": True}, 0.0),
    ("r</think><answer>5</answer>", {}, 0.0),
    ("<think>a</think><think>b</think><answer>5</answer>", {}, 0.0),    # duplicate tag
    ("<think>r</think><answer>5</answer><answer>6</answer>", {}, 0.0),
    ("<answer>5</answer><think>r</think>", {}, 0.0),                    # wrong order
    ("<think>r</think> so <answer>5</answer>", {}, 0.0),                # text between
    ("<think>r</think><answer>5</answer> done", {}, 0.0),               # text after
    ("hi <think>r</think><answer>5</answer>", {}, 0.0),                 # text before
    ("<think>r<answer>5</answer></think>", {}, 0.0),                    # nested
    ("<think>r</think>", {}, 0.0),
    ("", {}, 0.0),
])
def test_format(completion, example, expected):
    assert timed(format_reward, completion, example) == expected


# ------------------------------------------------------------------------------------------ language consistency
@pytest.mark.parametrize("completion,language,expected", [
    ("<think>We add the numbers.</think><answer>5</answer>", "en", 1.0),
    ("<think>我们计算 the sum</think><answer>5</answer>", "zh", 4 / 10),   # 4 Han, 6 Latin letters
    ("<think>我们计算 the sum</think><answer>5</answer>", "en", 6 / 10),
    ("<think>我们计算 the sum</think>", "zh-CN", 4 / 10),
    ("<think>设 x 为 $x^2+y^2=1$ 的解 \\frac{1}{2}</think>", "zh", 1.0),  # variables, math, commands ignored
    ("<think>これは漢字とカタカナです</think>", "ja", 1.0),
    ("<think>Это тест</think>", "ru", 1.0),
    ("<think>Это тест</think>", "en", 0.0),
    ("We add the numbers, no tags.", "en", 1.0),        # whole completion without <think>
    ("<think></think><answer>5</answer>", "en", 0.0),   # empty reasoning
    ("<think>1 + 2 = 3 !!!</think>", "en", 0.0),         # no letters
    ("<think>Half English 中文中文中文中文中文中文中文中</think>", "en", 11 / 26),
])
def test_language_consistency(completion, language, expected):
    assert timed(language_consistency_reward, completion, {"language": language}) == pytest.approx(expected)


def test_language_consistency_defaults_and_errors():
    assert language_consistency_reward("thinking </think><answer>1</answer>", {"prefix_think": True}) == 1.0
    assert language_consistency_reward("<think>abc</think>", {"language": "LATIN"}) == 1.0
    with pytest.raises(ValueError, match="language"):
        language_consistency_reward("<think>abc</think>", {"language": "klingon"})


# ---------------------------------------------------------------------------------------------------- overlong
def test_overlong_ramp():
    fn = overlong_penalty(max_tokens=100, buffer=20)
    got = [fn("", {"num_tokens": n}) for n in (0, 80, 85, 90, 99, 100, 101, 10**9)]
    assert got == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.95, -1.0, -1.0, -1.0])
    assert fn("", {}) is None
    assert fn("", {"num_tokens": 90, "max_tokens": 10**6}) == -0.5   # the factory's limits win
    assert overlong_penalty(100, 0)("", {"num_tokens": 100}) == 0.0
    assert overlong_penalty(100, 0)("", {"num_tokens": 101}) == -1.0
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(100, 200)


def test_overlong_builtin_reads_example():
    assert overlong_reward("", {"num_tokens": 18432}) == pytest.approx(-0.5)   # DAPO 20480 / 4096 defaults
    assert overlong_reward("", {"num_tokens": 16384}) == 0.0
    assert overlong_reward("", {"num_tokens": 15, "max_tokens": 20, "overlong_buffer": 10}) == -0.5
    assert overlong_reward("", {"num_tokens": np.int32(25), "max_tokens": 20, "overlong_buffer": 10}) == -1.0
    assert overlong_reward("", {}) is None


# --------------------------------------------------------------------------------------------------- countdown
CD = {"numbers": [1, 3, 4, 6], "target": 24}


@pytest.mark.parametrize("completion,expected", [
    ("<think>..</think><answer>6 / (1 - 3 / 4)</answer>", 1.0),   # needs exact fractions
    ("<answer>6/(1-3/4)</answer>", 1.0),
    ("<answer>\uff16 / (1 \u2212 3 / 4)</answer>", 1.0),           # fullwidth 6, U+2212 minus
    ("<answer>6 * 3 + 4 + 1</answer>", 0.1),                      # right numbers, 23: wrong value
    ("<answer>(6 - 3 + 1) * 4</answer>", 0.1),                    # 16
    ("<answer>(6 - 3 + 1) * 4 + 0 * 0</answer>", 0.1),            # extra numbers
    ("<answer>6 * 4 * 1 * 1</answer>", 0.1),                      # 1 reused, 3 unused
    ("<answer>-(1 - 4 - 3) * 6 / 1</answer>", 0.1),               # 1 reused
    ("<answer>6 * 4</answer>", 0.1),                              # numbers missing
    ("<answer>6 * 4 * 1 ** 3</answer>", 0.1),                     # ** is forbidden (eval would give 24)
    ("<answer>6 / (1 - 3 / 4.0)</answer>", 0.1),                  # decimals are not integers
    ("<answer>6 / (4 - 3 - 1)</answer>", 0.1),                    # division by zero
    ("<answer>(6 * 4) * (3 - 1) = 48</answer>", 0.1),             # '=' is not allowed (as in TinyZero)
    ("<answer>6 \u00d7 4 \u00d7 (3 - 1)</answer>", 0.1),          # unparsable: still the format score
    ("<answer>I do not know</answer>", 0.1),
    ("<answer></answer>", 0.1),
    ("<answer>6*4</answer> then <answer>6/(1-3/4)</answer>", 1.0),   # the last tag counts
    ("<answer>6/(1-3/4)</answer> then <answer>6*4</answer>", 0.1),
    ("<answer>6 / (1 - 3 / 4)", 0.0),                             # no closing tag
    ("6 / (1 - 3 / 4)", 0.0),                                     # no answer tag
])
def test_countdown(completion, expected):
    assert timed(countdown_reward, completion, CD) == expected


def test_countdown_more():
    ex = {"numbers": [2, 3, 4], "target": 24}
    assert countdown_reward("<answer>2 * 3 * 4</answer>", ex) == 1.0
    assert countdown_reward("<answer>(2 + 3 + 4) * 1</answer>", ex) == 0.1
    assert countdown_reward("<answer>4 * 3 * 2 * 1</answer>", ex) == 0.1      # extra number
    assert countdown_reward("<answer>4 * 3 * 2 + 0</answer>", ex) == 0.1
    assert countdown_reward("<answer>4 * 4 + 2 * 3 + 2</answer>", ex) == 0.1  # reused numbers
    assert countdown_reward("<answer>2 ** 3 * 3</answer>", ex) == 0.1         # ** forbidden
    assert countdown_reward("<answer>-(-2) * 3 * 4</answer>", ex) == 1.0      # unary minus allowed (TinyZero)
    assert countdown_reward("<answer>2*3*4</answer>", {"numbers": np.array([4, 3, 2]), "target": np.int64(24)}) == 1
    assert countdown_reward("<answer>2*3*4</answer>", {"target": 24}) is None
    assert parse_countdown_equation("7 // 2") == ([], None)
    assert parse_countdown_equation("2 ** 3") == ([], None)
    assert parse_countdown_equation("7 % 2") is None
    assert parse_countdown_equation("(1 + 2) * 3") == ([1, 2, 3], 9)
    strict = make_countdown_reward(require_parsable=True)
    assert strict("<answer>I do not know</answer>", ex) == 0.0
    assert strict("<answer>2 ** 3 * 3</answer>", ex) == 0.1
    assert make_countdown_reward(format_score=0.0, score=2.0)("<answer>2*3*4</answer>", ex) == 2.0


# ------------------------------------------------------------------------------------------ registry and batch
def test_registry_and_make_rewards():
    assert REWARDS.names() == ["accuracy", "format", "language_consistency", "overlong", "countdown"]
    assert REWARDS.get("format").fn is format_reward
    with pytest.raises(KeyError, match="nope"):
        REWARDS.get("nope")
    reg = RewardRegistry()
    reg.register("len", lambda c, e: len(c), weight=0.5)

    @reg.register("one", weight=2)
    def one(c, e):
        return 1.0

    assert reg.names() == ["len", "one"] and reg.get("one").fn is one and reg.get("one").weight == 2.0
    with pytest.raises(ValueError, match="already registered"):
        reg.register("one", one)
    reg.register("one", one, 3.0, overwrite=True)
    rs = make_rewards(["len", ("one", 0.25), Reward("mine", one, 4.0)], registry=reg)
    assert [(r.name, r.weight) for r in rs] == [("len", 0.5), ("one", 0.25), ("mine", 4.0)]
    assert [(r.name, r.weight) for r in make_rewards(["accuracy", ("format", 0.5)])] == [
        ("accuracy", 1.0), ("format", 0.5)]
    with pytest.raises(ValueError, match="repeat"):
        make_rewards(["format", ("format", 0.5)])
    with pytest.raises(ValueError, match="total"):
        Reward("total", one)
    with pytest.raises(ValueError, match="weight"):
        Reward("w", one, float("nan"))


def test_score_batch_weights_none_and_errors():
    def maybe(c, e):
        return None if e.get("skip") else 1.0

    def boom(c, e):
        if c == "bad":
            raise RuntimeError("boom")
        return 0.5

    rewards = [Reward("maybe", maybe, 2.0), Reward("boom", boom, -1.0), Reward("nan", lambda c, e: math.nan),
               Reward("str", lambda c, e: "1", 0.5), Reward("np", lambda c, e: np.float32(0.25), 4.0)]
    out = score_batch(rewards, ["ok", "bad", "ok"], [{}, {}, {"skip": True}])
    assert set(out) == {"total", "maybe", "boom", "nan", "str", "np", "errors"}
    np.testing.assert_array_equal(out["str"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out["np"], [0.25, 0.25, 0.25])
    np.testing.assert_array_equal(out["maybe"], np.array([1.0, 1.0, np.nan], np.float32))
    np.testing.assert_array_equal(out["boom"], [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(out["nan"], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(out["total"], np.array([2 - 0.5, 2 - 0.0, 0 - 0.5]) + 1.0)
    assert out["total"].dtype == np.float32 and out["maybe"].dtype == np.float32
    assert out["errors"] == {"maybe": 0, "boom": 1, "nan": 3, "str": 3, "np": 0}
    with pytest.raises(ValueError, match="examples"):
        score_batch(rewards, ["a"], [])
    empty = score_batch(rewards, [], [])
    assert empty["total"].shape == (0,) and empty["errors"]["boom"] == 0


def test_score_batch_builtins():
    comps = ["<think>add</think><answer>5</answer>", "<think>guess</think><answer>6</answer>", "\\boxed{5}"]
    exs = [{"answer": "5", "num_tokens": 10}] * 2 + [{"num_tokens": 10}]
    out = score_batch(make_rewards(["accuracy", ("format", 0.5), "overlong"]), comps, exs)
    np.testing.assert_array_equal(out["accuracy"], [1.0, 0.0, np.nan])
    np.testing.assert_array_equal(out["format"], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(out["total"], [1.5, 0.5, 0.0])
    assert out["errors"] == {"accuracy": 0, "format": 0, "overlong": 0}


def test_score_batch_timeouts_never_hang():
    stop = threading.Event()

    def slow(c, e):
        stop.wait(60)
        return 1.0

    def spin(c, e):  # a pure-Python loop that would never end (the GIL is released between bytecodes)
        while not stop.is_set():
            pass
        return 1.0

    t0 = time.perf_counter()
    try:
        out = score_batch([Reward("slow", slow), Reward("spin", spin), Reward("fast", lambda c, e: 1.0)],
                          ["a"] * 4, [{}] * 4, max_workers=4, timeout_s=0.2)
        assert time.perf_counter() - t0 < 3.0
    finally:
        stop.set()  # release the abandoned threads
    np.testing.assert_array_equal(out["slow"], [0, 0, 0, 0])
    np.testing.assert_array_equal(out["fast"], [1, 1, 1, 1])
    assert out["errors"] == {"slow": 4, "spin": 4, "fast": 0}


# --------------------------------------------------------------------------------------------------- hostile
def _hostile(tmp_marker):
    payload = f"__import__('os').system('touch {tmp_marker}')"
    nest = 100_000
    return {
        "million_chars": "a" * 1_000_000,
        "million_chars_tags": "<think>" + "x " * 500_000 + "</think><answer>" + "9" * 1000 + "</answer>",
        "nested_parens": "<answer>" + "(" * nest + "1" + ")" * nest + "</answer>",
        "nested_braces": "\\boxed{" + "{" * nest + "1" + "}" * nest + "}",
        "nested_boxes": "\\boxed{" * nest + "1" + "}" * nest,
        "unclosed_boxes": "\\boxed{" * nest,
        "unclosed_dollars": "<think>" + "$\\(" * 200_000 + "</think>",
        "pow_tower_9": "\\boxed{9**9**9}",
        "pow_tower_10": "<answer>10**10**10</answer>",
        "pow_tower_latex": "\\boxed{9^{9^{9}}}",
        "pow_product_exponent": "\\boxed{9**(99999*99999)}",
        "big_int_5000_digits": "\\boxed{1" + "0" * 5000 + "}",
        "big_int_answer_100k": "<answer>" + "7" * 100_000 + "</answer>",
        "huge_sci": "\\boxed{1e999999999}",
        "fullwidth": "\\boxed{\uff11\uff12\uff13}",
        "arabic_indic": "<answer>\u0661\u0662\u0663</answer>",
        "zero_width_rtl": "\\boxed{\u200f1\u200b2\u200d3\u202e}",
        "homoglyph_minus": "\\boxed{\u2212123}",
        "unterminated_boxed": "The answer is \\boxed{123",
        "code_boxed": "\\boxed{" + payload + "}",
        "code_answer": "<think>x</think><answer>" + payload + "</answer>",
        "code_latex": "\\boxed{\\" + payload + "}",
        "null_bytes": "<think>\x00\x00</think><answer>12\x003</answer>\\boxed{\x00}",
        "long_number_answer": "<answer>" + "1" * 200_000 + "</answer>",
        "many_tags": "<answer></answer>" * 50_000 + "<think>" * 50_000,
        "backslashes": "\\" * 1_000_000 + "{" * 1000,
    }


HOSTILE_EXAMPLE = {"answer": "123", "numbers": [1, 2, 3], "target": 6, "num_tokens": 10**6, "language": "en"}
HOSTILE_KEYS = list(_hostile("/x"))
BUILTINS = [REWARDS.get(n) for n in REWARDS.names()]


@pytest.fixture
def no_code_execution(monkeypatch):
    """eval/exec raise and compile only parses (ast.parse) while the rewards run."""
    real_compile = builtins.compile

    def forbidden(*a, **k):
        raise AssertionError("model output reached eval/exec")

    def parse_only(source, filename, mode, flags=0, *a, **k):
        if not flags & ast.PyCF_ONLY_AST:
            raise AssertionError("compile() to bytecode called")
        return real_compile(source, filename, mode, flags, *a, **k)

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", parse_only)


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_hostile_completions(key, tmp_path, no_code_execution):
    marker = tmp_path / "pwned"
    text = _hostile(marker)[key]
    scores = {r.name: timed(r.fn, text, HOSTILE_EXAMPLE) for r in BUILTINS}
    for name, s in scores.items():
        assert s is None or (isinstance(s, float) and math.isfinite(s)), (name, s)
    assert not marker.exists()
    expected_acc = 1.0 if key in ("fullwidth", "arabic_indic", "zero_width_rtl") else 0.0
    assert scores["accuracy"] == expected_acc
    assert scores["format"] in (0.0, 1.0) and scores["overlong"] == -1.0
    assert scores["countdown"] in (0.0, 0.1)


def test_hostile_batch_and_values(tmp_path, no_code_execution):
    marker = tmp_path / "pwned"
    texts = list(_hostile(marker).values())
    t0 = time.perf_counter()
    out = score_batch(BUILTINS, texts, [HOSTILE_EXAMPLE] * len(texts), timeout_s=5.0)
    assert time.perf_counter() - t0 < 20.0
    assert all(v == 0 for v in out["errors"].values()), out["errors"]
    assert np.isfinite(out["total"]).all() and not marker.exists()
    assert timed(accuracy_reward, "\\boxed{\u2212123}", {"answer": "-123"}) == 1.0
    assert timed(countdown_reward, "<answer>" + "1+" * 100 + "1</answer>", {"numbers": [1], "target": 1}) == 0.1
    big = "1" + "0" * 4000
    assert timed(accuracy_reward, "\\boxed{" + big + "}", {"answer": big}) == 1.0   # exact match still works
    assert timed(accuracy_reward, "\\boxed{10^{4000}}", {"answer": big}) == 0.0    # exponent > 1000: rejected
    assert timed(accuracy_reward, "\\boxed{2^{1000}}", {"answer": str(2**1000)}) == 1.0
    assert timed(accuracy_reward, "\\boxed{9**(99999*99999)}", {"answer": "1"}) == 0.0   # never reaches SymPy


def test_rewards_source_never_executes_or_imports_the_model():
    files = sorted(RL_DIR.glob("rewards*.py")) + [RL_DIR / "_symbolic_worker.py"]
    assert len(files) >= 4
    for path in files:
        with path.open("rb") as f:
            toks = [t for t in tokenize.tokenize(f.readline) if t.type == tokenize.NAME]
        for k, t in enumerate(toks):
            assert t.string not in {"eval", "exec", "sympify", "parse_expr", "__import__", "pickle"}, (path, t)
            if t.string == "compile":
                assert toks[k - 1].string == "re", (path, t.start)
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        for mod in imported:
            assert not mod.startswith(("jax", "flax", "dsjax.model", "dsjax.train", "torch")), (path, mod)
        top_level = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        assert "sympy" not in top_level, path   # optional: imported only inside the worker process
