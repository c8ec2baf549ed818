"""The weight-only FP8 decode GEMM (``pallas_kernels.fp8_weight_matmul``) against XLA at `small`'s decode shapes,
in device time, with a sweep of the kernel's tilings.

    python -m experiments.bench_fp8_weight_gemm --record

Each row is one ``x [G, M, K] @ W^T`` of a decode step, ``W [G|E, N, K]`` the checkpoint's ``[out, in]``
layout (the FP8 kernels' layout; XLA's BF16 einsum gets the weights as ``[K, N]``, as BF16 models store them):

* ``bf16 einsum``: XLA's GEMM on BF16 weights (what a BF16-weights model runs);
* ``xla dequant``: ``fp8_weight_matmul(implementation="xla")``: dequantise the E4M3 weights, then an XLA einsum
  (what FP8-stored weights cost without the kernel);
* ``kernel``: the Pallas Triton kernel at the library's tiling, and the best tilings of the sweep
  (``bn`` / ``num_warps`` / ``num_stages``, relative error against the float32 reference);
* a second table: gate + up + SwiGLU as XLA runs it on BF16 weights, as two kernel GEMMs and XLA's ``silu * up``,
  and as the fused kernel (``pallas_kernels.fp8_weight_swiglu``);
* a third: DeepSeek's W8A8 inference scheme on the same weights (x quantised 1x128, the Mosaic GPU blockwise FP8
  GEMM reading E4M3 weights on FP8 tensor cores) against the weight-only kernel: whether decoding should take it.

Decode GEMMs take 3-50 us, so one call per dispatch measures the launch. ``--timer=kernels`` (default) sums the
CUPTI durations of the kernels each call launches (``experiments.timing.kernel_us_per_call``: the op's padding and
split-K sum included, no launch or loop overhead); ``--timer=loop`` times ``--repeats`` calls inside one jitted
``fori_loop`` (best of 3, divided by the repeats; it carries ~11 us of loop overhead per call, session 15). TB/s
counts the weight bytes read. The sweep covers the tile width, warps, stages, the MMA operand type (float16, the
library's, or bfloat16) and the split-K factor (``splits``; the library's rule is
``pallas_kernels.fp8_weight_gemm.default_splits``).
"""

from __future__ import annotations

import itertools

from absl import app, flags

from experiments.records import finish_table, stream_rows
from experiments.timing import kernel_us_per_call, loop_us_per_call

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 100, "Calls inside one jitted loop per timing.")
flags.DEFINE_enum("timer", "kernels", ["kernels", "loop"], "kernels: CUPTI kernel time per call from a profiler "
                  "trace; loop: calls inside one jitted fori_loop (includes the loop's overhead).")
flags.DEFINE_bool("sweep", True, "Also time the kernel's other tilings.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

# (name, G, M, K, N, E or None): `small` decode shapes (experts 64 x [1024, 512] / [512, 1024], top-6)
# `small`'s decode GEMMs; the expert rows count the shared expert decoding folds into the routed stacks (session 19:
# 64 + 1 experts on the dense path, 6 + 1 gathered pairs at batch 1)
SHAPES = [("experts, dense path, batch 32: gate/up", 65, 32, 1024, 512, None),
          ("experts, dense path, batch 32: down", 65, 32, 512, 1024, None),
          ("experts, gathered, batch 1: gate/up", 7, 1, 1024, 512, 65),
          ("dense MLP up, batch 32", 1, 32, 1024, 2816 // 128 * 128, None),
          ("q_b_proj, batch 1", 1, 1, 384, 3072, None),
          ("o_proj, batch 1", 1, 1, 1024, 1024, None),
          ("experts, gathered, batch 1: down", 7, 1, 512, 1024, 65)]


def _us_per_call(fn, *args) -> float:
    if FLAGS.timer == "kernels":
        return kernel_us_per_call(fn, *args)
    return loop_us_per_call(fn, *args, repeats=FLAGS.repeats)


def _case(g, m, k, n, e, seed=0):
    import jax
    import jax.numpy as jnp

    e = e or g
    kx, kw, ks, ki = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (g, m, k), jnp.bfloat16)
    wq = jnp.clip(jax.random.normal(kw, (e, n, k)) * 100, -448, 448).astype(jnp.float8_e4m3fn)    # [out, in]
    s = jax.random.uniform(ks, (e, n // 128, k // 128), minval=1e-4, maxval=1e-3)
    idx = None if e == g else jax.random.randint(ki, (g,), 0, e)
    return x, wq, s, idx


def _bf16_weights(wq, s):
    """The dequantised BF16 copy of ``wq [G, N, K]`` in the ``[G, K, N]`` layout BF16 models store."""
    import jax.numpy as jnp

    w = wq.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, 128, 1), 128, 2)
    return jnp.swapaxes(w, 1, 2).astype(jnp.bfloat16)


def _rows():
    import jax
    import jax.numpy as jnp

    from pallas_kernels import hardware
    from pallas_kernels.fp8_weight_gemm import (MIN_PROGRAMS, MMA_DTYPE, TILE_N, _pallas, default_splits,
                                                fp8_weight_matmul_reference)

    for name, g, m, k, n, e in SHAPES:
        x, wq, s, idx = _case(g, m, k, n, e)
        wb = _bf16_weights(wq, s)                                          # [G, K, N]
        ref = fp8_weight_matmul_reference(x, wq, s, idx).astype(jnp.float32)
        wbytes = g * k * n
        if idx is None:
            t_bf = _us_per_call(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w), x, wb)
        else:
            t_bf = _us_per_call(lambda x, w, i: jnp.einsum("gmk,gkn->gmn", x, jnp.take(w, i, 0)), x, wb, idx)
        t_xla = _us_per_call(lambda x, wq, s, i: fp8_weight_matmul_reference(x, wq, s, i), x, wq, s, idx)
        kb = k // 128
        lib = (TILE_N, 4, 3, MMA_DTYPE, None)                # None: the library's split rule (default_splits)
        other = "bf16" if MMA_DTYPE == "f16" else "f16"
        # the tilings, the library's tiling with the other MMA operand type, and with each split-K factor
        # dividing K/128
        grid = [(*t, MMA_DTYPE, None) for t in itertools.product((32, 64, 128), (4, 8), (2, 3, 4))]
        tilings = [lib] + ([t for t in grid if t != lib]
                           + [(TILE_N, 4, 3, other, None), (TILE_N, 8, 3, other, None)]
                           + [(TILE_N, 4, 3, MMA_DTYPE, sp) for sp in (1, 2, 4, 8, 16) if kb % sp == 0]
                           if FLAGS.sweep else [])
        timed = []
        for bn, nw, ns, mma, sp in tilings:
            kw = dict(interpret=False, bn=bn, num_warps=nw, num_stages=ns, mma_dtype=mma, splits=sp)
            fn = lambda x, wq, s, i, kw=kw: _pallas(x, wq, s, i, **kw)  # noqa: E731
            out = jax.jit(fn)(x, wq, s, idx).astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            timed.append((_us_per_call(fn, x, wq, s, idx), (bn, nw, ns, mma, sp), err))
        t_lib = timed[0][0]
        best = sorted(timed, key=lambda r: r[0])[:3]
        alt = [f"{nw}w {t:.1f} us" for t, (_, nw, _, mma, _), _ in timed if mma != MMA_DTYPE]
        splits = [f"{sp}: {t:.1f}" for t, (*_, sp), _ in timed if sp is not None]
        lib_sp = default_splits(g, n, k, TILE_N, hardware.num_sms(MIN_PROGRAMS))
        desc = "; ".join(f"{bn}/{nw}w/{ns}s/{mma}{'' if sp is None else f'/k{sp}'} "
                         f"{t:.1f} us (err {er:.0e})" for t, (bn, nw, ns, mma, sp), er in best) + \
            (f" [{other} MMA: {', '.join(alt)}]" if alt else "") + \
            (f" [split-K (library: {lib_sp}): {', '.join(splits)} us]" if splits else "")
        yield (name, f"{g}x{m}x{k}x{n}", f"{t_bf:.1f}", f"{t_xla:.1f}", f"{t_lib:.1f}", f"{t_bf / t_lib:.2f}x",
               f"{2 * wbytes / t_bf / 1e6:.2f}", f"{wbytes / t_lib / 1e6:.2f}", desc)


def _swiglu_rows():
    """Gate + up + SwiGLU: XLA on BF16 weights, the kernel as two GEMMs and XLA's silu * up, the fused kernel."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.fp8_weight_gemm import _pallas

    for name, g, m, k, n, e in SHAPES:
        if "gate/up" not in name and "MLP up" not in name:
            continue
        x, gq, gs, idx = _case(g, m, k, n, e)
        _, uq, us, _ = _case(g, m, k, n, e, seed=1)
        wg, wu = _bf16_weights(gq, gs), _bf16_weights(uq, us)
        pick = (lambda w, i: w) if idx is None else (lambda w, i: jnp.take(w, i, 0))  # noqa: E731
        mm = lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w)  # noqa: E731
        t_bf = _us_per_call(lambda x, a, b, i: jax.nn.silu(mm(x, pick(a, i))) * mm(x, pick(b, i)), x, wg, wu, idx)
        k2 = lambda x, gq, gs, uq, us, i: jax.nn.silu(_pallas(x, gq, gs, i, interpret=False)) * _pallas(  # noqa: E731
            x, uq, us, i, interpret=False)
        t_two = _us_per_call(k2, x, gq, gs, uq, us, idx)
        t_fused = _us_per_call(lambda x, gq, gs, uq, us, i: _pallas(x, gq, gs, i, interpret=False, up=(uq, us)),
                               x, gq, gs, uq, us, idx)
        yield (name, f"{g}x{m}x{k}x{n}", f"{t_bf:.1f}", f"{t_two:.1f}", f"{t_fused:.1f}", f"{t_bf / t_fused:.2f}x",
               f"{2 * g * k * n / t_fused / 1e6:.2f}")


def _w8a8_rows():
    """DeepSeek's other FP8 inference scheme on the same weights: quantise the activations 1x128 too and run the
    Mosaic GPU blockwise FP8 GEMM (``pallas_kernels.fp8_gemm`` / ``fp8_gemm_grouped``, FP8 tensor cores, the
    weights read as E4M3 with no conversion). Its weights must be ``[N, K]`` (FP8 wgmma reads both operands
    K-major), the layout FP8-stored weights have. Each group's rows are padded to the
    kernel's 128-row tiles. Times the quantisation of x and the GEMM, against the weight-only kernel."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels import act_quant, fp8_gemm, fp8_gemm_grouped
    from pallas_kernels.fp8_weight_gemm import _pallas, fp8_weight_matmul_reference

    for name, g, m, k, n, e in SHAPES:
        if e is not None:       # the gathered batch-1 form: 6 groups of 1 row padded to 128 each; not a W8A8 case
            continue
        x, wq, s, _ = _case(g, m, k, n, e)
        ref = fp8_weight_matmul_reference(x, wq, s).astype(jnp.float32)
        wt, st = wq, s                                                          # [G, N, K], [G, N/128, K/128]
        if g == 1:
            def w8a8(x, wt, st):
                a, sa = act_quant(x[0])
                return fp8_gemm(a, sa, wt[0], st[0], implementation="pallas")[None]
        else:
            tile_group = jnp.arange(g, dtype=jnp.int32)

            def w8a8(x, wt, st):
                a, sa = act_quant(x)                                           # [G, M, K], [G, M, K/128]
                a = jnp.pad(a, ((0, 0), (0, 128 - m), (0, 0))).reshape(g * 128, k)
                sa = jnp.pad(sa, ((0, 0), (0, 128 - m), (0, 0)), constant_values=1.0).reshape(g * 128, -1)
                y = fp8_gemm_grouped(a, sa, wt, st, tile_group, implementation="pallas")
                return y.reshape(g, 128, n)[:, :m]
        try:
            out = jax.jit(w8a8)(x, wt, st).astype(jnp.float32)
        except Exception as err:  # noqa: BLE001  (report and go on: the table's other rows still count)
            yield (name, f"{g}x{m}x{k}x{n}", "n/a", "n/a", f"failed: {type(err).__name__}: {str(err)[:80]}", "", "")
            continue
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        t_w8a8 = _us_per_call(w8a8, x, wt, st)
        t_wo = _us_per_call(lambda x, wq, s: _pallas(x, wq, s, interpret=False), x, wq, s)
        yield (name, f"{g}x{m}x{k}x{n}", f"{t_wo:.1f}", f"{t_w8a8:.1f}", f"{t_wo / t_w8a8:.2f}x",
               f"{g * k * n / t_w8a8 / 1e6:.2f}", f"{rel:.1e}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    if jax.default_backend() != "gpu":
        raise app.UsageError("bench_fp8_weight_gemm times the Triton kernel: run it on a GPU")
    timer = ("kernel time per call (CUPTI, every kernel the call launches)" if FLAGS.timer == "kernels" else
             f"device time per call ({FLAGS.repeats} calls in one jitted loop)")
    lines = [f"{timer[0].upper()}{timer[1:]}, us:", "",
             "| GEMM | GxMxKxN | bf16 einsum | xla dequant | kernel | kernel vs bf16 | bf16 TB/s | kernel TB/s | "
             "fastest tilings (bn / warps / stages / split-K) |", "|---|---|---|---|---|---|---|---|---|"]
    stream_rows(lines, _rows())
    lines += ["", "Gate + up + SwiGLU (two weights of the row's shape), us per call:", "",
              "| MLP | GxMxKxN | bf16 (XLA) | kernel x2 + silu*up | fused kernel | fused vs bf16 | fused TB/s |",
              "|---|---|---|---|---|---|---|"]
    stream_rows(lines, _swiglu_rows())
    lines += ["", "W8A8 (activations quantised 1x128, Mosaic GPU FP8 GEMM on the [N, K] weights) against "
              "the weight-only kernel, us per call:", "",
              "| GEMM | GxMxKxN | weight-only kernel | act_quant + FP8 GEMM | W8A8 vs weight-only | W8A8 weight TB/s | "
              "W8A8 rel. error vs weight-only reference |", "|---|---|---|---|---|---|---|"]
    stream_rows(lines, _w8a8_rows())
    finish_table(lines, "Weight-only FP8 decode GEMM, `small` shapes", "bench_fp8_weight_gemm", FLAGS.record)


if __name__ == "__main__":
    app.run(main)
