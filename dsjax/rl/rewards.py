"""Rule-based rewards for GRPO: a weighted registry, host-side batch scoring, and the built-in rewards.

A reward function is ``fn(completion_text, example) -> float | None``; None means "not applicable": it is left out
of that reward's mean (NaN in its column) and counts as 0 in the weighted total. Rewards score text only; they never
import the model and never execute model output (no ``eval``/``exec``, no ``compile`` to bytecode, no ``sympify``;
see :mod:`dsjax.rl.rewards_math`).

Built-ins (:data:`REWARDS`, weight 1.0 each):

* ``accuracy`` -- :mod:`dsjax.rl.rewards_math`: last ``\\boxed{}``/``<answer>`` vs ``example["answer"]``; 1/0.
* ``format`` -- :func:`format_reward`: ``<think>..</think>`` then ``<answer>..</answer>``; 1/0.
* ``language_consistency`` -- :func:`language_consistency_reward`: share of reasoning letters in the target script.
* ``overlong`` -- :func:`overlong_reward`: DAPO soft overlong penalty in tokens, 0 .. -1.
* ``countdown`` -- :mod:`dsjax.rl.rewards_countdown`: TinyZero's 0 / 0.1 / 1.

Scoring a batch (:func:`score_batch`) runs every (reward, completion) pair in a thread pool on the host. A call that
raises, returns something that is not a finite number, or runs past ``timeout_s`` scores 0.0 and is counted in
``errors``; the caller never waits much longer than ``timeout_s`` past the start of the last task, even if a
function never returns (its thread is a daemon and is abandoned). A thread cannot be interrupted while a C call
holds the GIL (a catastrophic regex, a giant ``int ** int``): reward functions must bound their own work, as the
built-ins do (linear time in the completion; the SymPy stage runs in killable processes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
import threading
import time
import unicodedata
from collections import Counter
from typing import Callable, Iterable, Sequence

import numpy as np

from dsjax.rl.rewards_countdown import countdown_reward, make_countdown_reward
from dsjax.rl.rewards_math import (accuracy_reward, answers_match, extract_answer, make_accuracy_reward,
                                   normalize_answer)
from dsjax.rl.rewards_symbolic import shutdown_symbolic, symbolic_available, warm_up_symbolic

__all__ = [
    "RewardFn", "Reward", "RewardRegistry", "REWARDS", "make_rewards", "score_batch", "accuracy_reward",
    "make_accuracy_reward", "format_reward", "language_consistency_reward", "overlong_reward", "overlong_penalty",
    "countdown_reward", "make_countdown_reward", "extract_answer", "normalize_answer", "answers_match",
    "warm_up_symbolic", "shutdown_symbolic", "symbolic_available", "LANGUAGE_SCRIPTS",
    "DEFAULT_MAX_TOKENS", "DEFAULT_OVERLONG_BUFFER",
]

log = logging.getLogger(__name__)

RewardFn = Callable[[str, dict], "float | None"]
_RESERVED = ("total", "errors")


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name in _RESERVED:
            raise ValueError(f"Reward.name={self.name!r}: use a non-empty string other than {_RESERVED}")
        if not callable(self.fn):
            raise ValueError(f"Reward.fn for {self.name!r} is {self.fn!r}: pass a callable fn(completion, example)")
        try:
            weight = float(self.weight)
        except (TypeError, ValueError):
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"Reward.weight for {self.name!r} is {self.weight!r}: use a finite number")
        object.__setattr__(self, "weight", weight)


class RewardRegistry:
    """Named rewards with default weights. ``register`` also works as a decorator: ``@reg.register("name")``."""

    def __init__(self, rewards: Iterable[Reward] = ()):
        self._rewards: dict[str, Reward] = {}
        for r in rewards:
            self.register(r.name, r.fn, r.weight)

    def register(self, name: str, fn: RewardFn | None = None, weight: float = 1.0, *, overwrite: bool = False):
        if fn is None:
            return lambda f: (self.register(name, f, weight, overwrite=overwrite), f)[1]
        if name in self._rewards and not overwrite:
            raise ValueError(f"reward {name!r} is already registered: pass overwrite=True to replace it")
        reward = Reward(name, fn, float(weight))
        self._rewards[name] = reward
        return reward

    def get(self, name: str) -> Reward:
        try:
            return self._rewards[name]
        except KeyError:
            raise KeyError(f"unknown reward {name!r}; registered: {self.names()}") from None

    def names(self) -> list[str]:
        return list(self._rewards)

    def __contains__(self, name: str) -> bool:
        return name in self._rewards


def make_rewards(spec: Sequence[str | tuple[str, float] | Reward], registry: RewardRegistry | None = None
                 ) -> list[Reward]:
    """``["accuracy", ("format", 0.5), Reward("mine", fn)]`` -> rewards (a bare name keeps the registry weight)."""
    registry = REWARDS if registry is None else registry
    if isinstance(spec, (str, Reward)):
        spec = [spec]
    out: list[Reward] = []
    for item in spec:
        if isinstance(item, Reward):
            out.append(item)
        elif isinstance(item, str):
            out.append(registry.get(item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(dataclasses.replace(registry.get(item[0]), weight=float(item[1])))
        else:
            raise ValueError(f"reward spec item {item!r}: use a name, (name, weight) or a Reward")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names {names} repeat: each reward needs its own name (Reward(name=...))")
    return out


# ------------------------------------------------------------------------------------------------- batch scoring
def score_batch(rewards: Sequence[Reward], completions: Sequence[str], examples: Sequence[dict], *,
                max_workers: int = 8, timeout_s: float = 5.0) -> dict:
    """Scores every completion with every reward in a thread pool on the host.

    Returns ``{"total": float32[N], <name>: float32[N] (NaN where None), "errors": {name: count}}``; ``total`` is
    ``sum(weight * score)`` with None as 0. Exceptions, non-finite or non-numeric results and calls running past
    ``timeout_s`` (from the call's own start) give 0.0 and add one to ``errors[name]``.
    """
    rewards = list(rewards)
    n = len(completions)
    if len(examples) != n:
        raise ValueError(f"score_batch: {n} completions but {len(examples)} examples; pass one example per "
                         "completion (repeat a prompt's example G times)")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names) or any(nm in _RESERVED for nm in names):
        raise ValueError(f"score_batch: reward names {names} must be unique and not in {_RESERVED}")
    values = np.full((len(rewards), n), np.nan, np.float64)
    errors = {nm: 0 for nm in names}
    tasks = [(r, i) for r in range(len(rewards)) for i in range(n)]
    if not tasks:
        return {"total": np.zeros(n, np.float32), **{nm: values[k].astype(np.float32) for k, nm in
                                                        enumerate(names)}, "errors": errors}
    cond = threading.Condition()
    started: dict[int, float] = {}  # task -> start time, while running
    state = {"next": 0, "done": 0}
    first_error: dict[str, str] = {}

    def finish(t: int, value: float | None, error: str | None) -> None:  # under cond
        r, i = tasks[t]
        if error is not None:
            errors[names[r]] += 1
            first_error.setdefault(names[r], error)
            values[r, i] = 0.0
        elif value is not None:
            values[r, i] = value
        state["done"] += 1
        cond.notify_all()

    def worker() -> None:
        while True:
            with cond:
                if state["next"] >= len(tasks):
                    return
                t = state["next"]
                state["next"] += 1
                started[t] = time.monotonic()
            r, i = tasks[t]
            value, error = None, None
            try:
                out = rewards[r].fn(completions[i], examples[i])
                if out is not None:
                    if not isinstance(out, numbers.Real):
                        error = f"non-numeric score of type {type(out).__name__}"
                    elif not math.isfinite(float(out)):
                        error = f"non-finite score {out!r}"
                    else:
                        value = float(out)
            except Exception as e:  # noqa: BLE001 -- a broken reward must not take the batch down
                error = f"{type(e).__name__}: {e}"[:300]
            with cond:
                if started.pop(t, None) is not None:  # not already timed out
                    finish(t, value, error)

    def spawn() -> None:
        threading.Thread(target=worker, name="dsjax-reward", daemon=True).start()

    for _ in range(max(1, min(int(max_workers), len(tasks)))):
        spawn()
    with cond:
        while state["done"] < len(tasks):
            now = time.monotonic()
            for t, t0 in list(started.items()):
                if now - t0 > timeout_s:
                    del started[t]
                    finish(t, None, f"timed out after {timeout_s} s")
                    if state["next"] < len(tasks):
                        spawn()  # its thread is stuck; keep the pool size
            wake = min((t0 + timeout_s for t0 in started.values()), default=now + 0.05)
            cond.wait(max(0.001, min(wake - now, 0.05)))
    for nm, msg in first_error.items():
        log.warning("reward %r failed on %d of %d completions (scored 0.0); first: %s", nm, errors[nm], n, msg)
    weights = np.array([r.weight for r in rewards], np.float64)[:, None]
    total = (np.nan_to_num(values, nan=0.0) * weights).sum(axis=0)
    out = {"total": total.astype(np.float32)}
    out.update({nm: values[k].astype(np.float32) for k, nm in enumerate(names)})
    out["errors"] = errors
    return out


# ------------------------------------------------------------------------------------------------------- format
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(completion: str, example: dict) -> float:
    """1.0 for ``<think>..</think>`` + ``<answer>..</answer>``, each tag exactly once, only whitespace around/between.

    With ``example["prefix_think"]`` true (the R1-Zero prompt already ends in ``<think>``) the completion starts
    inside the reasoning: it is scored as ``"<think>" + completion``, so it must close ``</think>`` and must not
    open another ``<think>``. Tag contents may be empty; special tokens (EOS) must be stripped by the caller.
    """
    text = ("<think>" + completion) if example.get("prefix_think", False) else completion
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    t = text.strip()
    if not (t.startswith("<think>") and t.endswith("</answer>")):
        return 0.0
    close, open_ = t.find("</think>"), t.find("<answer>")
    return 1.0 if close < open_ and not t[close + len("</think>"):open_].strip() else 0.0


# ------------------------------------------------------------------------------------------ language consistency
_LATIN = ("en fr de es it pt nl sv da no nb nn fi pl cs sk sl hr ro hu tr id ms vi tl ca eu gl et lv lt sq is af "
          "sw ga cy eo la mt")
LANGUAGE_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"LATIN"}) for code in _LATIN.split()},
    **{code: frozenset({"CYRILLIC"}) for code in "ru uk bg sr mk be kk ky mn tg".split()},
    **{code: frozenset({"ARABIC"}) for code in "ar fa ur ps ug".split()},
    **{code: frozenset({"DEVANAGARI"}) for code in "hi mr ne sa".split()},
    **{code: frozenset({"HEBREW"}) for code in "he iw yi".split()},
    "zh": frozenset({"HAN"}), "ja": frozenset({"HAN", "HIRAGANA", "KATAKANA"}), "ko": frozenset({"HANGUL"}),
    "el": frozenset({"GREEK"}), "th": frozenset({"THAI"}), "bn": frozenset({"BENGALI"}),
    "ta": frozenset({"TAMIL"}), "te": frozenset({"TELUGU"}), "ka": frozenset({"GEORGIAN"}),
    "hy": frozenset({"ARMENIAN"}), "km": frozenset({"KHMER"}), "lo": frozenset({"LAO"}),
}
_SCRIPT_ALIASES = {"CJK": "HAN", "IDEOGRAPHIC": "HAN", "KATAKANA-HIRAGANA": "KATAKANA", "HALFWIDTH": None}
_ALL_SCRIPTS = frozenset().union(*LANGUAGE_SCRIPTS.values())


def _script(ch: str) -> str | None:
    """Unicode script of a letter from its name (``LATIN SMALL LETTER A`` -> LATIN); None for non-letters."""
    if ch.isascii():
        return "LATIN" if ch.isalpha() else None
    if not unicodedata.category(ch).startswith("L"):
        return None
    first = unicodedata.name(ch, "").split(" ", 1)[0]
    return _SCRIPT_ALIASES.get(first, first) or None  # (halfwidth forms are gone after NFKC)


def _target_scripts(language) -> frozenset[str]:
    key = str(language).strip()
    scripts = LANGUAGE_SCRIPTS.get(key.lower().replace("_", "-").split("-", 1)[0])
    if scripts is None and key.upper() in _ALL_SCRIPTS:  # a script name: "Latin", "HAN"
        scripts = frozenset({key.upper()})
    if scripts is None:
        raise ValueError(f"example['language']={language!r}: use an ISO 639-1 code from LANGUAGE_SCRIPTS "
                         f"(e.g. 'en', 'zh', 'ja') or a script name such as 'LATIN'")
    return scripts


_MATH_DELIMS = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}
_MATH_TOKEN = re.compile(r"\$\$|\$|\\\(|\\\)|\\\[|\\\]")
_COMMAND = re.compile(r"\\[A-Za-z]+")
_LONE_LATIN = re.compile(r"(?<![A-Za-z])[A-Za-z](?![A-Za-z])")


def _strip_math(text: str) -> str:
    """Drops ``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]`` regions (an unclosed one stays text); linear time."""
    out, pos, i = [], 0, 0
    opener = None
    for m in _MATH_TOKEN.finditer(text):
        tok = m.group()
        if opener is None:
            if tok in _MATH_DELIMS:
                out.append(text[pos:m.start()])
                opener, i = tok, m.start()
        elif tok == _MATH_DELIMS[opener]:
            opener, pos = None, m.end()
    out.append(text[i:] if opener is not None else text[pos:])
    return "".join(out)


def _reasoning(completion: str, example: dict) -> str:
    text = ("<think>" + completion) if example.get("prefix_think", False) else completion
    start = text.find("<think>")
    if start < 0:
        return text
    end = text.find("</think>", start)
    return text[start + len("<think>"):end if end >= 0 else len(text)]


def language_consistency_reward(completion: str, example: dict) -> float:
    """Share (0..1) of the reasoning's letters that are in the script of ``example.get("language", "en")``.

    The reasoning is the text inside ``<think>..</think>`` (to the end if unclosed; ``prefix_think`` as in
    :func:`format_reward`), or the whole completion without a ``<think>``. Ignored: digits, punctuation, symbols,
    LaTeX math regions and ``\\commands``, and lone Latin letters (``x``, ``n``: variables). Letters are counted
    by Unicode script from ``unicodedata.name`` after NFKC (Latin for en/fr/de/..., Han for zh, Han + kana for ja,
    Hangul for ko, Cyrillic for ru, ...; :data:`LANGUAGE_SCRIPTS`). No letters left (empty reasoning) -> 0.0.
    Letters, not words, are counted, so one Han character weighs as much as one Latin letter.
    """
    scripts = _target_scripts(example.get("language", "en"))
    text = unicodedata.normalize("NFKC", _reasoning(completion, example))
    text = _strip_math(text)
    text = _LONE_LATIN.sub(" ", _COMMAND.sub(" ", text))
    hits = total = 0
    for ch, k in Counter(text).items():
        sc = _script(ch)
        if sc is not None:
            total += k
            hits += k if sc in scripts else 0
    return hits / total if total else 0.0


# ------------------------------------------------------------------------------------------------------ overlong
DEFAULT_MAX_TOKENS = 20480  # DAPO: 16,384 expected + 4,096 buffer
DEFAULT_OVERLONG_BUFFER = 4096


def _overlong(num_tokens, max_tokens, buffer) -> float:
    length, max_tokens, buffer = int(num_tokens), int(max_tokens), int(buffer)
    if length < 0 or max_tokens <= 0 or not 0 <= buffer <= max_tokens:
        raise ValueError(f"overlong: num_tokens={length}, max_tokens={max_tokens}, buffer={buffer}; need "
                         "num_tokens >= 0 and 0 <= buffer <= max_tokens")
    expected = max_tokens - buffer
    if length <= expected:
        return 0.0
    if length <= max_tokens:
        return (expected - length) / buffer
    return -1.0


def overlong_penalty(max_tokens: int, buffer: int) -> RewardFn:
    """DAPO soft overlong penalty with fixed limits: 0 up to ``max_tokens - buffer`` tokens, then linearly down to
    -1 at ``max_tokens``, -1 beyond. Reads ``example["num_tokens"]`` (None when missing); the example's own
    ``max_tokens``/``overlong_buffer`` are ignored."""
    _overlong(0, max_tokens, buffer)  # validate now

    def overlong(completion: str, example: dict) -> float | None:
        n = example.get("num_tokens")
        return None if n is None else _overlong(n, max_tokens, buffer)

    return overlong


def overlong_reward(completion: str, example: dict) -> float | None:
    """:func:`overlong_penalty` with ``example["max_tokens"]`` and ``example["overlong_buffer"]`` (defaults
    :data:`DEFAULT_MAX_TOKENS` = 20480 and :data:`DEFAULT_OVERLONG_BUFFER` = 4096, DAPO's); lengths are in tokens
    (``example["num_tokens"]``, filled by the caller); None when it is missing."""
    n = example.get("num_tokens")
    if n is None:
        return None
    return _overlong(n, example.get("max_tokens", DEFAULT_MAX_TOKENS),
                     example.get("overlong_buffer", DEFAULT_OVERLONG_BUFFER))


REWARDS = RewardRegistry([
    Reward("accuracy", accuracy_reward),
    Reward("format", format_reward),
    Reward("language_consistency", language_consistency_reward),
    Reward("overlong", overlong_reward),
    Reward("countdown", countdown_reward),
])
