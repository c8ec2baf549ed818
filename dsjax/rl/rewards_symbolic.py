"""The symbolic stage of the math verifier: SymPy in separate worker processes, killed at a deadline.

SymPy is optional: when it is not importable (checked with ``importlib.util.find_spec``, without importing it
here) the stage is skipped and :func:`symbolic_equal` returns ``None``. Nothing SymPy-related ever runs in the
calling process; the workers (``_symbolic_worker.py`` run by path with ``python -P``, so they import neither
``dsjax`` nor JAX) receive only strings that passed :func:`dsjax.rl._symbolic_worker.parse_checked`, rebuild the
expressions from the AST, screen numerically (50 digits, 3 points for the free symbols: a mismatch is "not equal",
and closed forms are decided there at ``rel_tol``) and only then run ``simplify(a - b) == 0``. A worker whose
answer is late is killed (``SIGKILL``) and replaced in the background; a worker limits its own address space to
2 GiB and exits when its parent dies. POSIX only (``select`` on pipes).

A small pool (``max_workers``, default ``min(4, cpu_count)``) is shared by all threads of the process. Starting a
worker (a Python interpreter plus ``import sympy``, about 0.5 s) is not counted against ``timeout_s``; call
:func:`warm_up_symbolic` once before scoring to keep that off the first batch.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import select
import subprocess
import sys
import threading
import time

__all__ = ["symbolic_available", "symbolic_equal", "warm_up_symbolic", "shutdown_symbolic", "SymbolicPool"]

_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_symbolic_worker.py")
STARTUP_TIMEOUT_S = 30.0


def symbolic_available() -> bool:
    """Whether SymPy is installed (the symbolic stage is skipped otherwise)."""
    return importlib.util.find_spec("sympy") is not None


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-P", _WORKER_PATH], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=os.path.dirname(
                                         _WORKER_PATH), close_fds=True)
        self._buf = b""

    def read_line(self, deadline: float) -> str | None:
        """One line from the worker, or None at the deadline / on EOF."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class SymbolicPool:
    """Up to ``max_workers`` SymPy worker processes; thread-safe."""

    def __init__(self, max_workers: int = 2):
        self.max_workers = max(1, int(max_workers))
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._alive = 0  # idle + busy + starting
        self._unavailable = False
        self.kills = 0  # workers killed at a deadline (for tests and logs)

    def _start(self) -> _Worker | None:
        """Starts one worker and waits for its handshake; None if it fails."""
        try:
            w = _Worker()
        except OSError:
            return None
        line = w.read_line(time.monotonic() + STARTUP_TIMEOUT_S)
        if line != "ready":
            w.kill()
            if line == "nosympy":
                self._unavailable = True
            return None
        return w

    def _replace_in_background(self) -> None:
        def run():
            w = self._start()
            with self._cond:
                if w is None:
                    self._alive -= 1
                else:
                    self._idle.append(w)
                self._cond.notify_all()

        threading.Thread(target=run, name="dsjax-sympy-start", daemon=True).start()

    def warm_up(self, n: int | None = None) -> int:
        """Starts workers until ``n`` (default ``max_workers``) are alive; returns how many are idle."""
        n = self.max_workers if n is None else min(n, self.max_workers)
        while True:
            with self._cond:
                if self._unavailable or self._alive >= n:
                    break
                self._alive += 1
            w = self._start()
            with self._cond:
                if w is None:
                    self._alive -= 1
                    break
                self._idle.append(w)
                self._cond.notify_all()
        with self._cond:
            return len(self._idle)

    def _acquire(self, deadline: float) -> _Worker | None:
        """An idle worker (waiting until ``deadline`` if all are busy or starting), or a freshly started one."""
        with self._cond:
            while True:
                if self._unavailable:
                    return None
                if self._idle:
                    return self._idle.pop()
                if self._alive < self.max_workers:
                    self._alive += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
        w = self._start()  # outside the lock: about 0.5 s, not counted against the caller's timeout
        if w is None:
            with self._cond:
                self._alive -= 1
                self._cond.notify_all()
        return w

    def _release(self, w: _Worker) -> None:
        with self._cond:
            self._idle.append(w)
            self._cond.notify_all()

    def _discard(self, w: _Worker, replace: bool) -> None:
        w.kill()
        if replace:
            self._replace_in_background()
        else:
            with self._cond:
                self._alive -= 1
                self._cond.notify_all()

    def equal(self, a: str, b: str, *, timeout_s: float, rel_tol: float = 1e-6,
              wait_s: float | None = None) -> bool | None:
        """True/False from SymPy, or None (unavailable, no worker free within ``wait_s``, or past ``timeout_s``).

        ``timeout_s`` bounds the SymPy work; waiting for a busy pool is bounded by ``wait_s`` (default
        ``4 * timeout_s``); only the very first start of a worker (about 0.5 s) is outside both.
        """
        wait_s = 4 * timeout_s if wait_s is None else wait_s
        w = self._acquire(time.monotonic() + wait_s)
        if w is None:
            return None
        try:
            w.proc.stdin.write((json.dumps({"a": a, "b": b, "rel_tol": rel_tol}) + "\n").encode())
            w.proc.stdin.flush()
        except (OSError, ValueError):
            self._discard(w, replace=True)
            return None
        line = w.read_line(time.monotonic() + timeout_s)
        if line is None:  # late or dead: kill it, start a fresh one for the next caller
            self.kills += 1
            self._discard(w, replace=True)
            return None
        self._release(w)
        try:
            return bool(json.loads(line)["equal"])
        except (ValueError, KeyError, TypeError):
            return None

    def shutdown(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._alive -= len(idle)
        for w in idle:
            w.kill()


_POOL = SymbolicPool(max_workers=min(4, os.cpu_count() or 1))


def symbolic_equal(a: str, b: str, *, timeout_s: float = 1.0, rel_tol: float = 1e-6) -> bool | None:
    """Whether SymPy shows the two checked expressions equal; None when it cannot say in time (or is missing)."""
    if not symbolic_available():
        return None
    return _POOL.equal(a, b, timeout_s=timeout_s, rel_tol=rel_tol)


def warm_up_symbolic(n: int | None = None) -> int:
    """Starts the SymPy workers now (each takes about 0.5 s); returns how many are ready (0 without SymPy)."""
    return _POOL.warm_up(n) if symbolic_available() else 0


def shutdown_symbolic() -> None:
    """Stops the idle SymPy workers (also done at exit)."""
    _POOL.shutdown()


atexit.register(shutdown_symbolic)
