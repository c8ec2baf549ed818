"""Grouped (ragged) matrix multiplication for dropless MoE: ``out[rows of group g] = x[rows of g] @ w[g]``.

``grouped_matmul(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N]`` where the rows of ``x`` are sorted by group and
``group_sizes`` counts them (summing to M). Differentiable in ``x`` and ``w``.

Backends (``implementation=``):

* ``"xla"``: ``jax.lax.ragged_dot`` -- the reference, any platform. (On GPUs with jax 0.11 it runs at ~10 TFLOP/s on
  MoE shapes: usable for tests, far too slow for training.)
* ``"mosaic_gpu"``: the Hopper Pallas Mosaic GPU kernels shipped with jax
  (``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` for the forward and the input gradient,
  ``transposed_ragged_dot_mgpu`` for the weight gradient: ``dw[g] = x_g^T dy_g``), joined with ``jax.custom_vjp``.
  Requires sm_90, bf16/fp16 operands and ``K, N`` multiples of the 128/64 tiles. Measured on an H200 at
  M=98304, K=1024, N=512, G=64: 0.24 ms forward (431 TFLOP/s) against 10.4 ms for ``lax.ragged_dot``.
* ``"tiled"``: XLA, any platform: each group's rows are zero-padded to whole tiles of ``T`` rows (a static bound:
  ``ceil(M/T) + G`` tiles), every tile is multiplied by its group's gathered weight in one batched matmul, and the
  rows are gathered back. ~1x the FLOPs plus at most ``G*T`` padding rows. On CPU ``lax.ragged_dot`` runs ~20x
  slower than a plain matmul of the same FLOPs (M=115k, K=64, N=32, G=16, 2 cores: 424 ms forward+backward against
  18 ms), which made MoE training on CPU (tests, demos) mostly ragged-dot time.
* ``"auto"`` (default): Mosaic GPU where supported, ``tiled`` on CPU, otherwise ``lax.ragged_dot``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import hardware

__all__ = ["grouped_matmul", "mosaic_gpu_supported", "pad_rows", "vary_like"]

Implementation = Literal["auto", "xla", "tiled", "mosaic_gpu"]
_BLOCK_M, _BLOCK_N, _BLOCK_K = 128, 128, 64
# Pipeline depth (forward, activation gradient) and the weight gradient's N-band of the planar-snake tile order, from
# a sweep on an H100 at `small`'s fused gate/up shape (experiments/bench_grouped_matmul.py --sweep,
# docs/benchmarks.md): 6 stages ran the forward 1.23x faster than 4 (4 stay best for the activation gradient), and
# bands of 4 tile columns (``_grid_block_n``) ran the weight gradient 1.15x faster than 1.
_FWD_STAGES, _DGRAD_STAGES, _WGRAD_STAGES = 6, 4, 4


def mosaic_gpu_supported(x: jax.Array, w: jax.Array) -> bool:
    """Whether the Mosaic GPU kernels handle these operands (platform, dtype and tile divisibility)."""
    _, k = x.shape
    _, k2, n = w.shape
    return (hardware.is_hopper() and x.dtype == w.dtype and x.dtype in (jnp.bfloat16, jnp.float16) and k == k2
            and k % _BLOCK_K == 0 and n % _BLOCK_N == 0 and k % _BLOCK_M == 0 and n % _BLOCK_K == 0)


def _grid_block_n(n: int) -> int:
    for g in (4, 2, 1):
        if (n // _BLOCK_N) % g == 0:
            return g
    return 1


def _mgpu_forward(x, w, group_sizes, transpose_rhs=False):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    n = w.shape[1] if transpose_rhs else w.shape[2]
    out = ragged_dot_mgpu.ragged_dot(x, w, group_sizes=group_sizes, block_m=_BLOCK_M, block_n=_BLOCK_N,
                                     block_k=_BLOCK_K,
                                     max_concurrent_steps=_DGRAD_STAGES if transpose_rhs else _FWD_STAGES,
                                     grid_block_n=_grid_block_n(n), transpose_rhs=transpose_rhs)
    return vary_like(out, x, w, group_sizes)


def _mgpu_weight_grad(x, dy, group_sizes):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    dw = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=group_sizes, block_m=_BLOCK_M, block_n=_BLOCK_N, block_k=_BLOCK_K,
        max_concurrent_steps=_WGRAD_STAGES, grid_block_n=_grid_block_n(dy.shape[1]))
    return vary_like(dw, x, dy, group_sizes)


@jax.custom_vjp
def _gmm_mgpu(x, w, group_sizes):
    return _mgpu_forward(x, w, group_sizes)


def _gmm_mgpu_fwd(x, w, group_sizes):
    return _mgpu_forward(x, w, group_sizes), (x, w, group_sizes)


def _gmm_mgpu_bwd(res, dy):
    x, w, group_sizes = res
    dy = dy.astype(x.dtype)
    dx = _mgpu_forward(dy, w, group_sizes, transpose_rhs=True)   # [M, N] x [G, K, N]^T -> [M, K]
    dw = _mgpu_weight_grad(x, dy, group_sizes)                    # per group x_g^T dy_g -> [G, K, N]
    return cotangent_like(dx, x), cotangent_like(dw.astype(w.dtype), w), None


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
    """Gives a cotangent computed inside ``shard_map`` the varying mesh axes of its primal: summed (psum) over the
    axes the primal is invariant on (a replicated weight's gradient is the sum of the shards' contributions),
    cast to varying over the axes the primal varies on. The identity outside ``shard_map``."""
    extra = tuple(sorted(_varying_axes(ct) - _varying_axes(primal)))
    if extra:
        ct = jax.lax.psum(ct, extra)
    missing = tuple(sorted(_varying_axes(primal) - _varying_axes(ct)))
    return jax.lax.pcast(ct, missing, to="varying") if missing else ct


_gmm_mgpu.defvjp(_gmm_mgpu_fwd, _gmm_mgpu_bwd)


def _varying_axes(x: jax.Array) -> frozenset:
    mat = getattr(jax.typeof(x), "manual_axis_type", None)
    return frozenset(getattr(mat, "varying", ()) or ())


def vary_like(out, *inputs: jax.Array):
    """Types a kernel's outputs (a pytree) as varying over every mesh axis its ``inputs`` vary on.

    ``plgpu.kernel`` traces with ``check_vma`` off, so inside ``shard_map`` a Mosaic GPU kernel's outputs come back
    typed *invariant* although each device computed its own values. JAX then inserts a ``pvary`` where such an
    output meets varying data, and the transpose of that ``pvary`` is a ``psum``: the backward pass would sum the
    output cotangents of all devices (wrong gradients, plus an all-reduce of activations per kernel). Re-typing the
    outputs here (a no-op at run time) keeps per-device values per device. The identity outside ``shard_map``.
    """
    axes = frozenset().union(*(_varying_axes(x) for x in inputs))
    if not axes:
        return out

    def fix(o):
        missing = tuple(sorted(axes - _varying_axes(o)))
        return jax.lax.pcast(o, missing, to="varying") if missing else o

    return jax.tree.map(fix, out)


def match_varying(*xs: jax.Array) -> tuple[jax.Array, ...]:
    """Inside ``shard_map``, marks every operand as varying over the union of the operands' varying mesh axes.

    A custom-VJP kernel must return cotangents of its inputs' types: a weight replicated over ``data`` (invariant)
    multiplied with data-sharded (varying) tokens gets a varying gradient, which JAX rejects. Casting the weight to
    varying *before* the custom VJP moves the sum over ``data`` into JAX's own transpose of the cast (a psum), as
    for any built-in primitive. Outside ``shard_map`` this is the identity.
    """
    return tuple(vary_like(xs, *xs))


def pad_rows(x: jax.Array, group_sizes: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """Pads ``x [M, K]`` with zero rows to a multiple of ``multiple`` (when ``M > multiple``), assigning them to the
    last group; slicing the first M output rows undoes it. (The Mosaic GPU kernels' TMA tiling needs M <= 8 or a
    multiple of 8: speculative decoding at batch 1 has M = 2 tokens x K experts = 12.)"""
    m = x.shape[0]
    if m <= multiple or m % multiple == 0:
        return x, group_sizes
    pad = multiple - m % multiple
    return jnp.pad(x, ((0, pad), (0, 0))), group_sizes.at[-1].add(pad)


def _gmm_tiled(x: jax.Array, w: jax.Array, group_sizes: jax.Array, preferred_element_type) -> jax.Array:
    """``"tiled"`` (see the module docstring). Letters: M rows, K in, N out, G groups, T rows per tile, P padded
    rows (``ceil(M/T)*T + G*T``), B tiles (``P/T``). ``tmk,tkn->tmn`` over tiles of one group each."""
    m, k = x.shape
    g, _, n = w.shape
    t = int(min(128, max(8, 1 << max(0, (-(-m // g) - 1).bit_length()))))     # ~ rows per group, power of 2
    p = -(-m // t) * t + g * t
    padded = -(-group_sizes // t) * t                                          # [G] rows after padding
    start = jnp.cumsum(group_sizes) - group_sizes                              # [G] first row of each group
    pstart = jnp.cumsum(padded) - padded                                       # [G] ... in the padded layout
    gid = jnp.repeat(jnp.arange(g), group_sizes, total_repeat_length=m)       # [M] group of each row
    dest = pstart[gid] + jnp.arange(m) - start[gid]                            # [M] padded row of each row
    xp = jnp.zeros((p, k), x.dtype).at[dest].set(x, unique_indices=True)      # [P, K]
    tile_group = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(p // t) * t, side="right")
    wt = jnp.take(w, jnp.minimum(tile_group, g - 1), axis=0)                  # [B, K, N]
    yp = jnp.einsum("bmk,bkn->bmn", xp.reshape(p // t, t, k), wt,
                    preferred_element_type=preferred_element_type)
    y = jnp.take(yp.reshape(p, n), dest, axis=0, unique_indices=True)
    return jnp.where((jnp.arange(m) < group_sizes.sum())[:, None], y, 0)    # rows past the groups: 0, as ragged_dot


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   implementation: Implementation = "auto", preferred_element_type=None) -> jax.Array:
    """``[M, K] x [G, K, N] -> [M, N]`` with rows grouped by ``group_sizes [G]`` (int32, summing to M).

    ``preferred_element_type`` applies to the XLA path; the Mosaic GPU kernels accumulate in float32 and return the
    operand dtype.
    """
    if x.ndim != 2 or w.ndim != 3 or group_sizes.shape != (w.shape[0],):
        raise ValueError(f"grouped_matmul expects x [M, K], w [G, K, N], group_sizes [G]; got {x.shape}, "
                         f"{w.shape}, {group_sizes.shape}")
    if implementation == "auto":
        implementation = ("mosaic_gpu" if mosaic_gpu_supported(x, w) else
                          "tiled" if jax.default_backend() == "cpu" else "xla")
    if implementation == "tiled":
        return _gmm_tiled(x, w, group_sizes.astype(jnp.int32), preferred_element_type)
    if implementation == "mosaic_gpu":
        if not mosaic_gpu_supported(x, w):
            raise ValueError(f"implementation='mosaic_gpu' needs a Hopper GPU, bf16/fp16 operands of one dtype and "
                             f"K, N multiples of {_BLOCK_N}; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}. "
                             f"Fix: use implementation='xla' or 'auto'")
        m = x.shape[0]
        xp, gs = pad_rows(x, group_sizes.astype(jnp.int32), 8)
        return _gmm_mgpu(*match_varying(xp, w, gs))[:m]
    if implementation != "xla":
        raise ValueError(f"implementation={implementation!r} is unknown; use 'auto', 'xla', 'tiled' or "
                         f"'mosaic_gpu'")
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type)
