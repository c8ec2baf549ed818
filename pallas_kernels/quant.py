"""Blockwise FP8 (E4M3) weight quantisation as DeepSeek-V3 stores it.

A weight ``W[N, K]`` (HF ``[out, in]`` layout) is stored as ``W8 = e4m3(W / s)`` with one float32 scale per
``bn x bk`` block (``weight_scale_inv[ceil(N/bn), ceil(K/bk)]``, partial edge blocks allowed), and restored as
``W[i, j] = W8[i, j] * s[i // bn, j // bk]``.

Each op has an ``implementation=`` switch. Only the XLA reference exists so far; the Pallas backends arrive
with the FP8 GEMM work and must match these functions.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["E4M3_MAX", "weight_dequant", "weight_quant"]

E4M3_MAX = 448.0
Implementation = Literal["xla"]


def _check_impl(implementation: str) -> None:
    if implementation != "xla":
        raise NotImplementedError(f"implementation={implementation!r} is not available for this op yet; "
                                  f"use implementation='xla'")


def _expand_scale(scale: jax.Array, shape: tuple[int, int], block_size: tuple[int, int]) -> jax.Array:
    n, k = shape
    bn, bk = block_size
    nb, kb = -(-n // bn), -(-k // bk)
    if scale.shape != (nb, kb):
        raise ValueError(f"scale shape {scale.shape} does not match weight shape {shape} with block size "
                         f"{block_size}: expected {(nb, kb)}")
    full = jnp.repeat(jnp.repeat(scale, bn, axis=0), bk, axis=1)
    return full[:n, :k]


def weight_dequant(w: jax.Array, scale_inv: jax.Array, *, block_size: tuple[int, int] = (128, 128),
                   out_dtype=jnp.bfloat16, implementation: Implementation = "xla") -> jax.Array:
    """``W[i, j] = W8[i, j] * scale_inv[i // bn, j // bk]`` for a 2-D weight ``[N, K]``.

    Args:
      w: ``[N, K]`` float8_e4m3fn (any float dtype is accepted).
      scale_inv: ``[ceil(N/bn), ceil(K/bk)]`` float32 block scales (the checkpoint's ``weight_scale_inv``).
      block_size: ``(bn, bk)``, the checkpoint's ``weight_block_size``.
      out_dtype: dtype of the result; the product is formed in float32.
    """
    _check_impl(implementation)
    if w.ndim != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {w.shape}")
    s = _expand_scale(scale_inv.astype(jnp.float32), w.shape, tuple(block_size))
    return (w.astype(jnp.float32) * s).astype(out_dtype)


def weight_quant(w: jax.Array, *, block_size: tuple[int, int] = (128, 128), eps: float = 1e-4,
                 implementation: Implementation = "xla") -> tuple[jax.Array, jax.Array]:
    """Quantises ``W[N, K]`` to E4M3 with one scale per block: ``s = max(amax, eps) / 448``.

    Returns ``(w8 [N, K] float8_e4m3fn, scale_inv [ceil(N/bn), ceil(K/bk)] float32)``; edge blocks are partial.
    """
    _check_impl(implementation)
    if w.ndim != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {w.shape}")
    n, k = w.shape
    bn, bk = block_size
    nb, kb = -(-n // bn), -(-k // bk)
    w32 = w.astype(jnp.float32)
    padded = jnp.pad(w32, ((0, nb * bn - n), (0, kb * bk - k)))
    amax = jnp.max(jnp.abs(padded.reshape(nb, bn, kb, bk)), axis=(1, 3))
    scale = jnp.maximum(amax, eps) / E4M3_MAX
    q = (w32 / _expand_scale(scale, (n, k), (bn, bk))).astype(jnp.float8_e4m3fn)
    return q, scale
