"""Absorbed-MLA decode attention over the latent cache in one kernel (FlashMLA's job, in Pallas).

``o[b, s, n] = sum_t softmax_t(scale * (q_lat[b, s, n] . c_kv[b, t] + q_rot[b, s, n] . k_rot[b, t]) | mask) c_kv[b, t]``

Letters: ``B`` batch, ``S`` query tokens per row (1 for a decode step, k + 1 for a speculative verification),
``N`` heads, ``T`` cache slots, ``R`` kv_lora_rank (the latent: keys *and* values), ``P`` qk_rope_head_dim.
``q_lat [B, S, N, R]`` (the query with W_UK folded in), ``q_rot [B, S, N, P]``, ``c_kv [B, T, R]``,
``k_rot [B, T, P]``, ``mask [B, S, T]`` bool (True = attend) -> ``o [B, S, N, R]`` in c_kv's dtype (W_UV is applied
after, outside). ``layer=``: the cache is a model's stacked one, ``c_kv [L, B, T, R]``, ``k_rot [L, B, T, P]``, and
layer ``layer`` is attended: the kernel reads that layer in place (a slice passed to a custom call is a copy: on an H100
at `small`'s batch 32, every layer's cache copied out of the stack was ~4% of a decode step).

Why: XLA runs this as two batched GEMMs with the masked softmax between them (scores written and re-read in
float32), plus the casts: on an H200 at `small`'s batch 32 the attention core took 17% of a decode step's device
time, ~4x what reading the cache once costs (docs/benchmarks.md). Here each program streams its rows' cache once:
``[bt, R]`` latent tiles feed both the score GEMM and, after an online softmax in registers, the value GEMM.

Backends (``implementation=``):

* ``"xla"``: the reference -- einsum scores in float32, masked softmax, einsum values (what ``MLA.attend_absorbed``
  did before; any platform, any shape).
* ``"pallas"``: a Pallas Triton kernel: grid ``(B, S, N / bh, splits)``; each program takes ``bh`` heads of one
  query token and a contiguous range of the cache in ``bt``-slot tiles (flash-decoding: with ``splits > 1`` the
  partial results and their log-sum-exps are merged after, in float32). Needs ``R`` and ``P`` powers of two
  >= 16 and ``T`` a multiple of 16 (:func:`kernel_shapes_ok`); heads are padded to a power of two >= 16, the
  smallest ``dot`` Triton takes. ``interpret=True`` runs it on the CPU.
* ``"auto"``: Pallas on GPUs where the shapes allow, XLA otherwise.

Numerics: scores and softmax in float32 as the reference; the unnormalised probabilities enter the value GEMM in
c_kv's dtype (the reference rounds the normalised ones), and the division by the row sum happens after, in
float32 -- the usual flash-attention difference, at the dtype's rounding level.

Pallas' Triton backend is deprecated in jax 0.11 (lowering warns); the project pins jax 0.11.2, where it lowers and
runs (see ``fp8_weight_gemm.py`` for the same note).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import hardware

__all__ = ["mla_decode_attention", "mla_decode_reference", "kernel_shapes_ok", "kernel_supported", "default_tiling"]

Implementation = Literal["auto", "xla", "pallas"]
_NEG_INF = float("-inf")


def _check(q_lat, q_rot, c_kv, k_rot, mask, stacked: bool = False):
    if stacked:
        if c_kv.ndim != 4 or k_rot.ndim != 4 or c_kv.shape[0] != k_rot.shape[0]:
            raise ValueError(f"mla_decode_attention(layer=...) expects stacked caches c_kv [L,B,T,R] and k_rot "
                             f"[L,B,T,P]; got {c_kv.shape}, {k_rot.shape}")
        c_kv, k_rot = c_kv[0], k_rot[0]
    if q_lat.ndim != 4 or q_rot.ndim != 4 or c_kv.ndim != 3 or k_rot.ndim != 3 or mask.ndim != 3:
        raise ValueError(f"mla_decode_attention expects q_lat [B,S,N,R], q_rot [B,S,N,P], c_kv [B,T,R], "
                         f"k_rot [B,T,P], mask [B,S,T]; got {q_lat.shape}, {q_rot.shape}, {c_kv.shape}, "
                         f"{k_rot.shape}, {mask.shape}")
    b, s, n, r = q_lat.shape
    t = c_kv.shape[1]
    want = {"q_rot": ((b, s, n, k_rot.shape[2]), q_rot.shape), "c_kv": ((b, t, r), c_kv.shape),
            "k_rot": ((b, t, q_rot.shape[3]), k_rot.shape), "mask": ((b, s, t), mask.shape)}
    for name, (w, got) in want.items():
        if tuple(got) != w:
            raise ValueError(f"mla_decode_attention: {name} has shape {tuple(got)}, expected {w} from q_lat "
                             f"{q_lat.shape} and c_kv {c_kv.shape}")


def mla_decode_reference(q_lat, q_rot, c_kv, k_rot, mask, *, scale: float) -> jax.Array:
    """The einsum path: float32 scores, masked float32 softmax cast to c_kv's dtype, then the value product."""
    _check(q_lat, q_rot, c_kv, k_rot, mask)
    scores = jnp.einsum("bsnr,btr->bnst", q_lat, c_kv, preferred_element_type=jnp.float32)
    scores = scores + jnp.einsum("bsnp,btp->bnst", q_rot, k_rot, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None], scores * scale, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).astype(c_kv.dtype)
    return jnp.einsum("bnst,btr->bsnr", p, c_kv)


def _pow2(x: int) -> bool:
    return x >= 16 and x & (x - 1) == 0


def kernel_shapes_ok(q_lat_shape, q_rot_shape, c_kv_shape) -> bool:
    """Whether the Pallas kernel takes these shapes: R and P powers of two >= 16, T a multiple of 16."""
    r, p, t = q_lat_shape[3], q_rot_shape[3], c_kv_shape[1]
    return _pow2(r) and _pow2(p) and t % 16 == 0 and t > 0


def kernel_supported(q_lat_shape, q_rot_shape, c_kv_shape) -> bool:
    """Whether ``implementation="auto"`` picks the Pallas kernel: on a GPU, shapes as :func:`kernel_shapes_ok`."""
    return jax.default_backend() == "gpu" and kernel_shapes_ok(q_lat_shape, q_rot_shape, c_kv_shape)


def default_tiling(b: int, s: int, n: int, r: int, t: int, num_sms: int = 132) -> tuple[int, int, int]:
    """``(bh, bt, splits)``: heads per program (a power of two >= 16, at most 32 when R >= 512 so the float32
    ``[bh, R]`` accumulator fits in registers, else 64), cache slots per tile (the largest of 64, 32, 16 dividing
    T), and splits of the cache so that about two programs per multiprocessor run (at most 16 splits, dividing the
    tiles). From an H200 sweep (docs/benchmarks.md, `bench_mla_decode`): splitting even a 256-slot cache into
    4 one-tile splits took `small`'s batch 1 from 13.2 to 8.8-9.2 us and batch 32 from 14.8 to 10.7 us, merge
    included; a batch-32 verification (128 programs) and V3's batch 32 (2 splits) were fastest as this rule picks,
    V3's batch 1 on a 4k cache with 16 splits."""
    np_ = max(16, 1 << (n - 1).bit_length())
    bh = min(np_, 32 if r >= 512 else 64)
    bt = next(x for x in (64, 32, 16) if t % x == 0)
    tiles = t // bt
    programs = b * s * (np_ // bh)
    splits = max(1, min(tiles, 16, math.ceil(2 * num_sms / programs)))
    while tiles % splits:
        splits -= 1
    return bh, bt, splits


def _kernel(layer_ref, ql_ref, qr_ref, ckv_ref, kr_ref, mask_ref, *out_refs, scale: float, bh: int, bt: int,
            tiles: int, split: bool):
    """One program: heads ``[h*bh, (h+1)*bh)`` of query token ``s`` of row ``b``, over cache tiles
    ``[c*tiles, (c+1)*tiles)`` of layer ``layer_ref[0]`` of the stacked cache, online softmax in float32."""
    from jax import lax
    from jax.experimental import pallas as pl

    b, s, h, c = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    layer = layer_ref[0]
    heads = pl.ds(h * bh, bh)
    q = ql_ref[b, s, heads, :]                                             # [bh, R]
    qr = qr_ref[b, s, heads, :]                                            # [bh, P]
    r = q.shape[-1]

    def body(i, carry):
        m, l, acc = carry
        t0 = (c * tiles + i) * bt
        kv = ckv_ref[layer, b, pl.ds(t0, bt), :]                           # [bt, R]
        kr = kr_ref[layer, b, pl.ds(t0, bt), :]                            # [bt, P]
        sc = (jnp.dot(q, kv.T, preferred_element_type=jnp.float32)
              + jnp.dot(qr, kr.T, preferred_element_type=jnp.float32)) * scale      # [bh, bt]
        keep = mask_ref[b, s, pl.ds(t0, bt)] != 0                          # [bt]
        sc = jnp.where(keep[None, :], sc, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)                  # rows with no key yet: p = alpha = 0
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(sc - m_safe[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(kv.dtype), kv, preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((bh,), _NEG_INF, jnp.float32), jnp.zeros((bh,), jnp.float32),
            jnp.zeros((bh, r), jnp.float32))
    m, l, acc = lax.fori_loop(0, tiles, body, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    o = acc / safe_l[:, None]
    if split:
        o_ref, lse_ref = out_refs
        o_ref[b, s, c, heads, :] = o
        lse_ref[b, s, c, heads] = jnp.where(l > 0, jnp.where(m == _NEG_INF, 0.0, m) + jnp.log(safe_l), _NEG_INF)
    else:
        out_refs[0][b, s, heads, :] = o.astype(out_refs[0].dtype)


def _pallas(q_lat, q_rot, c_kv, k_rot, mask, *, scale: float, interpret: bool, layer=None, bh: int | None = None,
            bt: int | None = None, splits: int | None = None, num_warps: int = 4, num_stages: int = 2):
    """The Pallas call; ``bh``, ``bt``, ``splits``, ``num_warps`` and ``num_stages`` are what a sweep may override
    (default :func:`default_tiling`). ``layer``: ``c_kv``/``k_rot`` are stacked caches, read at that layer."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if layer is None:                                                      # one layer: a stack of one (a bitcast)
        c_kv, k_rot, layer = c_kv[None], k_rot[None], 0
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    b, s, n, r = q_lat.shape
    t = c_kv.shape[2]
    d_bh, d_bt, d_splits = default_tiling(b, s, n, r, t, hardware.num_sms())
    bh, bt, splits = bh or d_bh, bt or d_bt, splits or d_splits
    if t % (bt * splits):
        raise ValueError(f"mla_decode_attention: T = {t} is not a multiple of bt * splits = {bt} * {splits}")
    np_ = max(bh, 1 << (n - 1).bit_length())
    if np_ != n:                                                           # pad heads for Triton's dot
        pad = ((0, 0), (0, 0), (0, np_ - n), (0, 0))
        q_lat, q_rot = jnp.pad(q_lat, pad), jnp.pad(q_rot, pad)
    tiles = t // (bt * splits)
    split = splits > 1
    out_shape = ([jax.ShapeDtypeStruct((b, s, splits, np_, r), jnp.float32),
                  jax.ShapeDtypeStruct((b, s, splits, np_), jnp.float32)] if split
                 else jax.ShapeDtypeStruct((b, s, np_, r), c_kv.dtype))
    call = pl.pallas_call(
        functools.partial(_kernel, scale=float(scale), bh=bh, bt=bt, tiles=tiles, split=split),
        grid=(b, s, np_ // bh, splits),
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )
    out = call(layer, q_lat, q_rot.astype(q_lat.dtype), c_kv, k_rot.astype(c_kv.dtype), mask.astype(jnp.int8))
    if split:                                  # merge the splits' softmaxes: weights exp(lse_c - max lse)
        o_part, lse = out
        mx = jnp.max(lse, axis=2, keepdims=True)
        w = jnp.exp(lse - jnp.where(jnp.isfinite(mx), mx, 0.0))           # [B, S, C, N]
        den = jnp.sum(w, axis=2)
        out = (jnp.sum(w[..., None] * o_part, axis=2) / jnp.where(den > 0, den, 1.0)[..., None]).astype(c_kv.dtype)
    return out[:, :, :n]


def mla_decode_attention(q_lat: jax.Array, q_rot: jax.Array, c_kv: jax.Array, k_rot: jax.Array, mask: jax.Array, *,
                         scale: float, layer: jax.Array | int | None = None, implementation: Implementation = "auto",
                         interpret: bool = False) -> jax.Array:
    """Absorbed MLA attention of ``S`` query tokens per row over a latent cache (see the module docstring).

    Args:
      q_lat: ``[B, S, N, R]`` queries with W_UK folded in (the compute dtype).
      q_rot: ``[B, S, N, P]`` RoPE'd query parts.
      c_kv, k_rot: the cache, ``[B, T, R]`` and ``[B, T, P]``; with ``layer``, a stacked cache ``[L, B, T, R]`` and
        ``[L, B, T, P]``.
      mask: ``[B, S, T]`` bool, True where query s may attend slot t (every row needs one True).
      scale: the softmax scale.
      layer: the layer of a stacked cache to attend (an int or an int32 scalar); the kernel reads it in place.
      implementation: ``"auto"``, ``"xla"`` or ``"pallas"``.
      interpret: run the Pallas kernel in the interpreter (CPU tests).

    Returns ``[B, S, N, R]`` in c_kv's dtype.
    """
    _check(q_lat, q_rot, c_kv, k_rot, mask, stacked=layer is not None)
    one = c_kv.shape[-3:]                                                  # [B, T, R] of one layer
    impl = hardware.resolve_triton(
        "mla_decode_attention", implementation, supported=kernel_supported(q_lat.shape, q_rot.shape, one),
        shapes_ok=kernel_shapes_ok(q_lat.shape, q_rot.shape, one), interpret=interpret,
        requirement=f"R and P powers of two >= 16 and T a multiple of 16; got q_lat {q_lat.shape}, q_rot "
                    f"{q_rot.shape}, c_kv {c_kv.shape}")
    if impl == "xla":
        if layer is not None:
            c_kv = jax.lax.dynamic_index_in_dim(c_kv, layer, 0, keepdims=False)
            k_rot = jax.lax.dynamic_index_in_dim(k_rot, layer, 0, keepdims=False)
        return mla_decode_reference(q_lat, q_rot, c_kv, k_rot, mask, scale=scale)
    return _pallas(q_lat, q_rot, c_kv, k_rot, mask, scale=scale, interpret=interpret, layer=layer)
