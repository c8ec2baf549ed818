"""Weight-only FP8 GEMM for decoding: BF16 activations times E4M3 weights with 128x128 block scales, the weights
dequantised inside the kernel (never written back in BF16).

``y[g] = x[g] @ dequant(wq[g], s[g])^T`` with ``dequant(wq, s)[n, k] = wq[n, k] * s[n // 128, k // 128]``.

Letters: ``G`` a leading batch of independent weights (routed experts; 1 for a plain projection), ``M`` rows of x
(tokens of a decode step), ``K`` the contraction, ``N`` output features, ``Kb = K / 128``, ``Nb = N / 128``.
``x [G, M, K]`` bf16/fp16, ``wq [E, N, K]`` float8_e4m3fn (``[out, in]``: the layout checkpoints store and dsjax
keeps FP8-stored weights in), ``s [E, Nb, Kb]`` float32 (the checkpoint's ``weight_scale_inv``) -> ``[G, M, N]`` in
x's dtype, accumulated in float32; ``E == G``, or an ``index [G]`` names the weight of each x group
(``y[g] = x[g] @ dequant(wq[index[g]], s[index[g]])^T``), or ``G == 1`` without an index: one x for every weight of
the stack (``y[e] = x[0] @ dequant(wq[e], s[e])^T``, ``[E, M, N]``; the MoE's dense decode path runs every expert on
the same tokens, and a broadcast x handed to a custom call would be written out E times first).

Why: a decode step reads every weight it touches once and does little arithmetic, so FP8 weights could halve its
bytes; dequantising them with XLA first (``wq * s`` then a BF16 GEMM) writes and re-reads a BF16 copy and made FP8
decoding *slower* than BF16 on an H100 (docs/benchmarks.md). Here each program loads its ``bn`` x 128 FP8 weight
tiles, converts them in registers, multiplies, and scales the float32 partial product of each 128-wide K block by
its block scale (the weights' scales vary along K, so they cannot be applied after the sum).

Two choices measured on an H200 (session 16, CUPTI kernel time, `small`'s batch-32 expert GEMMs, 64 x 32 x 1024 x
512): the weight tile read K-contiguous (``[out, in]``) instead of N-contiguous (``[in, out]``), and float16 MMA
operands (E4M3 -> float16 is one conversion instruction per two values; to bfloat16 it takes a float32 detour):
20.6 us ([in, out], bf16) -> 16.0 ([out, in], bf16) -> 12.5 ([out, in], f16), against 18.6 us for XLA's BF16 GEMM of
the same shape. float16 has 5 exponent bits where bf16 activations have 8, so inside the kernel each x tile is
scaled per row by a power of two that puts its largest magnitude in ``[2^14, 2^15)`` (exact: only the exponent
changes; values below ``2^-24`` of the row's maximum lose bits), and that K block's float32 partial product is
scaled back with its block scale: no overflow for any finite bf16 input, and float16's 11-bit significand keeps all
of bf16's 8. (Scaling x with XLA ops before the call instead cost a few small kernels per projection: batch-1
decoding with FP8-stored weights fell from 1.16x to 0.89x of BF16, session 16.)

``fp8_weight_swiglu(x, gq, gs, uq, us, index)`` is the SwiGLU front half of an MLP or expert in one kernel:
``silu(x @ dequant(gq, gs)^T) * (x @ dequant(uq, us)^T)`` (``[G, M, F]``; gate and up weights of one shape), x read
once, both float32 accumulators combined in registers: one launch instead of two GEMMs and an elementwise kernel.

Backends (``implementation=``):

* ``"xla"``: the reference -- dequantise to float32 and ``einsum`` (any platform, any shape).
* ``"pallas"``: a Pallas Triton kernel on GPUs of compute capability >= 8.9 (E4M3 casts): grid
  ``(G, N / bn, S)``, a loop over the K blocks of split S (split-K where ``G x N / bn`` would leave SMs idle, as for
  a batch-1 projection: float32 partials, summed after; :func:`default_splits`); needs ``K`` and ``N`` multiples
  of 128 and ``M <= 64`` (decode-sized: x's rows are padded to a power of two >= 16, the smallest ``dot`` Triton
  takes). ``interpret=True`` runs it on the CPU.
* ``"auto"``: Pallas where supported, XLA otherwise.

Pallas' Triton backend is deprecated in jax 0.11 (lowering warns); the project pins jax 0.11.2, where it lowers and
runs. The Mosaic GPU backend (wgmma needs 64-row tiles: x padded to 64 rows, free for a bandwidth-bound decode GEMM)
is the port to make when the Triton backend goes.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import hardware

__all__ = ["fp8_weight_matmul", "fp8_weight_matmul_reference", "fp8_weight_swiglu", "fp8_weight_swiglu_reference",
           "fp8_weight_kernel_supported", "fp8_weight_kernel_shapes_ok", "default_splits"]

BLOCK = 128
MAX_ROWS = 64
Implementation = Literal["auto", "xla", "pallas"]


def _check(x, wq, s, index):
    if x.ndim != 3 or wq.ndim != 3 or s.ndim != 3:
        raise ValueError(f"fp8_weight_matmul expects x [G, M, K], wq [E, N, K], s [E, Nb, Kb]; got {x.shape}, "
                         f"{wq.shape}, {s.shape}")
    g, m, k = x.shape
    if index is None and wq.shape[0] != g and g != 1:
        raise ValueError(f"fp8_weight_matmul: x {x.shape} and wq {wq.shape} disagree on G; pass index [G] to pick "
                         f"a weight of the stack per x group, or one x group [1, M, K] for every weight")
    if index is not None and index.shape != (g,):
        raise ValueError(f"fp8_weight_matmul: index {index.shape} should be [G] = ({g},), one weight per x group")
    if wq.shape[2] != k:
        raise ValueError(f"fp8_weight_matmul: x {x.shape} and wq {wq.shape} disagree on K (wq is [E, N, K], the "
                         f"checkpoint's [out, in] layout)")
    want = (wq.shape[0], -(-wq.shape[1] // BLOCK), -(-k // BLOCK))
    if s.shape != want:
        raise ValueError(f"fp8_weight_matmul: scales {s.shape} should be {want} (one per 128x128 weight block, "
                         f"[E, N/128, K/128] as weight_scale_inv)")


def fp8_weight_matmul_reference(x: jax.Array, wq: jax.Array, s: jax.Array, index: jax.Array | None = None
                                ) -> jax.Array:
    """Dequantise to float32 and multiply: the semantics every backend matches (``[G, M, N]`` in x's dtype)."""
    _check(x, wq, s, index)
    return _matmul_f32(x, wq, s, index).astype(x.dtype)


def _matmul_f32(x, wq, s, index):
    """``x @ dequant(wq, s)^T`` in float32 (the references' product)."""
    if index is not None:
        wq, s = jnp.take(wq, index, axis=0), jnp.take(s, index, axis=0)
    x = jnp.broadcast_to(x, (wq.shape[0], *x.shape[1:]))          # one x group for every weight
    n, k = wq.shape[1:]
    full = jnp.repeat(jnp.repeat(s.astype(jnp.float32), BLOCK, axis=1), BLOCK, axis=2)[:, :n, :k]
    return jnp.einsum("gmk,gnk->gmn", x.astype(jnp.float32), wq.astype(jnp.float32) * full,
                      precision=lax.Precision.HIGHEST)


def fp8_weight_swiglu_reference(x: jax.Array, gq: jax.Array, gs: jax.Array, uq: jax.Array, us: jax.Array,
                                index: jax.Array | None = None) -> jax.Array:
    """``silu(x @ G^T) * (x @ U^T)`` in float32 on the dequantised weights, cast to x's dtype (``[G, M, F]``)."""
    _check_pair(x, gq, gs, uq, us, index)
    return (jax.nn.silu(_matmul_f32(x, gq, gs, index)) * _matmul_f32(x, uq, us, index)).astype(x.dtype)


def _check_pair(x, gq, gs, uq, us, index):
    _check(x, gq, gs, index)
    if uq.shape != gq.shape or us.shape != gs.shape:
        raise ValueError(f"fp8_weight_swiglu: gate {gq.shape}/{gs.shape} and up {uq.shape}/{us.shape} weights and "
                         f"scales must have one shape")


def fp8_weight_kernel_shapes_ok(x_shape, wq_shape) -> bool:
    """Whether the Pallas kernel takes ``x [G, M, K]`` times ``wq [E, N, K]``: K and N multiples of 128, M <= 64."""
    _, m, k = x_shape
    return k % BLOCK == 0 and wq_shape[1] % BLOCK == 0 and 0 < m <= MAX_ROWS


def fp8_weight_kernel_supported(x_shape, wq_shape) -> bool:
    """Whether the Pallas kernel runs ``x [G, M, K]`` times ``wq [E, N, K]`` on the current default backend (a GPU of
    compute capability >= 8.9, for its E4M3 casts)."""
    cc = hardware.gpu_compute_capability()
    return (fp8_weight_kernel_shapes_ok(x_shape, wq_shape) and jax.default_backend() == "gpu" and cc is not None
            and cc >= (8, 9))


def _rows(m: int) -> int:
    """x's rows padded for Triton's dot: a power of two, at least 16."""
    return max(16, 1 << (m - 1).bit_length())


# Output columns per program: 128, one block scale's width. An H200 sweep of device time at `small`'s decode shapes
# (session 13, 100 calls inside one jit, weights then [in, out]) found 128 fastest or level everywhere: 64 and 32
# columns took up to 1.3x and 1.8x longer on the batch-32 expert GEMMs and 1.45x on the batch-1 gathered ones.
TILE_N = BLOCK
# float16 MMA operands, x scaled per row into float16's range (module docstring); "bf16" is the sweep's alternative
MMA_DTYPE = "f16"
_F16_TOP = 15          # a scaled row's largest magnitude lies in [2^14, 2^15), below float16's 65504


def _f16_operand(xk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(xk * 2^e`` in float16, ``2^-e [rows]`` float32) with one power of two ``2^e`` per row of the x tile
    ``xk [Mp, 128]`` that puts the row's largest magnitude in ``[2^14, 2^15)``, read off the float32 exponent
    bits (jnp ops the Triton lowering takes; ``2^e`` clipped to ``[2^-126, 2^126]``, all-zero rows included).
    Exact: only exponents change (values below ``2^-24`` of the row's maximum become float16 subnormals)."""
    xf = xk.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=1)                                  # [Mp], in [2^(ex-127), 2^(ex-126))
    ex = (lax.bitcast_convert_type(amax, jnp.int32) >> 23) & 0xFF        # biased exponent
    up = jnp.clip(127 + _F16_TOP + 126 - ex, 1, 253)                     # biased exponent of 2^e
    scale = lax.bitcast_convert_type(up << 23, jnp.float32)
    inverse = lax.bitcast_convert_type((254 - up) << 23, jnp.float32)    # 2^-e
    return (xf * scale[:, None]).astype(jnp.float16), inverse


def _kernel(*refs, kb: int, bn: int, indexed: bool, swiglu: bool = False, scaled: bool = False, splits: int = 1,
            shared_x: bool = False):
    """One program: x group ``g`` times output rows ``j*bn...`` of its weight (gate *and* up under ``swiglu``),
    over the K blocks of split ``program_id(2)`` (``kb`` of them). The weight tile is ``[bn, 128]`` (K contiguous),
    converted to the MMA operand type: bfloat16, or float16 when ``scaled``, each x tile then scaled per row by a
    power of two (:func:`_f16_operand`) whose inverse multiplies that K block's float32 partial product along with
    the block scale.
    ``splits > 1`` (split-K): the program writes its float32 partial products (gate then up, under ``swiglu``)
    to ``o [S, G, Mp, N or 2N]``; the caller sums the splits (and applies the SwiGLU). ``shared_x``: x has one
    group, read by every program."""
    from jax.experimental import pallas as pl

    idx_ref, refs = (refs[0], refs[1:]) if indexed else (None, refs)
    x_ref, o_ref = refs[0], refs[-1]
    pairs = [(refs[1], refs[2])] + ([(refs[3], refs[4])] if swiglu else [])    # (weights, scales) per product
    g, j, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = idx_ref[g] if indexed else g                            # this program's weight in the stack
    nb = (j * bn) // BLOCK                                     # this program's block-scale row

    def body(t, accs):
        i = sp * kb + t                                        # the K block
        xk = x_ref[0 if shared_x else g, :, pl.ds(i * BLOCK, BLOCK)]     # [Mp, 128]
        if scaled:
            xk, inverse = _f16_operand(xk)
        else:
            xk = xk.astype(jnp.bfloat16)
        out = []
        for (w_ref, s_ref), acc in zip(pairs, accs):
            wk = w_ref[e, pl.ds(j * bn, bn), pl.ds(i * BLOCK, BLOCK)].astype(xk.dtype)   # [bn, 128], E4M3 -> MMA
            d = jnp.dot(xk, wk.T, preferred_element_type=jnp.float32) * s_ref[e, nb, i]
            if scaled:   # after the block scale: s * 2^-e alone may be a float32 subnormal (flushed to zero)
                d = d * inverse[:, None]
            out.append(acc + d)
        return tuple(out)

    zeros = jnp.zeros((x_ref.shape[1], bn), jnp.float32)
    accs = lax.fori_loop(0, kb, body, tuple(zeros for _ in pairs))
    if splits > 1:
        n = pairs[0][0].shape[1]
        for h, acc in enumerate(accs):
            o_ref[sp, g, :, pl.ds(h * n + j * bn, bn)] = acc
        return
    y = accs[0] * jax.nn.sigmoid(accs[0]) * accs[1] if swiglu else accs[0]     # silu(gate) * up, in float32
    o_ref[g, :, pl.ds(j * bn, bn)] = y.astype(o_ref.dtype)


# Programs the grid should have at least (split-K below it): one per SM (132 on an H100/H200; the device's own count
# where the kernel runs, hardware.num_sms). At batch 1 a plain projection has N/128 programs (8 for a 1024-wide
# output) that each stream all of K; session 15's decode profile on an H200 had such kernels at 0.3 TB/s, slower
# than XLA's BF16 matrix-vector products. With the split, FP8-stored weights decoded 1.16x faster than BF16 at batch 1.
MIN_PROGRAMS = 132


def default_splits(g: int, n: int, k: int, bn: int = TILE_N, min_programs: int = MIN_PROGRAMS) -> int:
    """Split-K factor for ``x [G, M, K]`` times ``w [., N, K]``: 1 when the ``G x N/bn`` grid already has
    ``min_programs`` programs, else the smallest divisor of ``K/128`` that brings it there (all of ``K/128`` if none
    does)."""
    programs, kb = g * (n // bn), k // BLOCK
    if programs >= min_programs:
        return 1
    for d in range(1, kb + 1):
        if kb % d == 0 and programs * d >= min_programs:
            return d
    return kb


def _pallas(x, wq, s, index=None, *, interpret: bool, bn: int = TILE_N, num_warps: int = 4, num_stages: int = 3,
            up: tuple[jax.Array, jax.Array] | None = None, mma_dtype: str = MMA_DTYPE, splits: int | None = None):
    """The Pallas call; ``bn`` (output rows of the weight per program), ``num_warps``, ``num_stages``,
    ``mma_dtype`` (``"f16"``: x scaled per row into float16, see the module docstring; ``"bf16"``: x as it is) and
    ``splits`` (split-K factor, a divisor of K/128; default :func:`default_splits`) are what a sweep may override.
    ``up = (uq, us)``: the fused SwiGLU (``wq, s`` the gate)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if mma_dtype not in ("f16", "bf16"):
        raise ValueError(f"fp8_weight_matmul: mma_dtype={mma_dtype!r}; use 'f16' or 'bf16'")
    g, m, k = x.shape
    shared_x = index is None and g == 1 and wq.shape[0] != 1     # one x for every weight of the stack
    g = wq.shape[0] if shared_x else g
    n = wq.shape[1]
    kb = k // BLOCK
    splits = default_splits(g, n, k, bn, hardware.num_sms(MIN_PROGRAMS)) if splits is None else splits
    if splits < 1 or kb % splits:
        raise ValueError(f"fp8_weight_matmul: splits={splits} must divide K/128 = {kb}")
    mp = _rows(m)
    xin = jnp.pad(x, ((0, 0), (0, mp - m), (0, 0))) if mp != m else x
    parts = 2 if up is not None else 1
    out_shape = ((g, mp, n), x.dtype) if splits == 1 else ((splits, g, mp, parts * n), jnp.float32)
    call = pl.pallas_call(
        functools.partial(_kernel, kb=kb // splits, bn=bn, indexed=index is not None, swiglu=up is not None,
                          scaled=mma_dtype == "f16", splits=splits, shared_x=shared_x),
        grid=(g, n // bn, splits),
        out_shape=jax.ShapeDtypeStruct(*out_shape),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )
    lead = () if index is None else (index.astype(jnp.int32),)
    extra = () if up is None else (up[0], up[1].astype(jnp.float32))
    out = call(*lead, xin, wq, s.astype(jnp.float32), *extra)
    if splits > 1:                                              # the split-K partial sums, added here (XLA fuses
        out = out.sum(0)                                        # this into one small reduction)
        if up is not None:
            out = jax.nn.silu(out[..., :n]) * out[..., n:]
        out = out.astype(x.dtype)
    return out[:, :m]


def fp8_weight_matmul(x: jax.Array, wq: jax.Array, s: jax.Array, index: jax.Array | None = None, *,
                      implementation: Implementation = "auto", interpret: bool = False) -> jax.Array:
    """``x [G, M, K] @ dequant(wq [E, N, K], s [E, Nb, Kb])^T -> [G, M, N]`` (see the module docstring).

    Args:
      x: activations, bf16 or fp16.
      wq: float8_e4m3fn weights in the checkpoint's ``[out, in]`` layout (``E == G`` without ``index``).
      s: float32 block scales (the checkpoint's ``weight_scale_inv``), one per 128x128 block.
      index: optional ``[G]`` int, the weight of the stack each x group multiplies (decoding at batch 1: the chosen
        experts, read in place instead of gathered first).
      implementation: ``"auto"`` (the Pallas kernel where :func:`fp8_weight_kernel_supported`, else XLA),
        ``"xla"`` or ``"pallas"``.
      interpret: run the Pallas kernel in the interpreter (CPU tests).
    """
    _check(x, wq, s, index)
    if _backend(implementation, x, wq, interpret) == "xla":
        return fp8_weight_matmul_reference(x, wq, s, index)
    return _pallas(x, wq, s, index, interpret=interpret)


def fp8_weight_swiglu(x: jax.Array, gq: jax.Array, gs: jax.Array, uq: jax.Array, us: jax.Array,
                      index: jax.Array | None = None, *, implementation: Implementation = "auto",
                      interpret: bool = False) -> jax.Array:
    """``silu(x @ dequant(gq, gs)^T) * (x @ dequant(uq, us)^T) -> [G, M, F]`` in x's dtype: an MLP's or expert's
    gate and up projections and their SwiGLU in one kernel (see the module docstring). Arguments as
    :func:`fp8_weight_matmul`, with ``gq, gs`` the gate's weights and scales and ``uq, us`` the up projection's."""
    _check_pair(x, gq, gs, uq, us, index)
    if _backend(implementation, x, gq, interpret) == "xla":
        return fp8_weight_swiglu_reference(x, gq, gs, uq, us, index)
    return _pallas(x, gq, gs, index, interpret=interpret, up=(uq, us))


def _backend(implementation: str, x: jax.Array, wq: jax.Array, interpret: bool) -> str:
    """``implementation`` resolved to "xla" or "pallas" (errors for impossible requests)."""
    if wq.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"fp8_weight_matmul: wq must be float8_e4m3fn, got {wq.dtype}")
    return hardware.resolve_triton(
        "fp8_weight_matmul", implementation, supported=fp8_weight_kernel_supported(x.shape, wq.shape),
        shapes_ok=fp8_weight_kernel_shapes_ok(x.shape, wq.shape), interpret=interpret,
        requirement=f"K and N multiples of 128 and 1 <= M <= {MAX_ROWS}; got x {x.shape}, wq {wq.shape}")
