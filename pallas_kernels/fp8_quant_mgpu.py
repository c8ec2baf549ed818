"""Mosaic GPU (Hopper) kernel for the FP8 E4M3 quantisation ops of ``fp8_quant`` (``implementation="pallas"`` on
GPUs): same values, scales and output layouts as the XLA reference there (``fp8_quant`` does the final reshapes).

Letters: ``M`` rows, ``K`` columns (the 1x128 axis), ``Kb = ceil(K/128)``, ``Mb = ceil(M/128)``, ``bm`` rows per
tile. One kernel serves every op. ``x [M, K]`` is cut into ``[bm, 128]`` tiles; each tile is read from HBM exactly
once (TMA into 128-byte-swizzled SMEM), loaded into registers (WGMMA layout, one warpgroup per CTA), reduced to
its amax in float32 and written as every requested output (``mode``):

* ``rows``  (1x128 tiles, ``act_quant``): ``q [M, K]`` e4m3 and the row scales stored MN-major, ``sT [Kb, M]``
  (a TMA box needs >= 16 contiguous bytes; a ``[bm, 1]`` column of scales has 4). ``fp8_quant`` transposes
  ``sT`` with XLA (4 bytes per 128 elements: ~1.6% of a bf16 input's bytes).
* ``cols``  (128x1 tiles, ``act_quant_t``): ``qt [K, M]`` e4m3 (the tile transposed) and ``stT [Mb, K]``.
* ``dual``  (``act_quant_dual``): both of the above from the same registers.
* ``block`` (128x128 blocks, ``weight_quant_dual``): ``q``, ``qt`` and the block scale broadcast over a
  128-float row of ``sb [Mb, Kb * 128]`` (a splat of 128 is the smallest Mosaic GPU stores; 0.8% extra bytes).

The transpose: Mosaic GPU has no register transpose and (before Blackwell) no transposed 8-bit SMEM store, so the
quantised tile is written as f16 (exact for every e4m3 value) through a transposed view of an SMEM staging tile
(16-bit transposed stores are supported), read back in row order, cast to e4m3 and TMA-stored as rows of ``qt``.

Grid and pipeline: a plain CUDA grid ``(Mb, Kb / steps)`` of one-warpgroup CTAs. Each CTA walks ``steps``
consecutive column tiles of one row strip with ``plgpu.emit_pipeline`` (``stages`` input tiles in flight, so the
next tiles' TMA loads overlap the current tile's math) and stores every output through ``out_bufs`` SMEM buffers
with asynchronous TMA stores (one commit group per step; a buffer is reused once its previous store has read it).
``choose_tiling`` picks the tiling measured best on an H200: for activations one input tile in flight and single
output buffers, so that two CTAs share an SM (the math, not the bandwidth, limited one CTA per SM).

Scale: ``s = max(amax, eps) / 448`` (IEEE division, as the reference), optionally rounded up to the next power
of two from the float's bits (``fp8_quant._pow2_ceil``: exact; ``exp2(ceil(log2(s)))`` was not, on the GPU nor on
the CPU interpreter); ``q = e4m3(clip(x * (1 / s), -448, 448))`` with one IEEE reciprocal per scale (not a
division per element: the dual kernel was instruction-bound at one warpgroup per SM), so the kernel is bit-exact
against the reference.

Shapes: ``M % 16 == 0`` and ``K % 16 == 0`` (TMA row strides must be 16-byte aligned); other shapes raise a
ValueError naming the shape. Partial 128-tiles at the edges are zero-padded to whole tiles before the kernel and
the outputs sliced (zeros leave an amax unchanged, as the reference's zero padding): Mosaic GPU's tiled TMA copies
reject a partial edge tile unless the dimension is a multiple of the tile width (found on an H100: K = 1040).

CPU testing: ``interpret=plgpu.InterpretGPUParams(...)`` runs this exact kernel (transposed SMEM views included) in
the Mosaic GPU interpreter; ``jax.export(..., platforms=["cuda"])`` runs its Mosaic GPU lowering (layout
inference, SMEM budget) without a GPU.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.fp8_quant import _pow2_ceil
from pallas_kernels.grouped_matmul import vary_like

__all__ = ["mgpu_quant", "mgpu_quant_supported", "choose_tiling"]

BLOCK = 128
E4M3_MAX = 448.0
SWIZZLE = 128                      # bytes: one 128-byte swizzle row = 128 e4m3 = 64 bf16 = 32 f32
TARGET_CTAS = 264                  # ~2 CTAs per SM on H100/H200 (132 SMs)
SMEM_BUDGET = 224 * 1024           # of the 232,448 B a Hopper CTA may use; the rest: barriers, reduction scratch
Mode = Literal["rows", "cols", "dual", "block"]


def _tr(dtype):
    """TMA/SMEM transforms for a [rows, 128] tile: 8-row tiles of one 128-byte swizzle row."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return (plgpu.TilingTransform((8, SWIZZLE // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(SWIZZLE))


def _scale(amax, eps: float, pow2_scale: bool):
    s = jnp.maximum(amax, eps) / E4M3_MAX
    if pow2_scale:
        s = _pow2_ceil(s)      # exact, from the bits (as the reference)
    return s


def _cast(x, inv):
    """``inv``: the broadcast reciprocal of the scale (``1 / s`` computed once per scale, as the reference)."""
    return jnp.clip(x * inv, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def mgpu_quant_supported(shape, mode: Mode) -> bool:
    """TMA needs 16-byte-aligned row strides: ``K % 16 == 0`` (rows of ``x``/``q``) and ``M % 16 == 0`` (rows of
    ``qt`` and of the MN-major scales). Partial 128-tiles are zero-padded by :func:`mgpu_quant` (zeros do not
    change an amax, exactly like the reference's zero padding)."""
    del mode
    m, k = shape
    return m > 0 and k > 0 and m % 16 == 0 and k % 16 == 0


def smem_bytes(mode: Mode, bm: int, stages: int, in_dtype, out_bufs: int = 2) -> int:
    """SMEM of one CTA: ``stages`` input tiles, ``out_bufs`` buffers per output, the f16 transpose staging tile."""
    n = stages * bm * BLOCK * jnp.dtype(in_dtype).itemsize
    if mode in ("rows", "dual", "block"):
        n += out_bufs * (bm * BLOCK + 4 * (bm if mode != "block" else BLOCK))  # q, sT / sb
    if mode in ("cols", "dual", "block"):
        n += out_bufs * BLOCK * bm + 2 * BLOCK * bm                            # qt, f16 staging
    if mode in ("cols", "dual"):
        n += out_bufs * 4 * BLOCK                                              # stT
    return n


def choose_tiling(m: int, k: int, mode: Mode, in_dtype=jnp.bfloat16) -> tuple[int, int, int, int]:
    """(bm, steps, stages, out_bufs), 128-row tiles, from a sweep on an H200 (docs/benchmarks.md, 8192x7168):

    * activations (``rows``/``cols``/``dual``): the kernel is bound by its per-element math at one warpgroup per
      CTA, so occupancy wins: one input tile in flight and one buffer per output (dual: ~97 KB of SMEM, two CTAs
      per SM; 80% of copy bandwidth against 61% with double buffering), ``steps`` = 2 column tiles per CTA when
      that still leaves >= TARGET_CTAS CTAs, else 1.
    * weights (``block``, f32 in): two input tiles in flight, one buffer per output (one CTA per SM either way),
      ``steps`` = the largest divisor of Kb (<= 16) leaving >= TARGET_CTAS CTAs."""
    bm = BLOCK
    kb, mt = -(-k // BLOCK), -(-m // bm)
    if mode != "block":
        return bm, (2 if kb % 2 == 0 and mt * (kb // 2) >= TARGET_CTAS else 1), 1, 1
    divisors = [d for d in range(1, min(kb, 16) + 1) if kb % d == 0]
    good = [d for d in divisors if mt * (kb // d) >= TARGET_CTAS]
    stages = 2 if smem_bytes(mode, bm, 2, in_dtype, 1) <= SMEM_BUDGET else 1
    return bm, (max(good) if good else 1), stages, 1


def mgpu_quant(x: jax.Array, *, mode: Mode, eps: float = 1e-4, pow2_scale: bool = False, bm: int | None = None,
               steps: int | None = None, stages: int | None = None, out_bufs: int | None = None,
               interpret=None) -> tuple[jax.Array, ...]:
    """Runs the kernel on ``x [M, K]``; returns the outputs in the *kernel's* layouts (see the module docstring):
    ``rows -> (q, sT [Kb, M])``, ``cols -> (qt, stT [Mb, K])``, ``dual -> (q, sT, qt, stT)``,
    ``block -> (q, qt, sb [Mb, Kb * 128])``. ``bm``/``steps``/``stages`` override ``choose_tiling``;
    ``out_bufs`` (1 or 2) SMEM buffers per output (1: less SMEM, so two CTAs may share an SM)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    if x.ndim != 2:
        raise ValueError(f"mgpu_quant expects a 2-D array, got shape {x.shape}")
    m, k = x.shape
    if not mgpu_quant_supported(x.shape, mode):
        raise ValueError(f"FP8 quantisation on GPU (Mosaic GPU kernel) needs M % 16 == 0 and K % 16 == 0 (TMA "
                         f"row alignment); got x.shape = {x.shape}. Fix: implementation='xla' (or 'auto'), or pad "
                         f"the array")
    if m % BLOCK or k % BLOCK:
        # Mosaic GPU's TMA copies with tiling transforms accept a partial tile at the edge only when the array's
        # dimension is a multiple of the tile's width (64 bf16 / 32 f32 / 128 e4m3 columns), so partial 128-tiles
        # are zero-padded here (zeros leave every amax unchanged, as the reference's padding) and the outputs
        # sliced back: one extra copy of x, for edge shapes only
        mp, kp = -(-m // BLOCK) * BLOCK, -(-k // BLOCK) * BLOCK
        out = mgpu_quant(jnp.pad(x, ((0, mp - m), (0, kp - k))), mode=mode, eps=eps, pow2_scale=pow2_scale,
                         bm=bm, steps=steps, stages=stages, out_bufs=out_bufs, interpret=interpret)
        shapes = {"rows": ((m, k), (-1, m)), "cols": ((k, m), (-1, k)), "dual": ((m, k), (-1, m), (k, m), (-1, k)),
                  "block": ((m, k), (k, m), (-1, -1))}[mode]
        return tuple(o[:a if a >= 0 else None, :b if b >= 0 else None] for o, (a, b) in zip(out, shapes))
    d_bm, d_steps, d_stages, d_bufs = choose_tiling(m, k, mode, x.dtype)
    bm, steps, stages, out_bufs = bm or d_bm, steps or d_steps, stages or d_stages, out_bufs or d_bufs
    if bm not in (64, 128) or (mode != "rows" and bm != BLOCK):
        raise ValueError(f"mgpu_quant: bm={bm} is unsupported for mode {mode!r}; use 128 (or 64 for 'rows')")
    if out_bufs not in (1, 2):
        raise ValueError(f"mgpu_quant: out_bufs={out_bufs}; use 1 or 2")
    if smem_bytes(mode, bm, stages, x.dtype, out_bufs) > SMEM_BUDGET:
        raise ValueError(f"mgpu_quant: bm={bm}, stages={stages} needs "
                         f"{smem_bytes(mode, bm, stages, x.dtype, out_bufs)} "
                         f"bytes of SMEM for mode {mode!r} and {x.dtype} input (limit {SMEM_BUDGET}); use fewer "
                         f"stages")
    kb, mt = -(-k // BLOCK), -(-m // bm)
    if kb % steps:
        raise ValueError(f"mgpu_quant: steps={steps} must divide ceil(K/128)={kb}")
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    rows, cols, block = mode in ("rows", "dual"), mode in ("cols", "dual"), mode == "block"
    f8_tr = _tr(f8)

    # Outputs: (shape, dtype, SMEM block, transforms, block index (row, col) of step column c).
    outs = []
    if rows or block:                                                     # q [M, K]
        outs.append(((m, k), f8, (bm, BLOCK), f8_tr, lambda i, c: (i * bm, c * BLOCK)))
    if rows:                                                              # sT [Kb, M]
        outs.append(((kb, m), f32, (1, bm), (), lambda i, c: (c, i * bm)))
    if cols or block:                                                     # qt [K, M]
        outs.append(((k, m), f8, (BLOCK, BLOCK), f8_tr, lambda i, c: (c * BLOCK, i * BLOCK)))
    if cols:                                                              # stT [Mb, K]
        outs.append(((mt, k), f32, (1, BLOCK), (), lambda i, c: (i, c * BLOCK)))
    if block:                                                             # sb [Mb, Kb * 128]
        outs.append(((mt, kb * BLOCK), f32, (1, BLOCK), (), lambda i, c: (i, c * BLOCK)))

    def store_t(ref, val, tmp):
        """``ref [128, bm]`` (SMEM block of qt, e4m3) <- ``val [bm, 128]`` (e4m3) transposed. Mosaic GPU has no
        register transpose and no transposed 8-bit SMEM store before Blackwell, so the tile goes through ``tmp``,
        an f16 SMEM buffer (every e4m3 value is exact in f16), written through a transposed view (16-bit
        transposed stores are supported) and read back untransposed."""
        tmp.transpose((1, 0))[...] = val.astype(jnp.float16)
        ref[...] = tmp[...].astype(f8)

    def compute(x_smem, o, tmp):
        x = plgpu.layout_cast(x_smem[...], plgpu.Layout.WGMMA).astype(f32)        # [bm, 128]
        a = jnp.abs(x)
        if block:
            q_ref, qt_ref, s_ref = o
            s = _scale(jnp.max(jnp.max(a, axis=1), axis=0), eps, False)            # scalar
            # the power-of-two rounding works on bits, which Mosaic GPU lowers for vectors only: round broadcasts
            s_row = lax.broadcast_in_dim(s, (BLOCK,), ())
            s_all = lax.broadcast_in_dim(s, x.shape, ())
            if pow2_scale:
                s_row, s_all = _pow2_ceil(s_row), _pow2_ceil(s_all)
            qv = _cast(x, 1.0 / s_all)
            q_ref[...] = qv
            store_t(qt_ref, qv, tmp)
            s_ref.at[0][...] = s_row
            return
        if rows:
            q_ref, s_ref = o[:2]
            o = o[2:]
            s_row = _scale(jnp.max(a, axis=1), eps, pow2_scale)                    # [bm]
            q_ref[...] = _cast(x, lax.broadcast_in_dim(1.0 / s_row, x.shape, (0,)))
            s_ref.at[0][...] = s_row
        if cols:
            qt_ref, st_ref = o
            s_col = _scale(jnp.max(a, axis=0), eps, pow2_scale)                    # [128]
            store_t(qt_ref, _cast(x, lax.broadcast_in_dim(1.0 / s_col, x.shape, (1,))), tmp)
            st_ref.at[0][...] = s_col

    def kernel(x_gmem, *o_gmem):
        i, jo = lax.axis_index("m"), lax.axis_index("k")

        def scoped(*refs):
            o_smem, tmp = refs[:len(outs)], (refs[len(outs)] if cols or block else None)

            def body(idx, x_smem):
                (j,) = idx
                slot, c = lax.rem(j, out_bufs), jo * steps + j
                plgpu.wait_smem_to_gmem(out_bufs - 1, wait_read_only=True)   # this slot's last stores read it
                bufs = [r.at[slot] for r in o_smem]
                compute(x_smem, bufs, tmp)
                plgpu.commit_smem()
                for n, (buf, g, (_, _, blk, _, at)) in enumerate(zip(bufs, o_gmem, outs)):
                    r0, c0 = at(i, c)
                    plgpu.copy_smem_to_gmem(buf, g.at[pl.ds(r0, blk[0]), pl.ds(c0, blk[1])],
                                            commit_group=n == len(outs) - 1)

            in_spec = plgpu.BlockSpec((bm, BLOCK), lambda j: (i, jo * steps + j), transforms=_tr(x.dtype))
            plgpu.emit_pipeline(body, grid=(steps,), in_specs=[in_spec], max_concurrent_steps=stages)(x_gmem)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        scratch = [plgpu.SMEM((out_bufs, *blk), dt, transforms=tr) for (_, dt, blk, tr, _) in outs]
        if cols or block:                                                 # f16 staging tile for the transpose
            scratch.append(plgpu.SMEM((BLOCK, bm), jnp.float16, transforms=_tr(jnp.float16)))
        pl.run_scoped(scoped, *scratch)

    kw = {} if interpret is None else {"interpret": interpret}
    f = plgpu.kernel(kernel, out_type=tuple(jax.ShapeDtypeStruct(shp, dt) for (shp, dt, *_) in outs),
                     grid=(mt, kb // steps), grid_names=("m", "k"),
                     compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                     **kw)
    return tuple(vary_like(f(x), x))   # typed per device inside shard_map (see grouped_matmul.vary_like)
