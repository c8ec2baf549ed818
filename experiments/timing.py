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


def kernel_us_per_call(fn, *args, iters: int = 20) -> float:
    """Microseconds of GPU kernel time per call of ``jax.jit(fn)(*args)``: the CUPTI durations of every kernel the
    call launches (padding, the op, any split-K sum), from a ``jax.profiler`` trace of ``iters`` calls after a
    warm-up, summed over device 0's compute streams (copies and memsets left out) and divided by ``iters``. No loop
    or launch overhead enters, unlike :func:`loop_us_per_call` (whose ~11 us per iteration hid a 20 us batch-1 FP8
    kernel behind a 14 us BF16 one, session 15). NaN without a GPU trace (CPU)."""
    import glob
    import re
    import tempfile

    import jax

    from experiments.traces import is_kernel_stream

    f = jax.jit(fn)
    jax.block_until_ready(f(*args))
    tmp = tempfile.mkdtemp()
    jax.profiler.start_trace(tmp)
    out = None
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    paths = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
    if not paths:
        return float("nan")
    data = jax.profiler.ProfileData.from_file(paths[0])
    total_ns, seen = 0, False
    for plane in data.planes:
        if not re.fullmatch(r"/device:GPU:0( .*)?", plane.name):
            continue
        for line in plane.lines:
            if not is_kernel_stream(line.name):
                continue
            for ev in line.events:
                if re.match(r"(?i)mem(cpy|set)", ev.name):
                    continue
                seen = True
                total_ns += ev.duration_ns
    return total_ns / 1e3 / iters if seen else float("nan")
