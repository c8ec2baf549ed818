"""FP8 (E4M3) blockwise quantisation, GEMMs and fp8_linear: every op against a float64 NumPy reference.

Error bounds used below (and why):
* Quantisation: per element ``|deq(q) - x| <= 2^-4 |x| + 2^-10 s`` (3 mantissa bits: half an ulp is 2^-4 relative
  for normals; subnormals are spaced 2^-9 s). On Gaussian data the relative Frobenius error is ~3.7%: bound 4.5%.
* GEMM of already-quantised operands vs the float64 product of the dequantised operands: <= 2e-3 relative with
  BF16 output (BF16 rounding), <= 1e-5 with f32 output on the interpreters (exact f32 products), <= 5e-4 on a GPU
  (FP8 wgmma accumulates with reduced precision inside a 128-deep block).
* fp8_linear vs the unquantised f32 layer: forward and both gradients <= 6% relative (two quantised operands).
Kernel outputs are poisoned: the Pallas interpreters fill every allocated buffer with NaN
(``uninitialized_memory="nan"``), so an unwritten tile fails the finiteness checks; on the GPU a freed NaN buffer
of the output's size is left in the allocator before the call.
"""

import functools

from jax.test_util import check_grads

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import (GemmConfig, act_quant, act_quant_dual, act_quant_t, dequant, fp8_gemm, fp8_linear,
                            gemm_reference, weight_quant_dual)
from pallas_kernels.fp8_gemm import _kernel_sb, _mgpu_gemm, default_config, fit_config

NAN_INTERPRET = pltpu.InterpretParams(uninitialized_memory="nan")


def _np_quant(x, block):
    """float64 reference: scale = max(amax, 1e-4)/448 per block, q = e4m3(x / scale)."""
    x = np.asarray(x, np.float64)
    r, c = x.shape
    br, bc = block
    rb, cb = -(-r // br), -(-c // bc)
    p = np.zeros((rb * br, cb * bc))
    p[:r, :c] = x
    amax = np.abs(p.reshape(rb, br, cb, bc)).max(axis=(1, 3))
    s = np.maximum(amax, 1e-4) / 448.0
    full = np.repeat(np.repeat(s, br, 0), bc, 1)[:r, :c]
    q = np.clip(x / full, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    return q, s, full


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_quant(x, q, s, block):
    _, s_ref, full = _np_quant(x, block)
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=1e-6)
    deq = np.asarray(q, np.float64) * full
    x64 = np.asarray(x, np.float64)
    assert np.all(np.abs(deq - x64) <= 2.0**-4 * np.abs(x64) + 2.0**-10 * full + 1e-12)
    assert _rel(deq, x64) < 0.045


@pytest.mark.parametrize("shape", [(4, 256), (5, 300), (2, 3, 130)])
def test_act_quant_matches_float64(shape):
    x = jax.random.normal(jax.random.key(0), shape) * 3.0
    q, s = act_quant(x, implementation="xla")
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (*shape[:-1], -(-shape[-1] // 128))
    _check_quant(x.reshape(-1, shape[-1]), q.reshape(-1, shape[-1]), s.reshape(-1, s.shape[-1]), (1, 128))
    np.testing.assert_allclose(dequant(q, s), np.asarray(q, np.float32) * np.repeat(s, 128, -1)[..., :shape[-1]])


def test_transposed_and_weight_quant_match_float64():
    x = jax.random.normal(jax.random.key(1), (200, 300))
    qt, st = act_quant_t(x, implementation="xla")                   # 128x1 tiles of x == 1x128 tiles of x.T
    assert qt.shape == (300, 200) and st.shape == (300, 2)
    _check_quant(x.T, qt, st, (1, 128))
    q, s, qt, st = weight_quant_dual(x, implementation="xla")
    _check_quant(x, q, s, (128, 128))
    np.testing.assert_array_equal(np.asarray(qt, np.float32), np.asarray(q, np.float32).T)
    np.testing.assert_array_equal(st, s.T)
    assert _rel(dequant(qt, st, block=(128, 128)), np.asarray(x).T) < 0.045


def test_pow2_scales_and_zeros():
    x = jax.random.normal(jax.random.key(2), (8, 256)).at[0].set(0.0)
    q, s = act_quant(x, pow2_scale=True, implementation="xla")
    log = np.log2(np.asarray(s))
    np.testing.assert_array_equal(log, np.round(log))
    amax = np.abs(np.asarray(x)).reshape(8, 2, 128).max(-1)
    assert np.all(np.asarray(s) * 448 >= np.maximum(amax, 1e-4) * (1 - 1e-6))
    assert np.all(np.asarray(q[0], np.float32) == 0) and np.all(np.isfinite(np.asarray(q, np.float32)))


@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
def test_pallas_quant_kernel_equals_reference(shape):
    x = jax.random.normal(jax.random.key(3), shape) * 2.0
    for fn in (act_quant, act_quant_t, act_quant_dual, weight_quant_dual):
        ref = fn(x, implementation="xla")
        out = fn(x, implementation="pallas", interpret=NAN_INTERPRET)
        for a, b in zip(out, ref):
            assert a.shape == b.shape and a.dtype == b.dtype
            a32 = np.asarray(a, np.float32)
            assert np.all(np.isfinite(a32)), f"{fn.__name__}: unwritten (NaN-poisoned) output"
            np.testing.assert_array_equal(a32, np.asarray(b, np.float32))


MGPU_INTERPRET = plgpu.InterpretGPUParams(uninitialized_memory="nan")


@pytest.mark.parametrize("shape,dtype,pow2", [((256, 384), jnp.bfloat16, False), ((256, 384), jnp.float32, True),
                                              ((208, 304), jnp.float32, False)])   # last: partial 128-tiles
def test_mosaic_gpu_quant_kernel_interpret(shape, dtype, pow2):
    """The Hopper quantisation kernel (fp8_quant_mgpu, the production kernel: TMA pipeline, transposed SMEM views)
    in the Mosaic GPU interpreter equals the XLA reference bit for bit, q and scales, for every op. Outputs and SMEM
    start as NaN, so a tile the kernel does not write fails the finiteness check. Row 3 is all zeros (eps clamp);
    the partial shape exercises the zero padding of partial 128-tiles and the slicing of the outputs."""
    x = (jax.random.normal(jax.random.key(4), shape) * 2.0).at[3].set(0.0).astype(dtype)
    for fn in (act_quant, act_quant_t, act_quant_dual, weight_quant_dual):
        ref = fn(x, pow2_scale=pow2, implementation="xla")
        out = fn(x, pow2_scale=pow2, implementation="pallas", interpret=MGPU_INTERPRET)
        for a, b in zip(out, ref):
            assert a.shape == b.shape and a.dtype == b.dtype, (fn.__name__, a.shape, b.shape)
            a32 = np.asarray(a, np.float32)
            assert np.all(np.isfinite(a32)), f"{fn.__name__}: unwritten (NaN-poisoned) output"
            np.testing.assert_array_equal(a32, np.asarray(b, np.float32), err_msg=fn.__name__)


def test_mosaic_gpu_quant_kernel_lowers_for_cuda():
    """Without a GPU: the kernel's Mosaic GPU lowering (layout inference, SMEM budget) for every mode, bf16 and f32
    inputs, at a DeepSeek-V3 size and at one with partial 128-tiles (K = 1040 failed this on an H100)."""
    from jax import export

    from pallas_kernels.fp8_quant_mgpu import mgpu_quant

    for mode, dtype, pow2 in [("rows", jnp.bfloat16, True), ("cols", jnp.bfloat16, False),
                              ("dual", jnp.bfloat16, False), ("dual", jnp.float32, False),
                              ("block", jnp.float32, True)]:
        for shape in ((8192, 7168), (1008, 1040)):   # second: partial edge tiles (TMA tiling rules)
            x = jax.ShapeDtypeStruct(shape, dtype)
            f = jax.jit(functools.partial(mgpu_quant, mode=mode, pow2_scale=pow2))
            text = export.export(f, platforms=["cuda"])(x).mlir_module()
            assert "mosaic_gpu" in text, mode


def test_pow2_scales_are_exact_powers_of_two():
    """Power-of-two scales are the smallest power of two >= s, exactly (np.frexp as the oracle), including exact
    powers of two and their neighbours: XLA's GPU exp2 gave 0.031249998 for 2**-5 (H100), so they come from bits."""
    from pallas_kernels.fp8_quant import _pow2_ceil

    rng = np.random.default_rng(0)
    exact = np.float32(2.0) ** np.arange(-30, 30, dtype=np.float32)
    s = np.concatenate([rng.uniform(1e-7, 1e3, 4096).astype(np.float32), exact, np.nextafter(exact, np.inf),
                        np.nextafter(exact, np.float32(0))])
    m, e = np.frexp(s.astype(np.float64))
    want = np.ldexp(1.0, np.where(m == 0.5, e - 1, e)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_pow2_ceil(jnp.asarray(s))), want)


def test_mosaic_gpu_quant_kernel_vmap():
    """Under vmap the Mosaic GPU kernel runs once per batch element (its custom_vmap rule): same outputs as a
    Python loop, in the interpreter."""
    x = jax.random.normal(jax.random.key(7), (2, 128, 256), jnp.bfloat16)
    f = functools.partial(act_quant_dual, implementation="pallas", interpret=MGPU_INTERPRET)
    out = jax.vmap(f)(x)
    for i in range(2):
        for a, b in zip(out, f(x[i])):
            np.testing.assert_array_equal(np.asarray(a[i], np.float32), np.asarray(b, np.float32))


def test_mosaic_gpu_quant_kernel_errors():
    x = jnp.ones((200, 300))
    with pytest.raises(ValueError, match=r"M % 16 == 0 and K % 16 == 0.*\(200, 300\).*implementation='xla'"):
        act_quant_dual(x, implementation="pallas", interpret=MGPU_INTERPRET)


@pytest.mark.gpu
def test_mosaic_gpu_quant_kernel_on_gpu():
    """On a Hopper GPU: implementation='pallas' (the Mosaic GPU kernel) equals the XLA reference bit for bit (q and
    scales; pow2 scales too), with a NaN-poisoned allocator so unwritten tiles show."""
    for shape, dtype in (((1024, 2048), jnp.bfloat16), ((1008, 1040), jnp.float32)):
        x = jax.random.normal(jax.random.key(5), shape, dtype) * 2.0
        for fn in (act_quant, act_quant_t, act_quant_dual, weight_quant_dual):
            for pow2 in (False, True):
                ref = jax.jit(functools.partial(fn, pow2_scale=pow2, implementation="xla"))(x)
                f = jax.jit(functools.partial(fn, pow2_scale=pow2, implementation="pallas"))
                f.lower(x).compile()
                for r in ref:
                    jnp.full(r.shape, jnp.nan, r.dtype).block_until_ready().delete()   # poison the allocator
                out = f(x)
                for a, b in zip(out, ref):
                    a32 = np.asarray(a, np.float32)
                    assert np.all(np.isfinite(a32)), fn.__name__
                    np.testing.assert_array_equal(a32, np.asarray(b, np.float32), err_msg=f"{fn.__name__} {pow2}")


def _operands(m, n, k, variant, key=0):
    ka, kb = jax.random.split(jax.random.key(key))
    a = jax.random.normal(ka, (m, k))
    b = jax.random.normal(kb, (n, k)) * 0.05
    aq, sa = act_quant(a, implementation="xla")
    if variant == "1d2d":
        bq, sb, _, _ = weight_quant_dual(b, implementation="xla")
        sb_full = np.repeat(np.repeat(np.asarray(sb, np.float64), 128, 0), 128, 1)[:n, :k]
    else:
        bq, sb = act_quant(b, implementation="xla")
        sb_full = np.repeat(np.asarray(sb, np.float64), 128, 1)[:, :k]
    a64 = np.asarray(aq, np.float64) * np.repeat(np.asarray(sa, np.float64), 128, 1)[:, :k]
    ref = a64 @ (np.asarray(bq, np.float64) * sb_full).T
    return aq, sa, bq, sb, ref


@pytest.mark.parametrize("variant", ["1d2d", "1d1d"])
@pytest.mark.parametrize("mnk", [(256, 256, 384), (100, 200, 300)])
def test_gemm_reference_float64(variant, mnk):
    aq, sa, bq, sb, ref = _operands(*mnk, variant)
    assert _rel(gemm_reference(aq, sa, bq, sb, variant=variant, out_dtype=jnp.float32), ref) < 1e-6
    assert _rel(fp8_gemm(aq, sa, bq, sb, variant=variant, implementation="xla"), ref) < 2e-3


@pytest.mark.parametrize("variant", ["1d2d", "1d1d"])
def test_tpu_kernel_interpret(variant):
    aq, sa, bq, sb, ref = _operands(200, 256, 384, variant)     # M = 200: padded to whole 128-row tiles
    for out_dtype, bound in ((jnp.bfloat16, 2e-3), (jnp.float32, 1e-5)):
        out = fp8_gemm(aq, sa, bq, sb, variant=variant, out_dtype=out_dtype, implementation="pallas",
                       interpret=NAN_INTERPRET)
        assert out.shape == (200, 256) and out.dtype == out_dtype
        assert np.all(np.isfinite(np.asarray(out, np.float32)))
        assert _rel(out, ref) < bound


@pytest.mark.parametrize("variant,cfg,n", [
    ("1d2d", GemmConfig(tile_n=128, wg_dim="m", overlap=False), 256),
    ("1d2d", GemmConfig(tile_n=64, wg_dim="n", overlap=True, stages=2), 256),
    ("1d1d", GemmConfig(tile_n=128, wg_dim="m", overlap=True), 256),
    ("1d1d", GemmConfig(tile_n=128, wg_dim="n", overlap=False, grid_width=2), 256),
    ("1d2d", GemmConfig(tile_n=128, wg_dim="m", cluster="m"), 256),          # B multicast to a CTA pair along M
    ("1d1d", GemmConfig(tile_n=64, wg_dim="n", overlap=True, cluster="n"), 256),  # A (and sa) multicast along N
    # tiles wider than a weight block, N not a multiple of them (partial edge tiles): 1d2d promotion picks one of two
    # block scales per 32-column chunk (tile starts at 0/64 mod 128 for 192, 0/32/64/96 for 160)
    ("1d2d", GemmConfig(tile_n=192), 448),
    ("1d2d", GemmConfig(tile_n=160, wg_dim="n"), 704),
    ("1d1d", GemmConfig(tile_n=160, cluster="n"), 448),        # the pair's second tile lies wholly past N
    ("1d2d", GemmConfig(tile_n=128, b_scale_cols=True), 256),  # 1d2d scales per column from SMEM
])
def test_mosaic_gpu_kernel_interpret(variant, cfg, n):
    """The Hopper kernel in the Mosaic GPU interpreter (one CTA looping over every tile). FP8 wgmma needs the B tile
    K-major through a transposed SMEM view, which the interpreter cannot run: the test feeds B as [K, N] instead
    (``b_kn``, test-only), everything else is the production kernel. Two CTAs (one cluster of two where the config
    asks for clusters) loop over the tiles. (1d2d with tiles wider than 128 in CTA pairs deadlocks in the jax 0.11.2
    interpreter; the GPU check of ``experiments.bench_fp8_gemm`` runs it.)"""
    m, k = 256, 384
    aq, sa, bq, sb, ref = _operands(m, n, k, variant, key=5)
    out = _mgpu_gemm(aq, sa.T, bq.T, _kernel_sb(sb, variant, cfg, n), variant=variant, out_dtype=jnp.float32,
                     cfg=cfg, interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan"), b_kn=True, num_sms=2)
    assert out.shape == (m, n) and np.all(np.isfinite(np.asarray(out)))
    assert _rel(out, ref) < 1e-5


def _grouped_operands(sizes, n, k, key=0):
    """The contiguous m-grouped layout: group g's rows start on a 128-row tile, zero rows pad it to whole tiles,
    one spare tile at the end repeats the last group. Returns quantised operands, tile_group and a float64
    per-row reference (zero rows where no group's row lives)."""
    g = len(sizes)
    tiles = [-(-s // 128) for s in sizes]
    tile_group = np.repeat(np.arange(g), tiles).tolist() + [g - 1]
    m = 128 * len(tile_group)
    ka, kb = jax.random.split(jax.random.key(key))
    a = np.zeros((m, k), np.float32)
    row = 0
    for s, t in zip(sizes, tiles):
        a[row:row + s] = np.asarray(jax.random.normal(jax.random.fold_in(ka, row), (s, k)))
        row += 128 * t
    b = jax.random.normal(kb, (g, n, k)) * 0.05
    aq, sa = act_quant(jnp.asarray(a), implementation="xla")
    bq, sb = zip(*[weight_quant_dual(b[i], implementation="xla")[:2] for i in range(g)])
    bq, sb = jnp.stack(bq), jnp.stack(sb)
    a64 = np.asarray(aq, np.float64) * np.repeat(np.asarray(sa, np.float64), 128, 1)[:, :k]
    b64 = np.asarray(bq, np.float64) * np.repeat(np.repeat(np.asarray(sb, np.float64), 128, 1), 128, 2)[:, :n, :k]
    ref = np.concatenate([a64[128 * t:128 * (t + 1)] @ b64[tile_group[t]].T for t in range(len(tile_group))])
    return aq, sa, bq, sb, jnp.asarray(tile_group, jnp.int32), ref


def test_grouped_gemm_reference_float64():
    from pallas_kernels import fp8_gemm_grouped

    aq, sa, bq, sb, tg, ref = _grouped_operands((100, 0, 300, 1), 256, 384)
    out = fp8_gemm_grouped(aq, sa, bq, sb, tg, out_dtype=jnp.float32, implementation="xla")
    assert out.shape == ref.shape and _rel(out, ref) < 1e-6
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_gemm_grouped(aq[:200], sa[:200], bq, sb, tg)
    aq, sa, bq, sb, tg, _ = _grouped_operands((100,), 256, 200)        # K = 200: the XLA reference only
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_gemm_grouped(aq, sa, bq, sb, tg, implementation="pallas")


def test_tpu_grouped_kernel_interpret():
    """The Mosaic TPU m-grouped kernel (scalar-prefetched tile_group in the weight index map) in interpret mode."""
    from pallas_kernels import fp8_gemm_grouped

    aq, sa, bq, sb, tg, ref = _grouped_operands((100, 0, 300, 1), 256, 384, key=4)
    for out_dtype, bound in ((jnp.bfloat16, 2e-3), (jnp.float32, 1e-5)):
        out = fp8_gemm_grouped(aq, sa, bq, sb, tg, out_dtype=out_dtype, implementation="pallas",
                               interpret=NAN_INTERPRET)
        assert out.shape == ref.shape and out.dtype == out_dtype
        assert np.all(np.isfinite(np.asarray(out, np.float32))) and _rel(out, ref) < bound


@pytest.mark.parametrize("cfg,n", [(GemmConfig(tile_n=128, wg_dim="m"), 256),
                                   (GemmConfig(tile_n=64, wg_dim="n", overlap=True, cluster="n"), 256),
                                   (GemmConfig(tile_n=160), 384)])   # tiles reaching into the next group's rows
def test_mosaic_gpu_grouped_kernel_interpret(cfg, n):
    """The m-grouped Hopper kernel in the Mosaic GPU interpreter (B fed [K, G*N], as in the plain kernel's test):
    every 128-row tile multiplies its group's weight block rows and scales; an empty group and a one-row group
    included; two CTAs loop over the tiles."""
    aq, sa, bq, sb, tg, ref = _grouped_operands((100, 0, 200, 1), n, 256, key=3)
    g, n, k = bq.shape
    b_kn = jnp.concatenate([bq[i].T for i in range(g)], axis=1)                       # [K, G*N]
    out = _mgpu_gemm(aq, sa.T, b_kn, sb.reshape(-1, sb.shape[2]), tg, variant="1d2d", out_dtype=jnp.float32,
                     cfg=cfg, interpret=plgpu.InterpretGPUParams(uninitialized_memory="nan"), b_kn=True, num_sms=2,
                     groups=g)
    assert np.all(np.isfinite(np.asarray(out)))
    assert _rel(out, ref) < 1e-5


def test_mosaic_gpu_grouped_kernel_lowers_for_cuda():
    """Without a GPU: the m-grouped kernel's Mosaic GPU lowering at DeepSeek-V3-like expert shapes."""
    from jax import export

    g, n, k, m = 8, 2048, 7168, 128 * 40
    f = jax.jit(functools.partial(_mgpu_gemm, variant="1d2d", out_dtype=jnp.bfloat16, cfg=GemmConfig(cluster="n"),
                                  num_sms=132, groups=g))
    args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((k // 128, m), jnp.float32),
            jax.ShapeDtypeStruct((g * n, k), jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((g * n // 128, k // 128), jnp.float32), jax.ShapeDtypeStruct((m // 128,), jnp.int32))
    assert "mosaic_gpu" in export.export(f, platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("cfg,out_dtype", [(GemmConfig(tile_n=192, cluster="n"), jnp.bfloat16),
                                           (GemmConfig(tile_n=160), jnp.bfloat16),
                                           (GemmConfig(tile_n=192, cluster="m"), jnp.float32)])
def test_mosaic_gpu_wide_tile_kernel_lowers_for_cuda(cfg, out_dtype):
    """Without a GPU: 1d2d with tiles wider than a weight block (both block scales per step, 32-column chunks) at
    DeepSeek-V3's o_proj shape, N = 7168 not a multiple of either width; CTA pairs included (which the interpreter
    cannot run). Float32 output fits in shared memory through ``fit_config`` (3 stages; 4 do not fit)."""
    from jax import export

    m, n, k = 4096, 7168, 16384
    cfg = fit_config(cfg, m, n, out_dtype=out_dtype)
    assert cfg.stages == (3 if out_dtype == jnp.float32 else 4)
    f = jax.jit(functools.partial(_mgpu_gemm, variant="1d2d", out_dtype=out_dtype, cfg=cfg, num_sms=132))
    args = (jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((k // 128, m), jnp.float32),
            jax.ShapeDtypeStruct((n, k), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((n // 128, k // 128), jnp.float32))
    assert "mosaic_gpu" in export.export(f, platforms=["cuda"])(*args).mlir_module()


def test_gemm_errors():
    aq, sa, bq, sb, _ = _operands(128, 128, 256, "1d2d")
    with pytest.raises(ValueError, match="disagree on K"):
        fp8_gemm(aq, sa, bq[:, :128], sb)
    with pytest.raises(ValueError, match="sb shape"):
        fp8_gemm(aq, sa, bq, sb, variant="1d1d")
    with pytest.raises(ValueError, match="does not support"):
        fp8_gemm(aq[:, :200], sa, bq[:, :200], sb, implementation="pallas")
    with pytest.raises(ValueError, match="unsupported"):
        GemmConfig(tile_n=96)
    with pytest.raises(ValueError, match="registers"):
        GemmConfig(tile_n=192, overlap=True)
    with pytest.raises(ValueError, match="cluster"):
        GemmConfig(cluster="k")


def test_fit_config():
    """Clusters are dropped where the CTA pair does not tile the shape, 64-wide tiles where N % 128 != 0."""
    assert fit_config(GemmConfig(cluster="m"), 4096, 7168).cluster == "m"
    assert fit_config(GemmConfig(cluster="m"), 128, 7168).cluster == "none"       # one CTA row: no pair along M
    assert fit_config(GemmConfig(cluster="n"), 4096, 2112) == GemmConfig(tile_n=64, wg_dim="m")
    assert fit_config(GemmConfig(cluster="n"), 4096, 7168).cluster == "n"
    assert fit_config(GemmConfig(cluster="m"), 256, 2112) == GemmConfig(tile_n=64, wg_dim="m", cluster="m")
    assert fit_config(GemmConfig(tile_n=192), 4096, 2112) == GemmConfig(tile_n=192)     # partial edge tiles


def test_default_config_picks_tile_width_by_waves():
    """The tile widths the session-17 H200 sweep found fastest (docs/benchmarks.md), from speed x wave efficiency."""
    assert default_config(4096, 7168, 16384).tile_n == 160
    assert default_config(4096, 2112, 7168).tile_n == 192
    assert default_config(4096, 24576, 1536) == GemmConfig(tile_n=192, cluster="m")     # short K: B multicast
    assert default_config(4096, 4096, 7168) == GemmConfig(cluster="n")
    assert default_config(4096, 7168, 16384, variant="1d1d") == GemmConfig(cluster="n")   # column scales: 128
    assert default_config(512, 7168, 16384) == GemmConfig(overlap=True)
    assert default_config(128, 2112, 7168) == GemmConfig(tile_n=64, overlap=True)


# ---------------------------------------------------------------------------------------------------------------
# fp8_linear
# ---------------------------------------------------------------------------------------------------------------

def _loss(x, w, **kw):
    return jnp.sum(jnp.sin(fp8_linear(x, w, **kw).astype(jnp.float32)))


def _loss_ref(x, w):
    return jnp.sum(jnp.sin(jnp.einsum("...k,kn->...n", x, w, precision="highest")))


@pytest.mark.parametrize("shape", [(2, 100, 256, 384), (1, 64, 200, 136)])     # second: partial tiles (XLA path)
def test_fp8_linear_values_and_gradients(shape):
    b, t, k, n = shape
    x = jax.random.normal(jax.random.key(6), (b, t, k))
    w = jax.random.normal(jax.random.key(7), (k, n)) * 0.05
    y = jax.jit(fp8_linear)(x, w)
    assert y.shape == (b, t, n) and _rel(y, x @ w) < 0.06
    g = jax.jit(jax.grad(_loss, argnums=(0, 1)))(x, w)
    g_ref = jax.grad(_loss_ref, argnums=(0, 1))(x, w)
    for a, r in zip(g, g_ref):
        assert a.shape == r.shape and _rel(a, r) < 0.06
    # checkpoint layout gives the same result
    np.testing.assert_array_equal(fp8_linear(x, w.T, w_layout="nk"), y)


@pytest.mark.parametrize("k,n", [(256, 128), (200, 136)])     # second: K and N zero-padded to whole tiles
def test_fp8_linear_pallas_interpret_matches_xla(k, n):
    x = jax.random.normal(jax.random.key(8), (200, k)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(9), (k, n)) * 0.05
    res = {impl: jax.value_and_grad(functools.partial(_loss, implementation=impl), argnums=(0, 1))(x, w)
           for impl in ("xla", "pallas")}
    for a, b in zip(jax.tree.leaves(res["pallas"]), jax.tree.leaves(res["xla"])):
        assert _rel(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 2e-3


def test_fp8_linear_check_grads_without_quantisation():
    """Unquantised, the layer is bilinear in (x, w): check_grads' central differences are exact for it at any step,
    so a large step (0.1) leaves only float32 rounding (at 1e-4 the rounding of f, divided by the step, was ~2e-3
    relative: a tolerance of 1e-3 failed or passed with the compiler's summation order)."""
    x = jax.random.normal(jax.random.key(10), (4, 16))
    w = jax.random.normal(jax.random.key(11), (16, 8))
    check_grads(lambda x, w: fp8_linear(x, w, quantize=False, implementation="xla"), (x, w),
                order=1, modes=["rev"], atol=1e-4, rtol=1e-4, eps=0.1)


@pytest.mark.parametrize("gemm", ["fwd", "dgrad", "wgrad"])
def test_fp8_linear_quantize_one_gemm(gemm):
    """``quantize=(gemm,)``: that GEMM matches the fully quantised layer, the others the unquantised one (a fixed
    cotangent, so dY is the same in all three runs); partial tiles (M=200, N=136) included."""
    x = jax.random.normal(jax.random.key(12), (200, 256))
    w = jax.random.normal(jax.random.key(13), (256, 136)) * 0.05
    c = jax.random.normal(jax.random.key(14), (200, 136))

    def run(q):
        y, vjp = jax.vjp(lambda x, w: fp8_linear(x, w, quantize=q, implementation="xla"), x, w)
        return (y, *vjp(c))                                               # (y, dx, dw)

    full, none, one = run(True), run(False), run((gemm,))
    assert _rel(full[0], none[0]) > 1e-2                                 # quantisation is visible at all
    for i, name in enumerate(("fwd", "dgrad", "wgrad")):
        want = full[i] if name == gemm else none[i]
        assert _rel(one[i], want) < 1e-5, (name, _rel(one[i], want))
    np.testing.assert_array_equal(run(())[0], none[0])
    with pytest.raises(ValueError, match="quantize"):
        fp8_linear(x, w, quantize=("forward",))


def test_fp8_linear_vmap_and_shard_map():
    x = jax.random.normal(jax.random.key(12), (8, 128, 256))
    w = jax.random.normal(jax.random.key(13), (256, 128)) * 0.05
    loop = jnp.stack([fp8_linear(x[i], w) for i in range(8)])
    np.testing.assert_allclose(jax.vmap(fp8_linear, in_axes=(0, None))(x, w), loop, rtol=1e-6)
    gv = jax.vmap(jax.grad(_loss, argnums=1), in_axes=(0, None))(x, w)
    gl = jnp.stack([jax.grad(_loss, argnums=1)(x[i], w) for i in range(8)])
    np.testing.assert_allclose(gv, gl, rtol=1e-5, atol=1e-6)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    P = jax.sharding.PartitionSpec

    @jax.jit
    def sharded(x, w):
        f = jax.shard_map(lambda x, w: fp8_linear(x, w), mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
        return f(x, w)

    np.testing.assert_allclose(sharded(x, w), loop, rtol=1e-6)

    # gradients inside shard_map: the replicated weight's gradient sums the token shards' contributions
    def sharded_loss(x, w):
        f = jax.shard_map(lambda x, w: jax.lax.psum(_loss(x, w), "data"), mesh=mesh, in_specs=(P("data"), P()),
                          out_specs=P())
        return f(x.reshape(-1, x.shape[-1]), w)

    gx, gw = jax.jit(jax.grad(sharded_loss, argnums=(0, 1)))(x, w)
    rx, rw = jax.grad(lambda x, w: _loss(x.reshape(-1, x.shape[-1]), w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gw, rw, rtol=1e-4, atol=1e-4)   # |gw| ~ 50: f32 sums in another order
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
def test_mosaic_gpu_kernel_on_gpu():
    for variant in ("1d2d", "1d1d"):
        aq, sa, bq, sb, ref = _operands(1000, 2112, 1024, variant)
        for out_dtype, bound in ((jnp.bfloat16, 2e-3), (jnp.float32, 5e-4)):
            f = jax.jit(lambda *a: fp8_gemm(*a, variant=variant, out_dtype=out_dtype, implementation="pallas"))
            f.lower(aq, sa, bq, sb).compile()
            jnp.full((1000, 2112), jnp.nan, out_dtype).block_until_ready().delete()   # poison the allocator
            out = np.asarray(f(aq, sa, bq, sb), np.float32)
            assert np.all(np.isfinite(out)) and _rel(out, ref) < bound


@pytest.mark.gpu
def test_mosaic_gpu_grouped_kernel_on_gpu():
    from pallas_kernels import fp8_gemm_grouped

    aq, sa, bq, sb, tg, ref = _grouped_operands((300, 0, 1000, 1, 129), 512, 1024)
    for cfg in (None, GemmConfig(tile_n=64, wg_dim="m"), GemmConfig(cluster="n")):
        f = jax.jit(lambda *a: fp8_gemm_grouped(*a, out_dtype=jnp.float32, implementation="pallas", config=cfg))
        f.lower(aq, sa, bq, sb, tg).compile()
        jnp.full(ref.shape, jnp.nan, jnp.float32).block_until_ready().delete()          # poison the allocator
        out = np.asarray(f(aq, sa, bq, sb, tg))
        assert np.all(np.isfinite(out)) and _rel(out, ref) < 5e-4, cfg


@pytest.mark.gpu
def test_grouped_fp8_linear_on_gpu_matches_the_dequantised_path():
    """fp8_grouped_linear on Hopper: gemm="auto" picks the grouped FP8 GEMM, whose forward and activation gradient
    match the dequantised path up to its BF16 rounding of the scaled operands (measured on an H200: 3.0e-3) and
    whose weight gradient matches up to summation order (measured: 3e-5); empty and partial groups included."""
    import importlib

    fl = importlib.import_module("pallas_kernels.fp8_linear")
    assert fl.grouped_fp8_gemm_on_mosaic_gpu(512, 256)
    sizes = jnp.array([300, 0, 1000, 1, 129, 70], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (1500, 512), jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (6, 512, 256), jnp.float32) * 0.05).astype(jnp.bfloat16)
    c = jax.random.normal(jax.random.key(2), (1500, 256), jnp.float32)

    def run(gemm):
        f = lambda x, w: jnp.sum(fl.fp8_grouped_linear(x, w, sizes, gemm=gemm).astype(jnp.float32) * c)  # noqa
        y = jax.jit(lambda x, w: fl.fp8_grouped_linear(x, w, sizes, gemm=gemm))(x, w)
        return (y, *jax.jit(jax.grad(f, argnums=(0, 1)))(x, w))

    auto, fp8, deq = run("auto"), run("fp8"), run("bf16")
    for a, b in zip(auto, fp8):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    for name, a, b, tol in zip(("y", "dx", "dw"), fp8, deq, (1e-2, 1e-2, 1e-3)):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        assert _rel(np.asarray(a[:1500], np.float32), np.asarray(b[:1500], np.float32)) < tol, name


def test_tiny_model_trains_in_fp8_close_to_reference():
    """ModelConfig(fp8=True): MLA projections, dense MLP and expert matmuls through fp8_linear/fp8_grouped_linear
    (XLA path on CPU, partial tiles since the tiny dims are not multiples of 128). Same init and batch as the
    unquantised run: every loss finite, learning, and within 3% of the reference at every step."""
    import dataclasses

    from flax import nnx

    from dsjax.model import Transformer
    from dsjax.train import OptimConfig, make_train_step, split_model
    from dsjax.train.config import tiny as tiny_preset
    from dsjax.train.step import init_state

    base = tiny_preset(steps=100, optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"))
    b, t = 4, 32
    batch = {"tokens": jax.random.randint(jax.random.key(0), (b, t), 3, 200),
             "segment_ids": jnp.ones((b, t), jnp.int32), "positions": jnp.arange(t)[None].repeat(b, 0),
             "loss_mask": jnp.ones((b, t), jnp.int32)}
    losses = {}
    for fp8 in (False, True):
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, fp8=fp8))
        graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
        step = jax.jit(make_train_step(cfg, graphdef, p, r))
        state = init_state(cfg, jax.random.key(0))
        losses[fp8] = []
        for _ in range(6):
            state, m = step(state, batch)
            losses[fp8].append(float(m["loss"]))
    ref, q = np.array(losses[False]), np.array(losses[True])
    assert np.all(np.isfinite(q)) and q[-1] < q[0] - 0.3, q
    assert np.any(q != ref)                      # the FP8 path is really in use
    assert np.all(np.abs(q - ref) / ref < 0.03), (q, ref)


@pytest.mark.parametrize("grouped", [False, True])
def test_fp8_gradients_of_small_magnitude(grouped):
    """Gradients of a batch-mean loss are small (most 1x128 tiles of dY far below 1e-4 in a real run): each tile's
    scale must come from its own amax. With the quantisation ops' default eps (1e-4) the scale was clamped, dY / s
    landed among E4M3's subnormals: 13-14% error in both gradients at this scale (within 6% now)."""
    from pallas_kernels import fp8_grouped_linear

    kx, kw = jax.random.split(jax.random.key(22))
    x = jax.random.normal(kx, (256, 256))
    w = jax.random.normal(kw, (256, 256)) * 0.05
    sizes = jnp.array([100, 156], jnp.int32)

    def loss(x, w, quantised):
        if not quantised:
            y = x @ w
        elif grouped:
            y = fp8_grouped_linear(x, jnp.stack([w, w]), sizes, compute_dtype=jnp.float32, implementation="xla")
        else:
            y = fp8_linear(x, w, implementation="xla")
        return 1e-9 * jnp.sum(jnp.sin(y.astype(jnp.float32)))

    with jax.default_matmul_precision("highest"):
        g_ref = jax.grad(loss, argnums=(0, 1))(x, w, False)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, w, True)
    dw = g[1].sum(0) if grouped and g[1].ndim == 3 else g[1]
    assert _rel(g[0], g_ref[0]) < 0.06 and _rel(dw, g_ref[1]) < 0.06, (_rel(g[0], g_ref[0]), _rel(dw, g_ref[1]))


def test_fp8_grouped_linear_fp8_gemm_matches_dequantised_path():
    """gemm="fp8" (the m-grouped FP8 GEMM on the contiguous 128-row-tile layout, forward and dgrad) computes what
    the default quantise-dequantise path computes: the same quantised operands, f32 compute here, so only the
    summation order differs; an empty group, a partial last tile and rows past the groups (zeros) included."""
    from pallas_kernels import fp8_grouped_linear

    sizes = jnp.array([100, 0, 150, 20], jnp.int32)                  # 270 of 300 rows
    kx, kw, kd = jax.random.split(jax.random.key(31), 3)
    x = jax.random.normal(kx, (300, 256))
    w = jax.random.normal(kw, (4, 256, 384)) * 0.05
    dy = jax.random.normal(kd, (300, 384))

    def run(gemm):
        y, vjp = jax.vjp(lambda x, w: fp8_grouped_linear(x, w, sizes, compute_dtype=jnp.float32,
                                                         implementation="xla", gemm=gemm), x, w)
        return (y, *vjp(dy))

    ref, got = run("bf16"), jax.jit(lambda: run("fp8"))()
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert _rel(a[:270], b[:270]) < 1e-5, (name, _rel(a[:270], b[:270]))
    assert not np.any(np.asarray(got[0][270:])) and not np.any(np.asarray(got[1][270:]))
    with pytest.raises(ValueError, match="gemm"):
        fp8_grouped_linear(x, w, sizes, gemm="fp16")


@pytest.mark.parametrize("f", [128, 64])
def test_fused_gate_up_quantises_as_separate_gemms(f):
    """expert_ffn runs gate and up as one grouped GEMM on [G, D, 2F]; under FP8 that is fused only when F % 128 == 0,
    where no weight block or gradient tile straddles the two, so output and gradients equal the separate GEMMs' up to
    summation order (F = 64 keeps them separate: exactly equal)."""
    from pallas_kernels import fp8_grouped_linear

    from dsjax.model.moe import expert_ffn

    sizes = jnp.array([70, 0, 130, 40], jnp.int32)
    ks = jax.random.split(jax.random.key(5), 5)
    xs = jax.random.normal(ks[0], (240, 256))
    wg, wu = (jax.random.normal(k, (4, 256, f)) * 0.05 for k in ks[1:3])
    wd = jax.random.normal(ks[3], (4, f, 256)) * 0.05
    dy = jax.random.normal(ks[4], (240, 256))

    def separate(xs, wg, wu, wd):
        gmm = functools.partial(fp8_grouped_linear, group_sizes=sizes, compute_dtype=jnp.float32,
                                implementation="xla", gemm="bf16")
        return gmm(jax.nn.silu(gmm(xs, wg)) * gmm(xs, wu), wd)

    fused = functools.partial(expert_ffn, group_sizes=sizes, implementation="xla", dtype=jnp.float32, fp8="bf16")
    y0, vjp0 = jax.vjp(separate, xs, wg, wu, wd)
    y1, vjp1 = jax.vjp(fused, xs, wg, wu, wd)
    for name, a, b in zip(("y", "dx", "dwg", "dwu", "dwd"), (y1, *vjp1(dy)), (y0, *vjp0(dy))):
        assert _rel(a, b) < (1e-5 if f % 128 == 0 else 1e-7), (name, _rel(a, b))


def test_model_with_fp8_grouped_gemm_matches_default():
    """ModelConfig.fp8_grouped_gemm="fp8" (tiny, float32 compute, unscanned): loss and gradients equal the default
    FP8 expert path's up to summation order; an unknown mode is a config error."""
    from flax import nnx

    from dsjax import configs
    from dsjax.model import Transformer

    ids = jax.random.randint(jax.random.key(2), (2, 32), 3, 200)

    def loss_and_grads(mode):
        cfg = configs.tiny(fp8=True, fp8_grouped_gemm=mode, dtype="float32", scan_layers=False,
                           num_nextn_predict_layers=0)
        gd, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        f = lambda p: jnp.mean(nnx.merge(gd, p, rest)(ids).logits.astype(jnp.float32) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(f))(params)

    (l0, g0), (l1, g1) = loss_and_grads("bf16"), loss_and_grads("fp8")
    assert abs(float(l1) / float(l0) - 1) < 1e-5
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert _rel(a, b) < 1e-4
    with pytest.raises(ValueError, match="fp8_grouped_gemm"):
        configs.tiny(fp8_grouped_gemm="fp16")
    assert configs.tiny().fp8_grouped_gemm == "auto"


def test_fp8_grouped_gemm_auto_picks_the_grouped_fp8_kernel_only_on_hopper(monkeypatch):
    """gemm="auto" (the ModelConfig default) runs the m-grouped FP8 GEMM where its Mosaic GPU kernel runs: a Hopper
    GPU, a Mosaic-capable implementation, K and N multiples of 128; elsewhere (here: CPU) the dequantised path,
    bit for bit."""
    import importlib

    fl = importlib.import_module("pallas_kernels.fp8_linear")   # (the package's fp8_linear is the function)

    assert not fl.grouped_fp8_gemm_on_mosaic_gpu(256, 128)             # CPU
    monkeypatch.setattr(fl.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(fl.hardware, "is_hopper", lambda: True)
    assert fl.grouped_fp8_gemm_on_mosaic_gpu(256, 128)
    assert fl.grouped_fp8_gemm_on_mosaic_gpu(256, 128, "mosaic_gpu")
    assert not fl.grouped_fp8_gemm_on_mosaic_gpu(256, 128, "xla")
    assert not fl.grouped_fp8_gemm_on_mosaic_gpu(256, 192)
    assert not fl.grouped_fp8_gemm_on_mosaic_gpu(200, 128)
    monkeypatch.setattr(fl.hardware, "is_hopper", lambda: False)
    assert not fl.grouped_fp8_gemm_on_mosaic_gpu(256, 128)
    monkeypatch.undo()

    x = jax.random.normal(jax.random.key(0), (300, 256), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 256, 128), jnp.float32) * 0.05
    sizes = jnp.array([100, 0, 200], jnp.int32)
    f = lambda gemm: jax.value_and_grad(  # noqa: E731
        lambda x, w: jnp.sum(fl.fp8_grouped_linear(x, w, sizes, gemm=gemm).astype(jnp.float32) ** 2), (0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(f("auto")), jax.tree.leaves(f("bf16"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fp8_grouped_weight_gradient_groups_never_straddle_experts():
    """fp8_grouped_linear's weight gradient quantises x and dY in 128-token groups that start at each expert's
    first row (DeepSeek pads every expert to 128 rows). Expert 0 has 100 rows at 1e-5 the scale of expert 1's: a
    128-row group over the sorted stream would give them expert 1's scale, which puts them among E4M3's subnormals
    (x / s ~ 4e-3 against a spacing of 2^-9) and loses most of their digits."""
    from pallas_kernels import fp8_grouped_linear

    sizes = jnp.array([100, 156], jnp.int32)
    kx, kw, kd = jax.random.split(jax.random.key(21), 3)
    x = jax.random.normal(kx, (256, 128)) * jnp.where(jnp.arange(256) < 100, 1e-5, 1.0)[:, None]
    w = jax.random.normal(kw, (2, 128, 128)) * 0.05
    dy = jax.random.normal(kd, (256, 128))

    def loss(w, quantised):
        if quantised:
            y = fp8_grouped_linear(x, w, sizes, compute_dtype=jnp.float32, implementation="xla")
        else:
            y = jnp.concatenate([jnp.dot(x[:100], w[0], precision="highest"),
                                 jnp.dot(x[100:], w[1], precision="highest")])
        return jnp.sum(y.astype(jnp.float32) * dy)

    dw, dw_ref = jax.grad(loss)(w, True), jax.grad(loss)(w, False)
    for e in range(2):  # both operands quantised (~3.7% each): within 6% per expert, the small one included
        assert _rel(dw[e], dw_ref[e]) < 0.06, e


@pytest.mark.parametrize("sizes", [(100, 0, 300, 57), (0, 0, 0, 0), (128, 256, 1, 0), (0, 3, 0, 400)])
def test_qdq_expert_tokens_matches_numpy(sizes):
    """The weight gradient's 128-token groups of fp8_grouped_linear against a NumPy reference: each expert's rows cut
    into 128-row groups from its first row, per-column scales from the group's own rows; rows past the experts
    (here huge garbage) change no valid row. Equal up to one f32 rounding of the scale (XLA may divide by 448 as a
    multiply by its reciprocal); rows scaled by another group's amax would differ far more."""
    from pallas_kernels.fp8_linear import EPS, _qdq_expert_tokens

    rng = np.random.default_rng(sum(sizes))
    m, tot = 512, sum(sizes)
    x = (rng.standard_normal((m, 192)) * np.exp(2 * rng.standard_normal((m, 1)))).astype(np.float32)
    x[tot:] = 1e6
    got = np.asarray(jax.jit(_qdq_expert_tokens, static_argnums=2)(jnp.asarray(x), jnp.asarray(sizes, jnp.int32),
                                                                   jnp.float32))
    want = np.zeros_like(x)
    start = 0
    for n in sizes:
        for g0 in range(start, start + n, 128):
            blk = x[g0:min(g0 + 128, start + n)]
            s = (np.maximum(np.abs(blk).max(0), np.float32(EPS)) / np.float32(448)).astype(np.float32)
            q = np.clip(blk * (np.float32(1) / s), -448, 448).astype(ml_dtypes.float8_e4m3fn)
            want[g0:g0 + len(blk)] = q.astype(np.float32) * s
        start += n
    np.testing.assert_allclose(got[:tot], want[:tot], rtol=5e-7, atol=0)
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("scan", [False, True])
def test_fp8_bf16_layers_keeps_leading_layers_in_bf16(scan):
    """ModelConfig.fp8_bf16_layers=N: the first N decoder layers build their projections without fp8_compute (BF16),
    the rest with it; with scan_layers the split must be the dense/MoE stack boundary. The model still runs."""
    from flax import nnx

    from dsjax import configs
    from dsjax.model import Transformer
    from dsjax.model.layers import Linear

    cfg = configs.tiny(fp8=True, fp8_bf16_layers=1, scan_layers=scan)       # tiny: first_k_dense_replace=1
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    first = model.dense_layers if scan else model.layers[0]
    rest = [model.moe_layers] if scan else list(model.layers)[1:]
    assert [m.fp8_compute for _, m in nnx.iter_graph(first) if isinstance(m, Linear)] and not any(
        m.fp8_compute for _, m in nnx.iter_graph(first) if isinstance(m, Linear))
    assert all(m.fp8_compute for r in rest for _, m in nnx.iter_graph(r) if isinstance(m, Linear))
    if not scan:                                                            # one jitted forward runs
        gd, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
        logits = jax.jit(lambda st, ids: nnx.merge(gd, st)(ids).logits)(state, jnp.ones((1, 16), jnp.int32))
        assert np.all(np.isfinite(np.asarray(logits)))
    with pytest.raises(ValueError, match="fp8_bf16_layers"):
        configs.tiny(fp8_bf16_layers=2, scan_layers=True)
    with pytest.raises(ValueError, match="fp8_bf16_layers"):
        configs.tiny(fp8_bf16_layers=4)


def test_fp8_bf16_projections_keeps_named_projections_in_bf16():
    """ModelConfig.fp8_bf16_projections: the named projections build without fp8_compute in every layer (MLA and
    MLP names), every other projection keeps it; the router never uses it; unknown names are rejected."""
    from flax import nnx

    from dsjax import configs
    from dsjax.model import Transformer
    from dsjax.model.layers import Linear

    keep = ("kv_a_proj_with_mqa", "kv_b_proj", "down_proj")
    cfg = configs.tiny(fp8=True, fp8_bf16_projections=keep)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    seen = {}
    for path, m in nnx.iter_graph(model):
        if isinstance(m, Linear):
            seen.setdefault(str(path[-1]), set()).add(m.fp8_compute)
    assert set(keep) <= set(seen) and seen.pop("lm_head") == {False}            # the output head stays BF16
    seen.pop("eh_proj", None)                                                   # MTP's projection: not named
    assert set(seen) <= set(configs.FP8_PROJECTIONS)
    for name, flags in seen.items():
        assert flags == ({False} if name in keep else {True}), (name, flags)
    plain = nnx.eval_shape(lambda: Transformer(configs.tiny(fp8=False, fp8_bf16_projections=keep), rngs=nnx.Rngs(0)))
    assert not any(m.fp8_compute for _, m in nnx.iter_graph(plain) if isinstance(m, Linear))
    with pytest.raises(ValueError, match="fp8_bf16_projections.*kv_proj"):
        configs.tiny(fp8=True, fp8_bf16_projections=("kv_proj",))
    with pytest.raises(ValueError, match="fp8_bf16_projections.*tuple"):
        configs.tiny(fp8=True, fp8_bf16_projections="kv_b_proj")
    assert "fp8_bf16_projections" not in cfg.to_hf_config()
