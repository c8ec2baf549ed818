"""The timers the kernel benchmarks share."""

from __future__ import annotations

import statistics
import time


def median_seconds(f, *args, iters: int) -> float:
    """Median wall-clock seconds of ``f(*args)`` over ``iters`` calls after one warm-up call, each call waited for
    (``jax.block_until_ready``)."""
    import jax

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def loop_us_per_call(fn, x, *args, repeats: int) -> float:
    """Microseconds per call of ``fn(x, *args)`` with ``repeats`` calls inside one jitted ``fori_loop`` (``x``
    scaled by a loop-carried scalar so XLA cannot hoist the call), best of 3. For decode-sized kernels (3-50 us):
    one dispatch per call would measure the launch instead."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def run(x, *args):
        def body(i, c):
            y = fn(x * c.astype(x.dtype), *args)
            return c + 0 * y[(0,) * y.ndim].astype(jnp.float32)
        return lax.fori_loop(0, repeats, body, jnp.float32(1))

    f = jax.jit(run)
    jax.block_until_ready(f(x, *args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, *args))
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / repeats
