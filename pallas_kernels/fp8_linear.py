"""``fp8_linear(x, w)``: a linear layer whose three GEMMs run in FP8 the way DeepSeek-V3 trains.

``y [..., N] = x [..., K] @ w [K, N]`` (``w`` in the Flax ``(in, out)`` layout; ``w_layout="nk"`` takes the
checkpoint ``[out, in]`` layout instead), differentiable through ``jax.custom_vjp``:

* forward  ``Y = X W``:         X in 1x128 tiles along K, W in 128x128 blocks (``fp8_gemm`` 1d2d), output in
  ``x.dtype`` (or ``out_dtype``);
* dgrad    ``dX = dY W^T``:     dY in 1x128 tiles along N, the same W blocks stored transposed (1d2d);
* wgrad    ``dW = X^T dY``:     X and dY in 128x1 tiles (128-token groups) on both operands (1d1d), f32 output,
  returned in ``w.dtype``.

Quantisation is straight-through (its gradient is the identity; scales carry no gradient). The residuals saved
for the backward pass are FP8: X in 128x1 tiles (for wgrad) and W's transposed blocks (for dgrad).
``quantize=False`` turns every quantisation off (the same three GEMMs in f32), which ``check_grads`` can verify; a
subset of ``("fwd", "dgrad", "wgrad")`` quantises only those GEMMs (an ablation of where FP8 error enters; this mixed
form runs every GEMM as an f32 XLA dot on quantise-dequantised operands and saves x and w unquantised).

Leading axes of ``x`` are flattened into the token axis. The function works under ``jit``, ``vmap`` (the kernels
have batching rules; the Mosaic GPU GEMM folds a batched activation into more rows) and inside ``shard_map`` (it
only sees local shards).
Shapes whose K or N is not a multiple of 128 are zero-padded to whole tiles where the Pallas GEMMs run (the same
scales and quantised values as partial tiles), and use the XLA path with partial edge tiles elsewhere.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import hardware
from pallas_kernels.fp8_gemm import fp8_gemm, fp8_gemm_grouped
from pallas_kernels.fp8_quant import (BLOCK, _cast, _keep, _scale, act_quant, act_quant_dual, dequant,
                                      quantize_blocks, weight_quant_dual)
from pallas_kernels.grouped_matmul import cotangent_like, grouped_matmul, vary_like

__all__ = ["fp8_linear", "fp8_grouped_linear"]

# Every tile's scale comes from its own amax: the eps only keeps an all-zero tile's scale finite and non-zero. The
# quantisation ops' default (1e-4) suits O(1) values but clamps gradients: with the loss averaged over a batch,
# most 1x128 tiles of dY have amax far below 1e-4 (tiny, 1,024 tokens: 81% of tiles under 1e-4, 19% under 1e-5),
# and a clamped scale pushes their values into E4M3's subnormals or to zero.
EPS = 1e-30
GEMMS = ("fwd", "dgrad", "wgrad")


def _cdiv(a, b):
    return -(-a // b)


def _gemm_impl(implementation: str, n: int, k: int) -> str:
    if implementation == "auto":
        return "auto" if (n % BLOCK == 0 and k % BLOCK == 0) else "xla"
    return implementation


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _linear(x, w_nk, out_dtype, implementation, quantize):
    return _fwd(x, w_nk, out_dtype, implementation, quantize)[0]


def _qdq(a, block):
    """Quantise-dequantise ``a [R, C]`` in ``block`` tiles (XLA reference), f32."""
    q, s = quantize_blocks(a.astype(jnp.float32), block, eps=EPS)
    return dequant(q, s, block=block)


def _fwd(x, w_nk, out_dtype, implementation, quantize):
    n, k = w_nk.shape
    if quantize not in ((), GEMMS):       # ablation: some GEMMs quantised, f32 dots on dequantised operands
        xa = _qdq(x, (1, BLOCK)) if "fwd" in quantize else x.astype(jnp.float32)
        wa = _qdq(w_nk, (BLOCK, BLOCK)) if "fwd" in quantize else w_nk.astype(jnp.float32)
        return jnp.dot(xa, wa.T, precision="highest").astype(out_dtype), (x, w_nk)
    if not quantize:
        y = jnp.dot(x.astype(jnp.float32), w_nk.astype(jnp.float32).T, precision="highest")
        return y.astype(out_dtype), (x, w_nk)
    qi, gi = implementation, _gemm_impl(implementation, n, k)
    m = x.shape[0]
    mp = _cdiv(m, BLOCK) * BLOCK                        # wgrad needs whole 128-token groups: pad with zero rows
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    xq, xs, xtq, xts = act_quant_dual(xp, eps=EPS, implementation=qi)
    wq, ws, wtq, wts = weight_quant_dual(w_nk, eps=EPS, implementation=qi)
    y = fp8_gemm(xq[:m], xs[:m], wq, ws, out_dtype=out_dtype, implementation=gi)
    # Zero-size arrays carry the token count and the dtypes (custom_vjp residuals must be arrays).
    # (sliced from x and w so they also carry their varying mesh axes inside shard_map).
    return y, (xtq, xts, wtq, wts, x[:, :0], w_nk.reshape(-1)[:0])


def _linear_fwd(x, w_nk, out_dtype, implementation, quantize):
    return _fwd(x, w_nk, out_dtype, implementation, quantize)


def _linear_bwd(out_dtype, implementation, quantize, res, dy):
    if quantize not in ((), GEMMS):
        x, w_nk = res
        dy32 = dy.astype(jnp.float32)
        if "dgrad" in quantize:
            dx = jnp.dot(_qdq(dy32, (1, BLOCK)), _qdq(w_nk, (BLOCK, BLOCK)), precision="highest")
        else:
            dx = jnp.dot(dy32, w_nk.astype(jnp.float32), precision="highest")
        if "wgrad" in quantize:
            dw = jnp.dot(_qdq(dy32, (BLOCK, 1)).T, _qdq(x, (BLOCK, 1)), precision="highest")
        else:
            dw = jnp.dot(dy32.T, x.astype(jnp.float32), precision="highest")
        return cotangent_like(dx.astype(x.dtype), x), cotangent_like(dw.astype(w_nk.dtype), w_nk)
    if not quantize:
        x, w_nk = res
        dy32 = dy.astype(jnp.float32)
        dx = jnp.dot(dy32, w_nk.astype(jnp.float32), precision="highest")
        dw = jnp.dot(dy32.T, x.astype(jnp.float32), precision="highest")
        return cotangent_like(dx.astype(x.dtype), x), cotangent_like(dw.astype(w_nk.dtype), w_nk)
    xtq, xts, wtq, wts, x_like, w_like = res
    m, x_dtype, w_dtype = x_like.shape[0], x_like.dtype, w_like.dtype
    k, n = wtq.shape
    qi = implementation            # quantisation backend: fp8_quant's dispatch (Mosaic GPU/TPU kernel or XLA)
    mp = xtq.shape[1]
    dyp = jnp.pad(dy, ((0, mp - m), (0, 0))) if mp != m else dy
    dyq, dys, dytq, dyts = act_quant_dual(dyp, eps=EPS, implementation=qi)    # 1x128 along N, and 128x1
    # dgrad: dX [M, K] = dY [M, N] . W^T, with W^T stored [K, N] (K-major for this GEMM), 128x128 blocks.
    dx = fp8_gemm(dyq[:m], dys[:m], wtq, wts, out_dtype=x_dtype if x_dtype != jnp.float32 else jnp.float32,
                  implementation=_gemm_impl(implementation, k, n))
    # wgrad: dW [N, K] = dY^T [N, M] . X^T [K, M]^T, per-row scales on both operands, f32 out.
    dw = fp8_gemm(dytq, dyts, xtq, xts, variant="1d1d", out_dtype=jnp.float32,
                  implementation=_gemm_impl(implementation, k, mp))
    # inside shard_map: a replicated weight's gradient is summed over the token shards (see cotangent_like)
    return cotangent_like(dx.astype(x_dtype), x_like), cotangent_like(dw.astype(w_dtype), w_like)


_linear.defvjp(_linear_fwd, _linear_bwd)


def fp8_linear(x: jax.Array, w: jax.Array, *, w_layout: Literal["kn", "nk"] = "kn", out_dtype=None,
               implementation: Literal["auto", "xla", "pallas"] = "auto",
               quantize: bool | tuple[str, ...] = True) -> jax.Array:
    """``x [..., K] @ w [K, N] -> [..., N]`` with FP8 forward and backward GEMMs (see the module docstring).

    Args:
      x: activations, any float dtype; leading axes are tokens.
      w: the weight, ``[K, N]`` (``w_layout="kn"``, Flax kernels) or ``[N, K]`` (``"nk"``, checkpoints).
      out_dtype: output dtype (default ``x.dtype``); bf16 or f32.
      implementation: GEMM/quantisation backend, as in ``fp8_gemm``.
      quantize: ``False`` runs the same custom_vjp without any quantisation (f32 GEMMs), for gradient checks; a
        tuple of names from ``("fwd", "dgrad", "wgrad")`` quantises only those GEMMs (ablations; slow path).
    """
    if x.ndim < 1 or w.ndim != 2:
        raise ValueError(f"fp8_linear expects x [..., K] and a 2-D w; got {x.shape}, {w.shape}")
    if w_layout not in ("kn", "nk"):
        raise ValueError(f"fp8_linear: w_layout={w_layout!r}; use 'kn' ([in, out]) or 'nk' ([out, in])")
    w_nk = w.T if w_layout == "kn" else w
    n, k = w_nk.shape
    if x.shape[-1] != k:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features but w ({w_layout}) {w.shape} expects {k}")
    if isinstance(quantize, bool):
        quantize = GEMMS if quantize else ()
    if not isinstance(quantize, (tuple, list)) or set(quantize) - set(GEMMS):
        raise ValueError(f"fp8_linear: quantize={quantize!r}; use a bool or a subset of {GEMMS}")
    quantize = tuple(g for g in GEMMS if g in quantize)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        out_dtype = jnp.dtype(jnp.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    np_, kp = _cdiv(n, BLOCK) * BLOCK, _cdiv(k, BLOCK) * BLOCK
    if quantize and (np_, kp) != (n, k) and _pads_to_tiles(implementation):
        # The Pallas GEMMs need whole 128-tiles: zero-pad K and N (zeros leave every tile's amax, so every scale
        # and quantised value, as the XLA path's partial tiles have them) and slice; autodiff slices the grads.
        # (MLA's kv_a projection, N = 576, ran ~9x slower than BF16 on the XLA path.)
        y = _linear(jnp.pad(x2, ((0, 0), (0, kp - k))), jnp.pad(w_nk, ((0, np_ - n), (0, kp - k))), out_dtype,
                    implementation, quantize)[:, :n]
    else:
        y = _linear(x2, w_nk, out_dtype, implementation, quantize)
    return y.reshape(*lead, n)


def _pads_to_tiles(implementation: str) -> bool:
    """Whether the GEMMs would run a Pallas kernel (which needs whole tiles) rather than the XLA reference."""
    return implementation == "pallas" or (implementation == "auto" and jax.default_backend() in ("gpu", "tpu"))


# ----------------------------------------------------------------------------------------------------------------
# Grouped (MoE expert) variant: XLA / bf16 grouped matmuls on FP8-quantised operands, per expert group
# ----------------------------------------------------------------------------------------------------------------

def _qdq_rows(x, dtype):
    """1x128 tiles along the last axis, dequantised to ``dtype``."""
    q, s = act_quant(x, eps=EPS, implementation="xla")
    return dequant(q, s, out_dtype=dtype)


class _Layout(NamedTuple):
    """DeepGEMM's contiguous m-grouped layout of rows sorted by group: group g's rows start on a 128-row tile.

    Padded row p holds source row ``src[p]`` where ``valid[p]`` (zeros elsewhere); tile t belongs to group
    ``tile_group[t]``; source row r sits at padded row ``prow[r]`` (``row_valid[r]``: r < sum(group_sizes)); the
    first ``used_tiles`` tiles hold rows. ``Mp = 128 * (ceil(M/128) + G)`` is a static bound on the tiles any sizes
    need.
    """
    src: jax.Array          # [Mp] int32
    valid: jax.Array        # [Mp] bool
    tile_group: jax.Array   # [Mp / 128] int32
    prow: jax.Array         # [M] int32
    row_valid: jax.Array    # [M] bool
    used_tiles: jax.Array   # () int32


def _contiguous_layout(group_sizes, m: int) -> _Layout:
    g = group_sizes.shape[0]
    n_tiles = _cdiv(m, BLOCK) + g
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    chunks = (group_sizes + BLOCK - 1) // BLOCK
    chunk_ends = jnp.cumsum(chunks)
    first = chunk_ends - chunks                                        # each group's first tile
    t = jnp.arange(n_tiles, dtype=jnp.int32)
    tile_group = jnp.minimum(jnp.searchsorted(chunk_ends, t, side="right"), g - 1).astype(jnp.int32)
    p = jnp.arange(n_tiles * BLOCK, dtype=jnp.int32)
    pg = tile_group[p // BLOCK]
    off = p - first[pg] * BLOCK                                        # row within its group
    valid = (p // BLOCK < chunk_ends[-1]) & (off < group_sizes[pg])
    src = jnp.where(valid, starts[pg] + off, 0)
    r = jnp.arange(m, dtype=jnp.int32)
    er = jnp.minimum(jnp.searchsorted(ends, r, side="right"), g - 1)
    row_valid = r < ends[-1]
    prow = jnp.where(row_valid, first[er] * BLOCK + r - starts[er], 0)
    return _Layout(src, valid, tile_group, prow, row_valid, chunk_ends[-1])


def _laid_out(a, layout: _Layout):
    """``a [M, C]`` (rows sorted by group) on the 128-row tiles of ``layout``: ``[Mp, C]``, zero padding rows."""
    return jnp.where(layout.valid[:, None], a[layout.src], 0).astype(a.dtype)


def _unlaid(ap, layout: _Layout, dtype):
    """The inverse of :func:`_laid_out`: ``ap [Mp, C]`` back to the source rows ``[M, C]`` (rows past the groups: 0)."""
    return jnp.where(layout.row_valid[:, None], ap[layout.prow], 0).astype(dtype)


def _qdq_tiles(ap, dtype, eps: float = EPS):
    """128x1 tiles of a laid-out ``ap [Mp, C]``, dequantised: one scale per (tile, column), ``max(amax, eps) / 448``,
    from the tile's rows. Each tile holds one expert's rows (zero padding never raises an amax), so these are the
    128-token groups that start at each expert's first row."""
    mp, c = ap.shape
    a32 = ap.astype(jnp.float32).reshape(mp // BLOCK, BLOCK, c)
    sc = _scale(jnp.max(jnp.abs(a32), axis=1, keepdims=True), eps, False)
    return (_keep(_cast(a32, sc)).astype(jnp.float32) * sc).astype(dtype).reshape(mp, c)


def _qdq_expert_tokens(x, group_sizes, dtype, eps: float = EPS):
    """128x1 tiles that never straddle two experts, dequantised, in x's layout (``x [M, K]``, rows sorted by group).

    Each expert's rows are cut into 128-row groups from the expert's own first row, as DeepSeek-V3 does by padding
    every expert to a multiple of 128 tokens (the tiles of :func:`_contiguous_layout`, quantised by
    :func:`_qdq_tiles`); one scale per (group, column) from that group's own rows only. A group shared by two
    experts would scale one expert's rows by the other's range. Rows past ``sum(group_sizes)`` (ignored by the
    grouped matmul) come back as zeros.
    """
    lay = _contiguous_layout(group_sizes, x.shape[0])
    return _unlaid(_qdq_tiles(_laid_out(x, lay), dtype, eps), lay, dtype)


def _qdq_blocks(w, dtype):
    """128x128 blocks of each ``w[g]`` (``[K, N]``), dequantised."""
    def one(wg):
        q, s, _, _ = weight_quant_dual(wg, eps=EPS, implementation="xla")
        return dequant(q, s, block=(BLOCK, BLOCK), out_dtype=dtype)
    return jax.vmap(one)(w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped(x, w, group_sizes, implementation, dtype):
    return _grouped_fwd(x, w, group_sizes, implementation, dtype)[0]


def _grouped_fwd(x, w, group_sizes, implementation, dtype):
    wd = _qdq_blocks(w, dtype)
    y = grouped_matmul(_qdq_rows(x, dtype), wd, group_sizes, implementation=implementation)
    # zero-size likes sliced from x and w: their dtypes and (inside shard_map) varying mesh axes
    return y, (_qdq_expert_tokens(x, group_sizes, dtype), wd, group_sizes, x.reshape(-1)[:0], w.reshape(-1)[:0])


def _grouped_bwd(implementation, dtype, res, dy):
    xt, wd, group_sizes, x_like, w_like = res
    gmm = functools.partial(grouped_matmul, group_sizes=group_sizes, implementation=implementation)
    dx = gmm(_qdq_rows(dy, dtype), jnp.swapaxes(wd, 1, 2))                 # dgrad: dY in 1x128 tiles along N
    _, vjp_w = jax.vjp(lambda b: gmm(xt, b), wd)
    (dw,) = vjp_w(_qdq_expert_tokens(dy, group_sizes, dtype))               # wgrad: X, dY in 128-token groups
    return cotangent_like(dx.astype(x_like.dtype), x_like), cotangent_like(dw.astype(w_like.dtype), w_like), None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)


def _grouped_fp8_gemm(ap, layout: _Layout, wq, ws, out_dtype, implementation):
    """A laid-out ``ap [Mp, K]`` (:func:`_laid_out`) times per-group FP8 weights ``wq [G, N, K]`` (128x128 scales
    ``ws``) through the m-grouped FP8 GEMM: ``ap`` quantised in 1x128 tiles, multiplied, and the output rows
    gathered back to the source order (rows past the groups give zeros)."""
    with jax.named_scope("fp8_act_quant"):
        aq, sa = act_quant(ap, eps=EPS, implementation=implementation)
    with jax.named_scope("fp8_grouped_gemm"):
        out = fp8_gemm_grouped(aq, sa, wq, ws, layout.tile_group, out_dtype=out_dtype, implementation=implementation)
    with jax.named_scope("fp8_layout"):
        return _unlaid(out, layout, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped8(x, w, group_sizes, implementation, gmm_impl, dtype):
    return _grouped8_fwd(x, w, group_sizes, implementation, gmm_impl, dtype)[0]


def _grouped8_fwd(x, w, group_sizes, implementation, gmm_impl, dtype):
    # each w[g] [K, N]: 128x128 blocks in both layouts from one read -- [N, K] for the forward, [K, N] for dgrad
    # (named scopes: experiments/bench_fp8_experts.py --profile splits the time by them)
    with jax.named_scope("fp8_weight_quant"):
        wq_kn, ws_kn, wq_nk, ws_nk = jax.vmap(lambda wg: weight_quant_dual(wg, eps=EPS, implementation="xla"))(w)
    with jax.named_scope("fp8_layout"):
        layout = _contiguous_layout(group_sizes, x.shape[0])
        xp = _laid_out(x, layout)                 # one gather of x serves the forward GEMM and the wgrad operand
    y = _grouped_fp8_gemm(xp, layout, wq_nk, ws_nk, dtype, implementation)
    with jax.named_scope("fp8_wgrad_quant"):
        xt = _qdq_tiles(xp, dtype)
    return y, (xt, wq_kn, ws_kn, group_sizes, layout, x.reshape(-1)[:0], w.reshape(-1)[:0])


def _grouped8_bwd(implementation, gmm_impl, dtype, res, dy):
    xt, wq_kn, ws_kn, group_sizes, layout, x_like, w_like = res
    with jax.named_scope("fp8_layout"):
        dyp = _laid_out(dy, layout)
    dx = _grouped_fp8_gemm(dyp, layout, wq_kn, ws_kn, dtype, implementation)   # dgrad: dY 1x128 along N
    # wgrad on the tiles: X and dY in 128-token groups, each expert's rows padded to whole tiles (zero rows add
    # nothing), so the grouped matmul's groups are the padded sizes
    padded = (group_sizes + BLOCK - 1) // BLOCK * BLOCK
    gmm = functools.partial(grouped_matmul, group_sizes=padded, implementation=gmm_impl)
    # (the primal weight only types the vjp: zeros, varying over w's mesh axes inside shard_map as w does)
    with jax.named_scope("fp8_wgrad_quant"):
        dyt = _qdq_tiles(dyp, dtype)
    with jax.named_scope("fp8_wgrad"):
        _, vjp_w = jax.vjp(lambda b: gmm(xt, b), vary_like(jnp.zeros(wq_kn.shape, dtype), w_like))
        (dw,) = vjp_w(dyt)
    return cotangent_like(dx.astype(x_like.dtype), x_like), cotangent_like(dw.astype(w_like.dtype), w_like), None


_grouped8.defvjp(_grouped8_fwd, _grouped8_bwd)


def grouped_fp8_gemm_on_mosaic_gpu(k: int, n: int, implementation: str = "auto") -> bool:
    """Whether :func:`fp8_grouped_linear` ``(x [M, K], w [G, K, N], implementation=...)`` runs its forward and
    activation-gradient GEMMs in the Mosaic GPU m-grouped FP8 kernel: what ``gemm="auto"`` chooses ``"fp8"`` by."""
    return (implementation in ("auto", "mosaic_gpu", "pallas") and jax.default_backend() == "gpu"
            and hardware.is_hopper() and k % BLOCK == 0 and n % BLOCK == 0)


def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, compute_dtype=jnp.bfloat16,
                       implementation: str = "auto", gemm: Literal["auto", "bf16", "fp8"] = "auto") -> jax.Array:
    """MoE experts with DeepSeek-V3 FP8 numerics: ``x [M, K]`` (rows sorted by group) ``x w [G, K, N] -> [M, N]``.

    With ``gemm="bf16"`` every operand is quantised exactly as in :func:`fp8_linear` (x and dY
    in 1x128 tiles, each ``w[g]`` in 128x128 blocks, the weight gradient's x and dY in 128-token groups), then
    dequantised to ``compute_dtype`` and multiplied by ``pallas_kernels.grouped_matmul`` (``implementation``: the
    Mosaic GPU bf16 kernels on Hopper, ``lax.ragged_dot`` elsewhere). So the numerics are FP8's (up to the bf16
    rounding of the dequantised values) but the speed is the bf16 grouped matmul's. The weight gradient's
    128-token groups start at each expert's first row (DeepSeek pads every expert to 128 rows), so no group's
    scale mixes two experts' rows.

    ``gemm="fp8"`` runs the forward and the activation gradient through the m-grouped FP8 GEMM
    (:func:`pallas_kernels.fp8_gemm_grouped`, the Mosaic GPU kernel on Hopper, else its XLA reference): each
    expert's rows are laid out on 128-row tiles (DeepGEMM's contiguous layout, at most ``G`` padding tiles), the
    activations quantised in 1x128 tiles and the weights in 128x128 blocks as above; the weight gradient stays a
    quantise-dequantise + grouped-matmul path, on the same 128-row tiles (each expert padded to whole tiles). ``implementation`` then picks the FP8 kernels too: ``"auto"`` /
    ``"mosaic_gpu"`` -> Mosaic GPU where supported, ``"xla"`` / ``"tiled"`` -> the XLA references. On an H200
    (``experiments/bench_fp8_experts.py``, ``docs/benchmarks.md``) it ran the experts' forward + backward
    1.16-1.24x faster than ``gemm="bf16"``, and the FP8 ``small`` train step 1.19x faster.

    ``gemm="auto"`` (the default) is ``"fp8"`` where the Mosaic GPU grouped kernel runs both GEMMs (a Hopper GPU,
    ``implementation`` ``"auto"`` / ``"mosaic_gpu"`` / ``"pallas"``, K and N multiples of 128), else ``"bf16"``
    (on CPU the XLA reference of the FP8 GEMM is slower than the dequantised matmul and computes the same values).
    """
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"fp8_grouped_linear expects x [M, K] and w [G, K, N]; got {x.shape}, {w.shape}")
    if gemm == "auto":
        gemm = "fp8" if grouped_fp8_gemm_on_mosaic_gpu(x.shape[1], w.shape[2], implementation) else "bf16"
    if gemm == "fp8":
        impl8 = {"auto": "auto", "mosaic_gpu": "auto", "pallas": "pallas", "xla": "xla", "tiled": "xla"}
        if implementation not in impl8:
            raise ValueError(f"fp8_grouped_linear: implementation={implementation!r}; use one of {list(impl8)}")
        gmm_impl = "auto" if implementation == "pallas" else implementation
        return _grouped8(x, w, group_sizes.astype(jnp.int32), impl8[implementation], gmm_impl,
                         jnp.dtype(compute_dtype))
    if gemm != "bf16":
        raise ValueError(f"fp8_grouped_linear: gemm={gemm!r}; use 'auto', 'bf16' or 'fp8'")
    return _grouped(x, w, group_sizes.astype(jnp.int32), implementation, jnp.dtype(compute_dtype))
