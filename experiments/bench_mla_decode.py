"""The absorbed-MLA decode attention kernel (``pallas_kernels.mla_decode_attention``) against XLA's einsum path, in
device time, with a sweep of the kernel's tilings.

    python -m experiments.bench_mla_decode --record

Each row is one layer's attention core of a decode step (``q_lat [B, S, N, R]`` over a ``[B, T, R + P]`` latent
cache): `small` at batch 1 and 32, a batch-32 speculative verification (S = 4), and DeepSeek-V3's shapes
(128 heads, R = 512, P = 64) over a 4k cache at batch 1 and 32.

* ``xla``: ``implementation="xla"`` (einsum scores, masked float32 softmax, einsum values);
* ``kernel``: the Pallas Triton kernel at the library's tiling (``default_tiling``), and the best tilings of the
  sweep (``bh`` heads per program / ``bt`` slots per tile / ``splits`` of the cache / ``num_warps`` /
  ``num_stages``; twice the library's heads per program, where the model has them, with 8 warps).

A call takes 3-100 us, so one call per dispatch measures the launch: each time is ``--repeats`` calls inside one
jitted ``fori_loop`` (the query scaled by a loop-carried scalar so XLA cannot hoist the call), best of 3, divided
by the repeats. TB/s counts the cache bytes one call must read (``B x T x (R + P)`` in bf16).
"""

from __future__ import annotations

import itertools

from absl import app, flags

from experiments.records import finish_table, stream_rows
from experiments.timing import loop_us_per_call

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 100, "Calls inside one jitted loop per timing.")
flags.DEFINE_bool("sweep", True, "Also time the kernel's other tilings.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

# (name, B, S, N, R, P, T)
SHAPES = [("small, batch 1", 1, 1, 16, 256, 32, 256),
          ("small, batch 32", 32, 1, 16, 256, 32, 256),
          ("small, batch 32, verify 4", 32, 4, 16, 256, 32, 320),
          ("V3, batch 1, 4k cache", 1, 1, 128, 512, 64, 4096),
          ("V3, batch 32, 4k cache", 32, 1, 128, 512, 64, 4096)]


def _us_per_call(fn, *args) -> float:
    return loop_us_per_call(fn, *args, repeats=FLAGS.repeats)


def _case(b, s, n, r, p, t):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(0), 5)
    ql = jax.random.normal(ks[0], (b, s, n, r), jnp.bfloat16)
    qr = jax.random.normal(ks[1], (b, s, n, p), jnp.bfloat16)
    ckv = jax.random.normal(ks[2], (b, t, r), jnp.bfloat16)
    kr = jax.random.normal(ks[3], (b, t, p), jnp.bfloat16)
    last = jax.random.randint(ks[4], (b, 1, 1), t // 2, t - s + 1)      # caches half to fully written
    mask = jnp.arange(t)[None, None, :] <= last + jnp.arange(s)[None, :, None]
    return ql, qr, ckv, kr, mask


def _rows():
    import jax
    import jax.numpy as jnp

    from pallas_kernels.mla_decode import _pallas, default_tiling, mla_decode_reference

    scale = 0.1
    for name, b, s, n, r, p, t in SHAPES:
        args = _case(b, s, n, r, p, t)
        ref = mla_decode_reference(*(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in args),
                                   scale=scale)
        nbytes = b * t * (r + p) * 2
        t_xla = _us_per_call(lambda *a: mla_decode_reference(*a, scale=scale), *args)
        bh0, bt0, sp0 = default_tiling(b, s, n, r, t)
        np_ = max(16, 1 << (n - 1).bit_length())
        lib = (bh0, bt0, sp0, 4, 2)
        tilings = [lib]
        if FLAGS.sweep:       # more heads per program (one cache read for more heads) where the heads allow
            tilings += [x for x in itertools.product(sorted({bh0, min(np_, 2 * bh0)}), (16, 32, 64),
                                                     (1, 2, 4, 8, 16), (4, 8), (2,))
                        if x != lib and t % (x[1] * x[2]) == 0 and (x[1] > 16 or x[2] > 1)
                        and (x[0] == bh0 or x[3] == 8)]
        timed = []
        for bh, bt, sp, nw, ns in tilings:
            kw = dict(interpret=False, scale=scale, bh=bh, bt=bt, splits=sp, num_warps=nw, num_stages=ns)
            fn = lambda *a, kw=kw: _pallas(*a, **kw)  # noqa: E731
            try:
                out = jax.jit(fn)(*args).astype(jnp.float32)
            except Exception as e:  # noqa: BLE001  (a tiling Triton cannot compile: report, go on)
                print(f"  {name}: tiling {(bh, bt, sp, nw, ns)} failed: {type(e).__name__}: {str(e)[:120]}",
                      flush=True)
                continue
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            timed.append((_us_per_call(fn, *args), (bh, bt, sp, nw, ns), err))
        t_lib = timed[0][0] if timed and timed[0][1] == lib else float("nan")
        best = sorted(timed)[:3]
        desc = "; ".join(f"{bh}h/{bt}/{sp}/{nw}w/{ns}s {tt:.1f} us (err {er:.0e})"
                         for tt, (bh, bt, sp, nw, ns), er in best)
        yield (name, f"{b}x{s}x{n}x{r}+{p}x{t}", f"{t_xla:.1f}", f"{t_lib:.1f}", f"{t_xla / t_lib:.2f}x",
               f"{nbytes / t_xla / 1e6:.2f}", f"{nbytes / t_lib / 1e6:.2f}", f"{bh0}h/{bt0}/{sp0}", desc)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    if jax.default_backend() != "gpu":
        raise app.UsageError("bench_mla_decode times the Triton kernel: run it on a GPU")
    lines = [f"Device time per call ({FLAGS.repeats} calls in one jitted loop), us:", "",
             "| attention core | BxSxNxR+PxT | xla | kernel | kernel vs xla | xla TB/s | kernel TB/s | "
             "library tiling (heads / bt / splits) | fastest tilings (heads / bt / splits / warps / stages) |",
             "|---|---|---|---|---|---|---|---|---|"]
    stream_rows(lines, _rows())
    finish_table(lines, "Absorbed-MLA decode attention", "bench_mla_decode", FLAGS.record)


if __name__ == "__main__":
    app.run(main)
