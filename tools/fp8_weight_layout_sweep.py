"""Session 16's experiment behind the weight-only FP8 decode kernel's layout: a stand-alone copy of the kernel
(no split-K, no SwiGLU) in each combination of

* weight layout: ``kn`` = ``[in, out]`` (N contiguous; the library until session 16) or ``nk`` = ``[out, in]``
  (K contiguous, as checkpoints store it; the library since),
* MMA operand type: bf16 or f16 (E4M3 -> f16 is one conversion per two values; no row scaling here, inputs are
  N(0, 1)),
* operand order: ``swap`` computes ``(W x^T)^T`` with the converted weight as the MMA's first operand,
* conversion: ``bits`` builds bf16 from the E4M3 bit pattern with integer ops and one multiply by 2^120,
* warps and pipeline stages,

timed in CUPTI kernel time (``experiments.timing.kernel_us_per_call``) against XLA's BF16 einsum and the library
kernel, at `small`'s batch-32 expert GEMMs, a batch-8 one and a batch-1 one (docs/benchmarks.md has the H200 output).

    PYTHONPATH=. python tools/fp8_weight_layout_sweep.py               # on a GPU
    PYTHONPATH=. python tools/fp8_weight_layout_sweep.py --interpret   # CPU: every variant's error, no timing
"""
import functools
import itertools
import sys

import jax
import jax.numpy as jnp
from jax import lax

INTERP = "--interpret" in sys.argv
B = 128


def kern(x_ref, w_ref, s_ref, o_ref, *, kb, bn, layout, mma, swap, conv):
    from jax.experimental import pallas as pl

    g, j = pl.program_id(0), pl.program_id(1)
    nb = (j * bn) // B
    dt = jnp.float16 if mma == "f16" else jnp.bfloat16

    def load_w(i):
        if layout == "kn":
            w = w_ref[g, pl.ds(i * B, B), pl.ds(j * bn, bn)]
        else:
            w = w_ref[g, pl.ds(j * bn, bn), pl.ds(i * B, B)]
        if conv == "bits":          # w is uint8: E4M3 bits -> bf16 bits (x 2^-120), then x 2^120 in bf16
            w16 = w.astype(jnp.uint16)
            bits = ((w16 & 0x80) << 8) | ((w16 & 0x7F) << 4)
            wb = lax.bitcast_convert_type(bits, jnp.bfloat16)
            return wb * jnp.bfloat16(2.0 ** 120)
        return w.astype(dt)

    def body(i, acc):
        xk = x_ref[g, :, pl.ds(i * B, B)].astype(dt)          # [Mp, 128]
        wk = load_w(i)
        if not swap:
            d = jnp.dot(xk, wk if layout == "kn" else wk.T, preferred_element_type=jnp.float32)   # [Mp, bn]
        else:
            d = jnp.dot(wk.T if layout == "kn" else wk, xk.T, preferred_element_type=jnp.float32)  # [bn, Mp]
        return acc + d * s_ref[g, i, nb]

    mp = x_ref.shape[1]
    acc = lax.fori_loop(0, kb, body, jnp.zeros((bn, mp) if swap else (mp, bn), jnp.float32))
    if swap:
        acc = acc.T
    o_ref[g, :, pl.ds(j * bn, bn)] = acc.astype(o_ref.dtype)


def call(x, w, s, *, layout, mma="bf16", swap=False, conv="cast", bn=128, warps=4, stages=3):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    g, m, k = x.shape
    n = w.shape[2] if layout == "kn" else w.shape[1]
    mp = max(16, 1 << (m - 1).bit_length())
    if mp != m:
        x = jnp.pad(x, ((0, 0), (0, mp - m), (0, 0)))
    if conv == "bits":
        w = lax.bitcast_convert_type(w, jnp.uint8)
    out = pl.pallas_call(
        functools.partial(kern, kb=k // B, bn=bn, layout=layout, mma=mma, swap=swap, conv=conv),
        grid=(g, n // bn), out_shape=jax.ShapeDtypeStruct((g, mp, n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=stages), interpret=INTERP,
    )(x, w, s)
    return out[:, :m]


def case(g, m, k, n, seed=0):
    kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (g, m, k), jnp.bfloat16)
    wq = jnp.clip(jax.random.normal(kw, (g, k, n)) * 100, -448, 448).astype(jnp.float8_e4m3fn)
    s = jax.random.uniform(ks, (g, k // 128, n // 128), minval=1e-4, maxval=1e-3)
    return x, wq, s


def ref(x, wq, s):
    full = jnp.repeat(jnp.repeat(s, B, 1), B, 2)
    return jnp.einsum("gmk,gkn->gmn", x.astype(jnp.float32), wq.astype(jnp.float32) * full,
                      precision=lax.Precision.HIGHEST)


SHAPES = [("b32 dense gate", 64, 32, 1024, 512), ("b32 dense down", 64, 32, 512, 1024),
          ("b8 dense gate", 64, 8, 1024, 512), ("b1 o_proj-ish (G=8 experts)", 8, 1, 1024, 512)]
if INTERP:
    SHAPES = [("tiny", 2, 5, 256, 256)]

VARIANTS = [dict(layout=l, mma=mm, swap=sw, warps=wp) for l, mm, sw, wp in
            itertools.product(("kn", "nk"), ("bf16", "f16"), (False, True), (4, 8))]
VARIANTS += [dict(layout=l, conv="bits", swap=sw, warps=4) for l in ("kn", "nk") for sw in (False, True)]
VARIANTS += [dict(layout="nk", mma="f16", swap=True, warps=4, stages=st) for st in (2, 4, 5)]
VARIANTS += [dict(layout="nk", mma="f16", swap=False, warps=4, stages=st) for st in (2, 4, 5)]


def main():
    timer = None
    if not INTERP:
        sys.path.insert(0, ".")
        from experiments.timing import kernel_us_per_call as timer
        from pallas_kernels.fp8_weight_gemm import _pallas
    print("device:", jax.devices()[0].device_kind, flush=True)
    for name, g, m, k, n in SHAPES:
        x, wq, s = case(g, m, k, n)
        r = ref(x, wq, s)
        wqt = jnp.swapaxes(wq, 1, 2)        # [G, N, K]
        rows = []
        if timer:
            wb = (wq.astype(jnp.float32) * jnp.repeat(jnp.repeat(s, B, 1), B, 2)).astype(jnp.bfloat16)
            rows.append(("bf16 einsum", timer(lambda x, w: jnp.einsum("gmk,gkn->gmn", x, w), x, wb), 0.0))
            rows.append(("library kernel", timer(lambda x, w, s: _pallas(x, w, s, interpret=False), x, wq, s), 0.0))
        for v in VARIANTS:
            w = wq if v["layout"] == "kn" else wqt
            fn = functools.partial(call, **v)
            try:
                out = jax.jit(fn)(x, w, s).astype(jnp.float32)
                err = float(jnp.linalg.norm(out - r) / jnp.linalg.norm(r))
                t = timer(fn, x, w, s) if timer else float("nan")
            except Exception as e:  # noqa: BLE001
                rows.append((str(v), float("nan"), f"error {type(e).__name__}: {str(e)[:200]}"))
                continue
            rows.append((str(v), t, err))
        base = rows[0][1] if timer else float("nan")
        wbytes = g * k * n
        print(f"\n## {name} G={g} M={m} K={k} N={n} (FP8 weight MB {wbytes / 1e6:.1f})")
        for desc, t, err in sorted(rows, key=lambda r: (r[1] != r[1], r[1])):
            bw = wbytes / t / 1e6 if t == t else float("nan")
            print(f"| {desc} | {t:.1f} us | vs bf16 {base / t:.2f}x | {bw:.2f} TB/s (fp8 bytes) | err {err} |",
                  flush=True)


if __name__ == "__main__":
    main()
