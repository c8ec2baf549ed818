"""DeepSeek-V3 FP8 (E4M3) quantisation for training: 1x128 activation tiles, 128x1 (transposed) tiles for the weight
gradient, 128x128 weight blocks with their K-major transpose, and dequantisation.

Every tile or block gets ``s = max(amax, eps) / 448`` in float32 (optionally rounded up to a power of two,
``pow2_scale=True``, as DeepSeek uses for tensors that are communicated) and stores ``q = e4m3(x * (1 / s))``
(one IEEE reciprocal per tile, then a multiply per element, as DeepGEMM's casts multiply by ``448 / amax``; within
one f32 rounding of ``x / s`` before the E4M3 rounding, and exactly ``x / s`` for power-of-two scales); the value
is restored as ``q * s``. Partial tiles at the edges are handled: their scale covers only the valid elements.

Shapes (letter glossary): ``M`` rows (tokens), ``K`` the quantised (contraction) axis, ``Kb = ceil(K / 128)``,
``Mb = ceil(M / 128)``; weights ``W[R, C]`` with ``Rb, Cb`` blocks.

* ``act_quant(x [..., K]) -> (q [..., K], s [..., Kb])``                        1x128 tiles
* ``act_quant_t(x [M, K]) -> (qt [K, M], st [K, Mb])``                          128x1 tiles, stored transposed
* ``act_quant_dual(x [M, K]) -> (q, s, qt, st)``                               both, from one read of ``x``
* ``weight_quant_dual(w [R, C]) -> (q [R, C], s [Rb, Cb], qt [C, R], st [Cb, Rb])``  128x128 blocks + transpose
* ``dequant(q, s, block=(br, bc))``                                            any 2-D block grid

Backends (``implementation=``): ``"xla"`` is the reference (plain jnp, any platform); ``"pallas"`` runs one kernel
that reads each tile once and writes every requested layout:

* on GPUs (Hopper or newer) a Mosaic GPU kernel (``fp8_quant_mgpu``: TMA-pipelined [128, 128] tiles, one
  warpgroup per CTA); needs ``M % 16 == 0`` and ``K % 16 == 0`` (TMA alignment; partial 128-tiles are fine);
* elsewhere one ``pl.pallas_call`` (Mosaic TPU layout: (128, 128) tiles, MN-major lane-dense scales), run in
  interpret mode on CPU (``interpret=`` or automatically).

Passing ``interpret=plgpu.InterpretGPUParams(...)`` selects the Mosaic GPU kernel in the Mosaic GPU interpreter on
any platform (tests). ``"auto"`` picks Pallas on TPU, the Mosaic GPU kernel on Hopper GPUs where the shape is
supported (bit-exact with XLA; 1.6-2.3x faster than XLA's fusions on an H200: docs/benchmarks.md) and XLA
elsewhere. Under ``vmap`` the Mosaic GPU kernel runs once per batch element (``lax.map``).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import hardware
from pallas_kernels.grouped_matmul import vary_like

__all__ = ["BLOCK", "E4M3_MAX", "act_quant", "act_quant_t", "act_quant_dual", "weight_quant_dual", "dequant",
           "quantize_blocks"]

E4M3_MAX = 448.0
BLOCK = 128
Implementation = Literal["auto", "xla", "pallas"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(s: jax.Array) -> jax.Array:
    """The smallest power of two >= ``s`` (positive normal float32), exactly: from the bits, not ``exp2(ceil(
    log2(s)))`` -- XLA's GPU ``exp2`` is not exact at integers (it gave 0.031249998 for 2**-5 on an H100)."""
    bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
    mant = jnp.int32(0x7FFFFF)
    up = bits + mant                                                  # carries into the exponent unless exact
    return jax.lax.bitcast_convert_type(up & ~mant, jnp.float32)


def _scale(amax: jax.Array, eps: float, pow2_scale: bool) -> jax.Array:
    s = jnp.maximum(amax, eps) / E4M3_MAX
    if pow2_scale:
        s = _pow2_ceil(s)
    return s


def _cast(x32: jax.Array, s: jax.Array) -> jax.Array:
    """``e4m3(clip(x * (1 / s)))``; ``s`` broadcastable (one reciprocal per scale, then multiplies)."""
    return jnp.clip(x32 * (1.0 / s), -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)


def _keep(q: jax.Array) -> jax.Array:
    """Pins the E4M3 values: with ``xla_allow_excess_precision`` (on by default) XLA GPU may fold the round trip
    f32 -> e4m3 -> f32 when the quantisation and a dequantising consumer land in one program, silently skipping
    the quantisation; an optimization barrier keeps it."""
    return jax.lax.optimization_barrier(q)


def _is_gpu_interpret(interpret) -> bool:
    if interpret is None or isinstance(interpret, bool):
        return False
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return isinstance(interpret, plgpu.InterpretGPUParams)


def _resolve(implementation: str, op: str, interpret=None, shape2d=None) -> str:
    """-> "xla", "pallas" (Mosaic TPU kernel) or "mgpu" (Mosaic GPU kernel). ``shape2d``: the (M, K) the kernel
    would see, for ``"auto"`` on GPUs."""
    if implementation == "auto":
        if jax.default_backend() == "tpu":
            return "pallas"
        if jax.default_backend() == "gpu" and shape2d is not None and hardware.hopper_or_newer():
            from pallas_kernels.fp8_quant_mgpu import mgpu_quant_supported
            if mgpu_quant_supported(shape2d, "rows"):
                return "mgpu"
        return "xla"
    if implementation not in ("xla", "pallas"):
        raise ValueError(f"{op}: implementation={implementation!r} is unknown; use 'auto', 'xla' or 'pallas'")
    if implementation == "xla":
        return "xla"
    if _is_gpu_interpret(interpret):
        return "mgpu"
    if jax.default_backend() == "gpu":
        if not hardware.hopper_or_newer():
            raise NotImplementedError(f"{op}: implementation='pallas' on GPUs is a Mosaic GPU kernel for Hopper "
                                      f"(sm_90) or newer; this GPU's compute capability is "
                                      f"{hardware.gpu_compute_capability()}. Fix: implementation='xla'")
        return "mgpu"
    return "pallas"


def _mgpu(x, mode, eps, pow2_scale, interpret):
    from pallas_kernels.fp8_quant_mgpu import mgpu_quant

    @jax.custom_batching.custom_vmap
    def call(x):
        return mgpu_quant(x, mode=mode, eps=eps, pow2_scale=pow2_scale,
                          interpret=interpret if _is_gpu_interpret(interpret) else None)

    @call.def_vmap
    def _rule(axis_size, in_batched, x):
        del axis_size
        if not in_batched[0]:
            out = call(x)
            return out, jax.tree.map(lambda _: False, out)
        out = jax.lax.map(call, x)                  # one kernel launch per batch element
        return out, jax.tree.map(lambda _: True, out)

    return call(x)


def _interpret(interpret):
    if interpret is not None:
        return interpret
    if jax.default_backend() == "tpu":
        return False
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.InterpretParams()


# ----------------------------------------------------------------------------------------------------------------
# XLA reference
# ----------------------------------------------------------------------------------------------------------------

def quantize_blocks(x: jax.Array, block: tuple[int, int], *, eps: float = 1e-4,
                    pow2_scale: bool = False) -> tuple[jax.Array, jax.Array]:
    """XLA reference for any 2-D block grid: ``x [R, C] -> (q [R, C] e4m3, s [ceil(R/br), ceil(C/bc)] f32)``."""
    if x.ndim != 2:
        raise ValueError(f"quantize_blocks expects a 2-D array, got shape {x.shape}")
    r, c = x.shape
    br, bc = block
    rb, cb = _cdiv(r, br), _cdiv(c, bc)
    x32 = x.astype(jnp.float32)
    padded = jnp.pad(x32, ((0, rb * br - r), (0, cb * bc - c)))
    blocks = padded.reshape(rb, br, cb, bc)
    s = _scale(jnp.max(jnp.abs(blocks), axis=(1, 3)), eps, pow2_scale)
    q = _cast(blocks, s[:, None, :, None]).reshape(rb * br, cb * bc)[:r, :c]
    return _keep(q), s


def dequant(q: jax.Array, s: jax.Array, *, block: tuple[int, int] = (1, BLOCK), out_dtype=jnp.float32) -> jax.Array:
    """``x[i, j] = q[i, j] * s[i // br, j // bc]`` for ``q [R, C]``, ``s [ceil(R/br), ceil(C/bc)]``.

    ``block=(1, 128)`` undoes ``act_quant`` (also for ``act_quant_t``'s transposed output), ``(128, 128)`` undoes
    ``weight_quant_dual``. A leading batch on ``q``/``s`` is allowed for ``block[0] == 1``.
    """
    br, bc = block
    if q.ndim != 2 and br != 1:
        raise ValueError(f"dequant with block {block} expects a 2-D q, got shape {q.shape}")
    r, c = q.shape[-2] if q.ndim >= 2 else 1, q.shape[-1]
    want = (*q.shape[:-2], _cdiv(r, br), _cdiv(c, bc)) if q.ndim >= 2 else (_cdiv(c, bc),)
    if s.shape != want:
        raise ValueError(f"dequant: scale shape {s.shape} does not match q {q.shape} with block {block}: "
                         f"expected {want}")
    full = jnp.repeat(s.astype(jnp.float32), bc, axis=-1)[..., :c]
    if q.ndim >= 2:
        full = jnp.repeat(full, br, axis=-2)[..., :r, :]
    return (q.astype(jnp.float32) * full).astype(out_dtype)


def _act_quant_xla(x, eps, pow2_scale):
    k = x.shape[-1]
    kb = _cdiv(k, BLOCK)
    x32 = x.astype(jnp.float32)
    padded = jnp.pad(x32, [(0, 0)] * (x.ndim - 1) + [(0, kb * BLOCK - k)])
    tiles = padded.reshape(*x.shape[:-1], kb, BLOCK)
    s = _scale(jnp.max(jnp.abs(tiles), axis=-1), eps, pow2_scale)
    q = _cast(tiles, s[..., None]).reshape(*x.shape[:-1], kb * BLOCK)[..., :k]
    return _keep(q), s


# ----------------------------------------------------------------------------------------------------------------
# Pallas (Mosaic TPU) kernel: one (128, 128) tile per grid step, every requested output from one read
# ----------------------------------------------------------------------------------------------------------------

def _quant_kernel(x_ref, *out_refs, rows: bool, cols: bool, block2d: bool, eps: float, pow2_scale: bool):
    x = x_ref[...].astype(jnp.float32)                                   # (128, 128)
    a = jnp.abs(x)
    outs = list(out_refs)
    if block2d:                                                          # one scale for the whole tile
        q_ref, s_ref, qt_ref = outs
        s = _scale(jnp.max(a), eps, pow2_scale)
        q_ref[...] = _cast(x, s)
        qt_ref[...] = _cast(x.T, s)
        s_ref[...] = jnp.full(s_ref.shape, s, jnp.float32)
        return
    if rows:                                                             # 1x128: one scale per row
        q_ref, s_ref = outs[:2]
        outs = outs[2:]
        s_row = _scale(jnp.max(a, axis=1), eps, pow2_scale)              # (128,)
        q_ref[...] = _cast(x, s_row[:, None])
        s_ref[...] = s_row.reshape(s_ref.shape)
    if cols:                                                             # 128x1: one scale per column, stored as rows
        qt_ref, st_ref = outs
        s_col = _scale(jnp.max(a, axis=0), eps, pow2_scale)              # (128,)
        qt_ref[...] = _cast(x.T, s_col[:, None])
        st_ref[...] = s_col.reshape(st_ref.shape)


def _pallas_quant(x, *, rows: bool, cols: bool, block2d: bool, eps: float, pow2_scale: bool, interpret):
    """x [M, K] (any float dtype). Pads to multiples of 128 with zeros (zeros do not change an amax; the padded
    outputs are sliced off). Scales are written lane-dense as (blocks, 1, length) and reshaped."""
    from jax.experimental import pallas as pl

    m, k = x.shape
    mb, kb = _cdiv(m, BLOCK), _cdiv(k, BLOCK)
    mp, kp = mb * BLOCK, kb * BLOCK
    xp = jnp.pad(x, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else x
    f8 = jnp.float8_e4m3fn
    tile = (BLOCK, BLOCK)
    out_shape, out_specs = [], []
    if block2d:
        out_shape += [jax.ShapeDtypeStruct((mp, kp), f8), jax.ShapeDtypeStruct((mb, kb, 8, BLOCK), jnp.float32),
                      jax.ShapeDtypeStruct((kp, mp), f8)]
        out_specs += [pl.BlockSpec(tile, lambda i, j: (i, j)),
                      pl.BlockSpec((None, None, 8, BLOCK), lambda i, j: (i, j, 0, 0)),
                      pl.BlockSpec(tile, lambda i, j: (j, i))]
    if rows:
        out_shape += [jax.ShapeDtypeStruct((mp, kp), f8), jax.ShapeDtypeStruct((kb, 1, mp), jnp.float32)]
        out_specs += [pl.BlockSpec(tile, lambda i, j: (i, j)), pl.BlockSpec((None, 1, BLOCK), lambda i, j: (j, 0, i))]
    if cols:
        out_shape += [jax.ShapeDtypeStruct((kp, mp), f8), jax.ShapeDtypeStruct((mb, 1, kp), jnp.float32)]
        out_specs += [pl.BlockSpec(tile, lambda i, j: (j, i)), pl.BlockSpec((None, 1, BLOCK), lambda i, j: (i, 0, j))]
    kernel = functools.partial(_quant_kernel, rows=rows, cols=cols, block2d=block2d, eps=eps, pow2_scale=pow2_scale)
    outs = pl.pallas_call(kernel, grid=(mb, kb), in_specs=[pl.BlockSpec(tile, lambda i, j: (i, j))],
                          out_specs=out_specs, out_shape=out_shape, interpret=_interpret(interpret))(xp)
    outs = list(vary_like(tuple(outs), xp))
    res = []
    if block2d:
        q, s, qt = outs
        return q[:m, :k], s[:, :, 0, 0], qt[:k, :m]
    if rows:
        q, s = outs[:2]
        outs = outs[2:]
        res += [q[:m, :k], s[:, 0, :m].T]                                # (M, Kb)
    if cols:
        qt, st = outs
        res += [qt[:k, :m], st[:, 0, :k].T]                              # (K, Mb)
    return tuple(res)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _check_float(x, op, ndim=None):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{op} expects a floating-point array, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{op} expects a {ndim}-D array, got shape {x.shape}")
    if x.ndim == 0:
        raise ValueError(f"{op} expects at least one axis, got a scalar")


def act_quant(x: jax.Array, *, eps: float = 1e-4, pow2_scale: bool = False, implementation: Implementation = "auto",
              interpret=None) -> tuple[jax.Array, jax.Array]:
    """1x128 tiles along the last axis: ``x [..., K] -> (q [..., K] e4m3, s [..., ceil(K/128)] f32)``."""
    _check_float(x, "act_quant")
    impl = _resolve(implementation, "act_quant", interpret, (math.prod(x.shape[:-1]), x.shape[-1]))
    if impl == "xla":
        return _act_quant_xla(x, eps, pow2_scale)
    lead = x.shape[:-1]
    if impl == "mgpu":
        q, st = _mgpu(x.reshape(-1, x.shape[-1]), "rows", eps, pow2_scale, interpret)
        return q.reshape(x.shape), st.T.reshape(*lead, st.shape[0])
    q, s = _pallas_quant(x.reshape(-1, x.shape[-1]), rows=True, cols=False, block2d=False, eps=eps,
                         pow2_scale=pow2_scale, interpret=interpret)
    return q.reshape(x.shape), s.reshape(*lead, s.shape[-1])


def act_quant_t(x: jax.Array, *, eps: float = 1e-4, pow2_scale: bool = False,
                implementation: Implementation = "auto", interpret=None) -> tuple[jax.Array, jax.Array]:
    """128x1 tiles (128 rows of one column), stored transposed: ``x [M, K] -> (qt [K, M], st [K, ceil(M/128)])``.

    ``qt`` is the 1x128-tile quantisation of ``x.T``: the K-major operand of the weight-gradient GEMM.
    """
    _check_float(x, "act_quant_t", 2)
    impl = _resolve(implementation, "act_quant_t", interpret, x.shape)
    if impl == "xla":
        return _act_quant_xla(x.T, eps, pow2_scale)
    if impl == "mgpu":
        qt, st = _mgpu(x, "cols", eps, pow2_scale, interpret)
        return qt, st.T
    return _pallas_quant(x, rows=False, cols=True, block2d=False, eps=eps, pow2_scale=pow2_scale, interpret=interpret)


def act_quant_dual(x: jax.Array, *, eps: float = 1e-4, pow2_scale: bool = False,
                   implementation: Implementation = "auto", interpret=None):
    """Both tilings from one read: ``x [M, K] -> (q [M, K], s [M, Kb], qt [K, M], st [K, Mb])``."""
    _check_float(x, "act_quant_dual", 2)
    impl = _resolve(implementation, "act_quant_dual", interpret, x.shape)
    if impl == "xla":
        return (*_act_quant_xla(x, eps, pow2_scale), *_act_quant_xla(x.T, eps, pow2_scale))
    if impl == "mgpu":
        q, s, qt, st = _mgpu(x, "dual", eps, pow2_scale, interpret)
        return q, s.T, qt, st.T
    return _pallas_quant(x, rows=True, cols=True, block2d=False, eps=eps, pow2_scale=pow2_scale, interpret=interpret)


def weight_quant_dual(w: jax.Array, *, eps: float = 1e-4, pow2_scale: bool = False,
                      implementation: Implementation = "auto", interpret=None):
    """128x128 blocks plus the transposed copy: ``w [R, C] -> (q [R, C], s [Rb, Cb], qt [C, R], st [Cb, Rb])``.

    ``qt`` holds the same E4M3 values transposed (a transpose of a block-scaled matrix is block-scaled with the
    transposed scale grid), so the two GEMMs that use ``w`` and ``w.T`` both see a K-major operand.
    """
    _check_float(w, "weight_quant_dual", 2)
    impl = _resolve(implementation, "weight_quant_dual", interpret, w.shape)
    if impl == "xla":
        q, s = quantize_blocks(w, (BLOCK, BLOCK), eps=eps, pow2_scale=pow2_scale)
        return q, s, q.T, s.T
    if impl == "mgpu":
        q, qt, sb = _mgpu(w, "block", eps, pow2_scale, interpret)
        s = sb[:, ::BLOCK]                                               # one value per 128-float row chunk
        return q, s, qt, s.T
    q, s, qt = _pallas_quant(w, rows=False, cols=False, block2d=True, eps=eps, pow2_scale=pow2_scale,
                             interpret=interpret)
    return q, s, qt, s.T
