"""Rotary position embeddings for MLA's decoupled rope part: YaRN frequencies and interleaved application.

Letters: B batch, T tokens, N heads, P = qk_rope_head_dim (rotated size, even), P/2 frequency pairs.

The recipe is transformers 5.24's (``_compute_yarn_parameters`` and ``apply_rotary_pos_emb_interleave``):

1. ``pos_freqs[j] = theta ** (2j / P)`` in float32; ``inv_extra = 1 / pos_freqs``; ``inv_inter = 1 / (s * pos_freqs)``.
2. Correction range from ``original_max_position_embeddings`` ``L0``:
   ``d(r) = P * ln(L0 / (2 pi r)) / (2 ln theta)``, ``low = max(floor(d(beta_fast)), 0)``,
   ``high = min(ceil(d(beta_slow)), P - 1)`` (no floor/ceil when ``truncate=False``).
3. ``ramp[j] = clip((j - low) / (high - low), 0, 1)``; ``inv_freq = inv_inter * ramp + inv_extra * (1 - ramp)``.
4. cos/sin multiplier ``attention_factor = m(s, mscale) / m(s, mscale_all_dim)`` with ``m(s, a) = 0.1 a ln s + 1``
   (or ``m(s, 1)`` when either is unset); exactly 1.0 for every DeepSeek release.
5. Angles ``positions * inv_freq`` in float32; cos/sin cast to the compute dtype (as HF does) before use.
6. Interleaved pairs ``(x0, x1), (x2, x3), ...``: ``out = [x_even * cos - x_odd * sin | x_odd * cos + x_even * sin]``.
   The output is de-interleaved (HF 5.24 layout); q.k is unchanged because q and k get the same permutation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.configs import ModelConfig, yarn_get_mscale

__all__ = ["rope_frequencies", "rope_cos_sin", "apply_rope"]


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Returns ``(inv_freq [P/2] float32, attention_factor)`` for the config (host-side, NumPy)."""
    dim = cfg.qk_rope_head_dim
    base = np.float32(cfg.rope_theta)
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    pos_freqs = np.power(base, exponents, dtype=np.float32)
    inv_extra = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = cfg.rope_scaling
    if rs is None or rs.rope_type == "default":
        return inv_extra, 1.0

    factor = float(rs.factor)
    inv_inter = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    if rs.attention_factor is not None:
        attention_factor = float(rs.attention_factor)
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = float(yarn_get_mscale(factor, rs.mscale) / yarn_get_mscale(factor, rs.mscale_all_dim))
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(cfg.rope_theta))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = (np.float32(1.0) - ramp.astype(np.float32)).astype(np.float32)
    inv_freq = inv_inter * (np.float32(1.0) - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), attention_factor


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T] -> (cos, sin) [B, T, P/2]`` in ``dtype`` (angles in float32)."""
    inv_freq, attention_factor = rope_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    cos = jnp.cos(angles) * attention_factor
    sin = jnp.sin(angles) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of ``x [B, T, (N,) P]`` with ``cos/sin [B, T, P/2]``; output de-interleaved."""
    if x.ndim == cos.ndim + 1:  # per-head input: broadcast over N
        cos, sin = cos[..., None, :], sin[..., None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
