"""The wall-clock timer the kernel benchmarks share."""

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
