"""FP8 (E4M3) GEMM with DeepSeek-V3 blockwise scales and FP32 promotion every 128 of K.

``out[M, N] = sum_kb (A8[:, kb] @ B8[:, kb]^T) * sa[m, kb] * sb[., kb]`` where ``kb`` runs over 128-wide K blocks:

* ``variant="1d2d"`` (forward, activation gradient): ``sb[N/128, K/128]``, one scale per 128x128 weight block,
  i.e. ``sb[n // 128, kb]``. ``B8[N, K]`` is the weight as checkpoints store it (``[out, in]``, K-major).
* ``variant="1d1d"`` (weight gradient): ``sb[N, K/128]``, one scale per row and 128-wide K group on both operands.

Letters: ``M`` rows of A (tokens), ``N`` rows of B (output features), ``K`` the contraction, ``Kb = K / 128``.
``a [M, K]`` e4m3, ``sa [M, Kb]`` f32, ``b [N, K]`` e4m3, ``sb [N/128, Kb]`` or ``[N, Kb]`` f32 -> ``[M, N]`` in
``out_dtype`` (bf16 or f32).

Backends (``implementation=``):

* ``"xla"``: the reference -- dequantise both operands to f32 and ``dot`` (any platform, any shape, partial edge
  tiles included).
* ``"pallas"``: Mosaic GPU on Hopper (sm_90): a persistent, warp-specialised kernel (one TMA producer warpgroup,
  two wgmma consumer warpgroups, FP8 wgmma with a fresh f32 accumulator per 128-wide K step that is scaled and
  added to an f32 register accumulator -- optionally one K step behind the tensor cores so promotion overlaps the
  next wgmma), CTA tiles 128 rows by 64-192 columns (wider ones straddle two weight blocks and pick one of two
  block scales per 32-column chunk; partial edge tiles along N), planar-snake tile order, optional CTA-pair
  clusters that multicast the shared operand tile (``GemmConfig.cluster``), epilogue through SMEM and TMA. On TPU
  (and on CPU, interpreted) a Mosaic TPU ``pl.pallas_call`` with an f32 VMEM accumulator. Needs ``K % 128 == 0``
  and ``N % 64 == 0`` (GPU) / ``N % 128 == 0`` (TPU); M is padded.
* ``"auto"`` (default): Pallas where supported, XLA otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import hardware
from pallas_kernels.grouped_matmul import vary_like

__all__ = ["GemmConfig", "fit_config", "fp8_gemm", "fp8_gemm_grouped", "gemm_reference", "grouped_gemm_reference",
           "mosaic_gpu_supported", "default_config", "resolve_config"]

BLOCK = 128
TILE_NS = (64, 128, 160, 192)
Variant = Literal["1d2d", "1d1d"]
Implementation = Literal["auto", "xla", "pallas"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiling of the Mosaic GPU kernel. Each of the two consumer warpgroups owns a ``64 x tile_n`` output tile;
    ``wg_dim="m"`` stacks them along M (CTA tile 128 x tile_n), ``"n"`` along N (CTA tile 64 x 2 tile_n).
    ``overlap``: promote K step k-1 while the wgmma of step k runs. ``grid_minor``/``grid_width`` set the
    planar-snake raster order of the persistent loop. ``cluster``: ``"m"`` pairs two CTAs along M in a cluster of 2
    that multicast the shared B (weight) tile from one TMA load (half the L2->SMEM traffic for B); ``"n"`` pairs
    them along N sharing the A tile; ``"none"``: no clusters.

    ``tile_n`` 160 or 192 trades registers (two ``64 x tile_n`` f32 tiles per consumer thread; 256 would need more
    than the 232 a consumer gets) for less shared-memory traffic per FLOP and other wave counts; N need not be a
    multiple of it (TMA zero-fills the loads of a partial edge tile and clips its store). Such a tile straddles two
    128-wide weight blocks: the 1d2d promotion reads both blocks' scales and picks one per 32-column chunk, as
    DeepGEMM does for its unaligned BLOCK_N. ``b_scale_cols=True`` instead reads the 1d2d weight scales per output
    column from SMEM (the scale grid expanded 128x along N, TMA-loaded with the operands), the 1d1d path: measured
    0.8x of the scalar-scale path at 128 (docs/benchmarks.md), kept to compare."""
    tile_n: int = 128
    wg_dim: Literal["m", "n"] = "m"
    stages: int = 4
    overlap: bool = False
    grid_minor: Literal["m", "n"] = "n"
    grid_width: int = 8
    cluster: Literal["none", "m", "n"] = "none"
    b_scale_cols: bool = False

    def __post_init__(self):
        if self.tile_n not in TILE_NS:
            raise ValueError(f"GemmConfig.tile_n={self.tile_n} is unsupported; use one of {TILE_NS}")
        if self.tile_n > 128 and self.overlap:
            raise ValueError(f"GemmConfig(tile_n={self.tile_n}, overlap=True) needs three {self.tile_n}-wide f32 "
                             f"tiles in registers per thread, more than Hopper has; use overlap=False or tile_n<=128")
        if self.wg_dim not in ("m", "n"):
            raise ValueError(f"GemmConfig.wg_dim={self.wg_dim!r}; use 'm' or 'n'")
        if self.grid_minor not in ("m", "n"):
            raise ValueError(f"GemmConfig.grid_minor={self.grid_minor!r}; use 'm' or 'n'")
        if not 2 <= self.stages <= 8:
            raise ValueError(f"GemmConfig.stages={self.stages}; use 2..8 (SMEM limits larger values)")
        if self.grid_width < 1:
            raise ValueError(f"GemmConfig.grid_width={self.grid_width} must be >= 1")
        if self.cluster not in ("none", "m", "n"):
            raise ValueError(f"GemmConfig.cluster={self.cluster!r}; use 'none', 'm' or 'n'")

    @property
    def cta(self) -> tuple[int, int]:
        return (128, self.tile_n) if self.wg_dim == "m" else (64, 2 * self.tile_n)

    @property
    def cluster_tile(self) -> tuple[int, int]:
        """The (M, N) extent of one cluster's output tile (the shape multiple the kernel needs)."""
        cm, cn = self.cta
        return (cm * (2 if self.cluster == "m" else 1), cn * (2 if self.cluster == "n" else 1))


# Relative speed of a full wave of 128 x tile_n CTA tiles (1d2d, no partial tiles), fitted to an H200 sweep of
# M in {4096, 8192} x V3's (N, K) (docs/benchmarks.md, session 17): wider tiles move less shared memory per FLOP.
TILE_SPEED = {128: 1.0, 160: 1.07, 192: 1.10}


def _wave_efficiency(m: int, n: int, tile_n: int, num_sms: int) -> float:
    """Useful fraction of the SM-time a persistent grid of 128 x tile_n tiles takes: whole waves of ``num_sms``
    tiles, partial tiles at the N edge counted as work wasted."""
    tiles = _cdiv(m, 128) * _cdiv(n, tile_n)
    return m * n / (_cdiv(tiles, num_sms) * num_sms * 128 * tile_n)


def default_config(m: int, n: int, k: int, *, variant: Variant = "1d2d", num_sms: int = 132) -> GemmConfig:
    """Heuristic tiling from H200 sweeps (docs/benchmarks.md).

    * M > 512, 1d2d: the tile width in (128, 160, 192) with the best ``TILE_SPEED x wave efficiency`` (as DeepGEMM
      picks its BLOCK_N by waves): 160 at 4096 x 7168, 192 at N = 2112 or 24576, 128 at 4096 x 4096. 128-wide tiles
      multicast the A tile to a CTA pair along N when K is long (+0.5-1% at K >= 7168, slightly slower at K = 1536);
      the wider ones multicast the B tile to a CTA pair along M when K <= 2048 (+1-4% at K = 512-2048 on an H100,
      session 17), and run without clusters at longer K (pairs along N were slower at 4 of 6 such shapes).
    * 1d1d (the weight gradient) stays at 128: its per-column scales cost registers a wider tile does not have.
    * 64-wide N tiles when the 128x128 grid would leave most of the SMs idle; promotion overlapped with the next
      wgmma for small M (M <= 512: it won every such shape, and lost every large one)."""
    small = m <= 512
    if _cdiv(m, 128) * (n // 128) < num_sms or (n % 128 and (small or variant != "1d2d")):
        return GemmConfig(tile_n=64, wg_dim="m", overlap=small)
    if small:
        return GemmConfig(overlap=True)
    narrow = GemmConfig(cluster="n" if k >= 4096 else "none")
    if variant != "1d2d":
        return narrow
    widths = [t for t in TILE_SPEED if t > 128 or n % 128 == 0]
    best = max(widths, key=lambda t: TILE_SPEED[t] * _wave_efficiency(m, n, t, num_sms))
    return narrow if best == 128 else GemmConfig(tile_n=best, cluster="m" if k <= 2048 else "none")


SMEM_BYTES = 232448          # Hopper's shared memory per block (the limit Mosaic GPU checks)


def smem_bytes(cfg: GemmConfig, out_itemsize: int = 2, col_scales: bool = False) -> int:
    """Shared memory the Mosaic GPU kernel allocates: ``stages`` x (A, B and scale tiles) + the two warpgroups'
    output tiles (+2 KiB of barriers and alignment, measured)."""
    cm, cn = cfg.cta
    stage = cm * BLOCK + cn * BLOCK + 4 * cm + (4 * cn if col_scales else 0)
    return cfg.stages * stage + 2 * 64 * cfg.tile_n * out_itemsize + 2048


def fit_config(cfg: GemmConfig, m: int, n: int, *, out_dtype=jnp.bfloat16, variant: Variant = "1d2d") -> GemmConfig:
    """``cfg`` adjusted to a shape: no cluster where the pair's tile does not divide N (cluster "n") or where M has
    an odd number of CTA rows (cluster "m": padding M to the pair would add a whole tile row of work); 64-wide
    tiles along M where N is not a multiple of the CTA tile (tiles wider than 128 are kept: the kernel runs partial
    edge tiles); fewer pipeline stages where the output tiles would not fit in shared memory beside them (float32
    output with 160- or 192-wide tiles: 3 stages)."""
    col = variant == "1d1d" or cfg.b_scale_cols
    while cfg.stages > 2 and smem_bytes(cfg, jnp.dtype(out_dtype).itemsize, col) > SMEM_BYTES:
        cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
    if cfg.tile_n > 128:
        if cfg.cluster == "m" and _cdiv(m, cfg.cta[0]) % 2:
            cfg = dataclasses.replace(cfg, cluster="none")
        return cfg
    if cfg.cluster == "n" and n % cfg.cluster_tile[1]:
        cfg = dataclasses.replace(cfg, cluster="none")
    if n % cfg.cta[1]:
        cfg = dataclasses.replace(cfg, tile_n=64, wg_dim="m", cluster="m" if cfg.cluster == "m" else "none")
    if cfg.cluster == "m" and _cdiv(m, cfg.cta[0]) % 2:
        cfg = dataclasses.replace(cfg, cluster="none")
    return cfg


def resolve_config(m: int, n: int, k: int, config: GemmConfig | None = None, *, variant: Variant = "1d2d",
                   out_dtype=jnp.bfloat16, num_sms: int | None = None) -> GemmConfig:
    """The tiling the Mosaic GPU kernel runs for this GEMM: ``config`` (or ``default_config``) through
    ``fit_config``."""
    cfg = config or default_config(m, n, k, variant=variant, num_sms=num_sms or _num_sms())
    return fit_config(cfg, m, n, out_dtype=out_dtype, variant=variant)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------

def _check(a, sa, b, sb, variant):
    if a.ndim != 2 or b.ndim != 2 or sa.ndim != 2 or sb.ndim != 2:
        raise ValueError(f"fp8_gemm expects 2-D a, sa, b, sb; got {a.shape}, {sa.shape}, {b.shape}, {sb.shape}")
    m, k = a.shape
    n, k2 = b.shape
    if k != k2:
        raise ValueError(f"fp8_gemm: a [M, K] = {a.shape} and b [N, K] = {b.shape} disagree on K "
                         f"(b is the weight in [out, in] layout)")
    kb = _cdiv(k, BLOCK)
    if sa.shape != (m, kb):
        raise ValueError(f"fp8_gemm: sa shape {sa.shape} should be (M, ceil(K/128)) = {(m, kb)}")
    if variant == "1d2d":
        want = (_cdiv(n, BLOCK), kb)
    elif variant == "1d1d":
        want = (n, kb)
    else:
        raise ValueError(f"fp8_gemm: variant={variant!r}; use '1d2d' (128x128 weight blocks) or '1d1d' (per-row)")
    if sb.shape != want:
        raise ValueError(f"fp8_gemm: sb shape {sb.shape} should be {want} for variant {variant!r}")


def gemm_reference(a, sa, b, sb, *, variant: Variant = "1d2d", out_dtype=jnp.bfloat16) -> jax.Array:
    """Dequantise to f32 and multiply (``precision=HIGHEST``): the semantics every backend must match."""
    _check(a, sa, b, sb, variant)
    m, k = a.shape
    n = b.shape[0]
    sa_full = jnp.repeat(sa.astype(jnp.float32), BLOCK, axis=1)[:, :k]
    if variant == "1d2d":
        sb_full = jnp.repeat(jnp.repeat(sb.astype(jnp.float32), BLOCK, axis=0), BLOCK, axis=1)[:n, :k]
    else:
        sb_full = jnp.repeat(sb.astype(jnp.float32), BLOCK, axis=1)[:, :k]
    a, b = lax.optimization_barrier((a, b))     # keep XLA GPU from folding a quantise/dequantise round trip
    a32 = a.astype(jnp.float32) * sa_full
    b32 = b.astype(jnp.float32) * sb_full
    out = lax.dot_general(a32, b32, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                          preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Mosaic TPU kernel (pl.pallas_call; tested with interpret=True)
# ----------------------------------------------------------------------------------------------------------------

def _tpu_kernel(*refs, variant, bn, nb_per_group=None):
    """One (bm, bn) output tile, one 128-wide K step per grid step. m-grouped (``nb_per_group``): a leading
    scalar-prefetched ``tile_group`` ref picks the row tile's group, whose weight-block scales start at row
    ``tile_group[i] * nb_per_group`` of ``sb``."""
    from jax.experimental import pallas as pl

    if nb_per_group is None:
        a_ref, b_ref, sa_ref, sb_ref, o_ref, acc_ref = refs
        sb_row0 = 0
    else:
        tg_ref, a_ref, b_ref, sa_ref, sb_ref, o_ref, acc_ref = refs
        sb_row0 = tg_ref[pl.program_id(0)] * nb_per_group
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    part = lax.dot_general(a_ref[...], b_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    sa = sa_ref[pl.ds(kk, 1), :]                                          # (1, bm)  MN-major row of scales
    if variant == "1d2d":
        sb = sb_ref[sb_row0 + pl.program_id(1) * (bn // BLOCK), kk]       # scalar from SMEM
        scale = sa.T * sb
    else:
        scale = sa.T * sb_ref[pl.ds(kk, 1), :]                            # (bm, 1) * (1, bn)
    acc_ref[...] += part * scale

    @pl.when(kk == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_gemm(a, sa_t, b, sb, *, variant, out_dtype, interpret, bm=128, bn=128):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    m, k = a.shape
    n = b.shape[0]
    kb = k // BLOCK                                                       # sa_t: (Kb, M) MN-major
    grid = (m // bm, n // bn, kb)
    if variant == "1d2d":
        sb_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        sb_in = sb
    else:
        sb_spec = pl.BlockSpec((kb, bn), lambda i, j, kk: (0, j))
        sb_in = sb.T                                                      # (Kb, N)
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, variant=variant, bn=bn),
        grid=grid,
        in_specs=[pl.BlockSpec((bm, BLOCK), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bn, BLOCK), lambda i, j, kk: (j, kk)),
                  pl.BlockSpec((kb, bm), lambda i, j, kk: (0, i)),
                  sb_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(a, b, sa_t, sb_in)
    return vary_like(out, a, b, sa_t, sb_in)


# ----------------------------------------------------------------------------------------------------------------
# Mosaic GPU kernel (Hopper)
# ----------------------------------------------------------------------------------------------------------------

def _num_sms() -> int:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and getattr(mesh, "abstract_device", None) is not None:
        return mesh.abstract_device.num_cores
    return jax.devices()[0].core_count


def _mgpu_gemm(a, sa_t, b, sb, tile_group=None, *, variant, out_dtype, cfg: GemmConfig, interpret=None, b_kn=False,
               num_sms=None, groups: int = 0):
    """a [M, K], sa_t [Kb, M], b [N, K] (or [K, N] with ``b_kn``, a test-only layout for the GPU interpreter,
    which cannot run wgmma on a transposed SMEM view), sb [Nb, Kb] (1d2d) or sb_t [Kb, N] (1d1d, and 1d2d with
    ``cfg.b_scale_cols``: the block scales expanded per column). N need not be a multiple of the cluster tile: the
    edge tiles are partial (TMA zero-fills their loads and clips their stores).

    ``groups=G`` (m-grouped, 1d2d): b stacks G weights ``[G*N, K]`` (``[K, G*N]`` with ``b_kn``), sb ``[G*Nb, Kb]``,
    and ``tile_group [M/128]`` int32 names the group of each 128-row tile of a (values in [0, G))."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, k = a.shape
    n = (b.shape[1] if b_kn else b.shape[0]) // max(groups, 1)
    kb = k // BLOCK
    if groups and (variant != "1d2d" or cfg.cluster == "m" or tile_group is None or n % BLOCK):
        raise ValueError("m-grouped fp8_gemm: variant '1d2d' with tile_group, and no CTA pair along M (the pair "
                         "could straddle two groups), N a multiple of 128")
    tile_m, tile_n = 64, cfg.tile_n
    cta_m, cta_n = cfg.cta
    clu_m, clu_n = cfg.cluster_tile
    if m % clu_m or n % 64 or k % BLOCK:
        raise ValueError(f"Mosaic GPU fp8_gemm: shape {(m, n, k)} needs M a multiple of the cluster tile's "
                         f"{clu_m}, N of 64 and K of {BLOCK}")
    col_scales = variant == "1d1d" or cfg.b_scale_cols        # sb is then sb_t [Kb, N]: one scale per column
    two_blocks = not col_scales and tile_n > BLOCK            # 1d2d tiles straddling two weight blocks
    m_iters, n_iters = m // clu_m, _cdiv(n, clu_n)
    clustered = cfg.cluster != "none"
    share_b = ("cluster",) if cfg.cluster == "m" else ()     # B (and 1d1d sb) multicast to the CTA pair along M
    share_a = ("cluster",) if cfg.cluster == "n" else ()     # A and sa multicast to the CTA pair along N
    out_dtype = jnp.dtype(out_dtype)
    fp8_tr = (plgpu.TilingTransform((8, BLOCK)), plgpu.SwizzleTransform(128))  # 128 e4m3 = one 128-byte swizzle
    kn_swz = plgpu.find_swizzle(tile_n * 8)                  # b_kn (test-only): N is the minor dim of the B tile
    b_tr = (plgpu.TilingTransform((8, kn_swz)), plgpu.SwizzleTransform(kn_swz)) if b_kn else fp8_tr
    out_swz = plgpu.find_swizzle(tile_n * out_dtype.itemsize * 8)
    out_tr = (plgpu.TilingTransform((8, out_swz // out_dtype.itemsize)), plgpu.SwizzleTransform(out_swz))

    def kernel(a_gmem, sa_gmem, b_gmem, sb_gmem, *refs):
        grp_gmem, o_gmem = refs if groups else (None, refs[0])
        def get_pipeline(body, compute_context):
            specs = [
                plgpu.BlockSpec((cta_m, BLOCK), lambda kk: (0, kk), transforms=fp8_tr, collective_axes=share_a),
                (plgpu.BlockSpec((BLOCK, cta_n), lambda kk: (kk, 0), transforms=b_tr, collective_axes=share_b)
                 if b_kn else
                 plgpu.BlockSpec((cta_n, BLOCK), lambda kk: (0, kk), transforms=fp8_tr, collective_axes=share_b)),
                plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0), collective_axes=share_a),
            ]
            if col_scales:
                specs.append(plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0), collective_axes=share_b))
            return plgpu.emit_pipeline_warp_specialized(
                body, grid=(kb,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=cfg.stages, compute_context=compute_context)

        ignore = lambda *_, **__: None  # noqa: E731
        sample = [a_gmem.at[pl.ds(0, cta_m), :],
                  b_gmem.at[:, pl.ds(0, cta_n)] if b_kn else b_gmem.at[pl.ds(0, cta_n), :],
                  sa_gmem.at[:, pl.ds(0, cta_m)]]
        if col_scales:
            sample.append(sb_gmem.at[:, pl.ds(0, cta_n)])

        @functools.partial(pl.run_scoped,
                           allocs=get_pipeline(ignore, ignore).get_allocations(*sample),
                           o_smem=plgpu.SMEM((2, tile_m, tile_n), out_dtype, transforms=out_tr),
                           collective_axes="wg")
        def _scope(allocs, o_smem):
            wg = lax.axis_index("wg")
            wg_m = pl.ds(wg * tile_m, tile_m) if cfg.wg_dim == "m" else pl.ds(0, tile_m)
            wg_n = pl.ds(wg * tile_n, tile_n) if cfg.wg_dim == "n" else pl.ds(0, tile_n)

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1 if cfg.grid_minor == "n" else 0,
                                            cfg.grid_width)
                if clustered:                                # the pair's CTAs take adjacent tiles
                    cta = lax.axis_index("cluster")
                    if cfg.cluster == "m":
                        mi = mi * 2 + cta
                    else:
                        ni = ni * 2 + cta
                # m-grouped: this tile's group selects its weight rows (and their block scales) in the stack
                g = grp_gmem[(mi * cta_m) // BLOCK] if groups else 0
                b_row0 = g * n + ni * cta_n
                c0 = ni * cta_n + (wg * tile_n if cfg.wg_dim == "n" else 0)     # this warpgroup's first column
                # (clamped: with CTA pairs along N the pair's second tile may lie wholly past N; its loads read
                # zeros, its store is clipped, and its scale reads must stay inside sb)
                nb = jnp.minimum(g * (n // BLOCK) + c0 // BLOCK, sb_gmem.shape[0] - 1)
                if two_blocks:          # the tile's first `split` columns are in weight block nb, the rest in nb1
                    split = (c0 // BLOCK + 1) * BLOCK - c0
                    nb1 = jnp.minimum(nb + 1, sb_gmem.shape[0] - 1)

                def scale_of(ki, sa_smem, sb_smem):
                    sa = sa_smem[0, wg_m]                                          # (64,) row scales
                    if two_blocks:
                        return sa * sb_gmem[nb, ki], sa * sb_gmem[nb1, ki]         # rows x either block's scale
                    if not col_scales:
                        return sa * sb_gmem[nb, ki], None
                    return sa, sb_smem[0, wg_n]                                    # (tile_n,) column scales

                def apply(part, sa, sb):
                    if two_blocks:      # per 32-column chunk (split is a multiple of 32): one select of 2 values
                        chunks = []
                        for c in range(tile_n // 32):
                            r = jnp.where(lax.broadcast_in_dim(c * 32 < split, (tile_m,), ()), sa, sb)
                            chunks.append(part[:, c * 32:(c + 1) * 32] * lax.broadcast_in_dim(r, (tile_m, 32), (0,)))
                        return jnp.concatenate(chunks, axis=1)
                    s = lax.broadcast_in_dim(sa, (tile_m, tile_n), (0,))
                    if sb is not None:
                        s = s * lax.broadcast_in_dim(sb, (tile_m, tile_n), (1,))
                    return part * s

                def body(idxs, a_smem, b_smem, sa_smem, *rest):
                    (ki,) = idxs
                    sb_smem = rest[0] if col_scales else None
                    carry = rest[-1]
                    rhs = b_smem.at[:, wg_n] if b_kn else b_smem.at[wg_n].transpose((1, 0))
                    sa, sb = scale_of(ki, sa_smem, sb_smem)
                    if cfg.overlap:
                        total, prev, prev_sa, prev_sb = carry

                        def mma(acc_ref):
                            plgpu.wgmma(acc_ref, a_smem.at[wg_m], rhs)
                            new_total = total + apply(prev, prev_sa, prev_sb)     # overlaps the async wgmma
                            return new_total, acc_ref[...]

                        new_total, part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
                        return new_total, part, sa, (sb if sb is not None else prev_sb)

                    def mma(acc_ref):
                        plgpu.wgmma(acc_ref, a_smem.at[wg_m], rhs)
                        return acc_ref[...]

                    part = pl.run_scoped(mma, plgpu.ACC((tile_m, tile_n), jnp.float32))
                    return carry + apply(part, sa, sb)

                def compute_context(eval_pipeline):
                    zeros = jnp.zeros((tile_m, tile_n), jnp.float32)
                    if cfg.overlap:
                        zsb = jnp.zeros((tile_n,), jnp.float32) if col_scales else None
                        total, prev, prev_sa, prev_sb = eval_pipeline(
                            (zeros, zeros, jnp.zeros((tile_m,), jnp.float32), zsb))
                        acc = total + apply(prev, prev_sa, prev_sb)
                    else:
                        acc = eval_pipeline(zeros)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)               # previous tile's store is done
                    o_smem[wg] = acc.astype(out_dtype)
                    plgpu.commit_smem()
                    rows = pl.ds(mi * cta_m + (wg * tile_m if cfg.wg_dim == "m" else 0), tile_m)
                    cols = pl.ds(ni * cta_n + (wg * tile_n if cfg.wg_dim == "n" else 0), tile_n)
                    plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[rows, cols])

                args = [a_gmem.at[pl.ds(mi * cta_m, cta_m), :],
                        b_gmem.at[:, pl.ds(b_row0, cta_n)] if b_kn else b_gmem.at[pl.ds(b_row0, cta_n), :],
                        sa_gmem.at[:, pl.ds(mi * cta_m, cta_m)]]
                if col_scales:
                    args.append(sb_gmem.at[:, pl.ds(b_row0, cta_n)])
                get_pipeline(body, compute_context)(*args, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kw = {} if interpret is None else {"interpret": interpret}
    if clustered:
        kw.update(cluster=(2,), cluster_names=("cluster",))
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=((num_sms or _num_sms()) // (2 if clustered else 1),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kw,
    )
    ins = (a, sa_t, b, sb) + ((tile_group.astype(jnp.int32),) if groups else ())
    return vary_like(f(*ins), *ins)   # typed per device inside shard_map (see vary_like)


def _kernel_sb(sb, variant, cfg: GemmConfig, n: int):
    """The weight scales as the Mosaic GPU kernel reads them: ``[Nb, Kb]`` (1d2d, one scalar per weight block) or
    ``[Kb, N]`` (1d1d; 1d2d with ``cfg.b_scale_cols``: each block's scale repeated over its 128 columns)."""
    if variant == "1d1d":
        return sb.T
    if cfg.b_scale_cols:
        return jnp.repeat(sb, BLOCK, axis=0)[:n].T
    return sb


def _batchable(kernel_fn, a, sa_t, b, sb, **kw):
    """``kernel_fn(a, sa_t [Kb, M], b, sb)`` with a vmap rule: a batch on the activation only is folded into M (one
    launch); any other batching runs the kernel once per batch element (``lax.map``)."""

    @jax.custom_batching.custom_vmap
    def call(a, sa_t, b, sb):
        return kernel_fn(a, sa_t, b, sb, **kw)

    @call.def_vmap
    def _rule(axis_size, in_batched, a, sa_t, b, sb):
        a_b, sa_b, b_b, sb_b = in_batched
        if not b_b and not sb_b:
            a = a if a_b else jnp.broadcast_to(a, (axis_size, *a.shape))
            sa_t = sa_t if sa_b else jnp.broadcast_to(sa_t, (axis_size, *sa_t.shape))
            bsz, m, k = a.shape
            out = call(a.reshape(bsz * m, k), jnp.moveaxis(sa_t, 0, 1).reshape(sa_t.shape[1], bsz * m), b, sb)
            return out.reshape(bsz, m, -1), True
        args = [x if bt else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, bt in zip((a, sa_t, b, sb),
                                                                                        in_batched)]
        return lax.map(lambda t: call(*t), tuple(args)), True

    return call(a, sa_t, b, sb)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------

def mosaic_gpu_supported(m: int, n: int, k: int) -> bool:
    """Whether ``implementation="pallas"`` can run this (M, N, K) on the current GPU."""
    return hardware.is_hopper() and k % BLOCK == 0 and n % 64 == 0 and m > 0


def _pallas_supported(m, n, k) -> bool:
    backend = jax.default_backend()
    if backend == "gpu":
        return mosaic_gpu_supported(m, n, k)
    return k % BLOCK == 0 and n % BLOCK == 0


def fp8_gemm(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, *, variant: Variant = "1d2d",
             out_dtype=jnp.bfloat16, implementation: Implementation = "auto", config: GemmConfig | None = None,
             interpret=None) -> jax.Array:
    """Blockwise-scaled FP8 GEMM ``a [M, K] x b [N, K]^T -> [M, N]`` (see the module docstring for scales).

    Args:
      a, sa: e4m3 activations and their 1x128 scales ``[M, ceil(K/128)]``.
      b, sb: e4m3 weight ``[N, K]`` and its scales, ``[ceil(N/128), ceil(K/128)]`` for ``variant="1d2d"`` or
        ``[N, ceil(K/128)]`` for ``"1d1d"``.
      out_dtype: bf16 or f32 (accumulation is f32 either way).
      implementation: ``"auto"``, ``"xla"`` or ``"pallas"`` (Mosaic GPU on Hopper, Mosaic TPU elsewhere).
      config: Mosaic GPU tiling (default: ``default_config``).
      interpret: for the TPU kernel off-TPU (default: interpret on CPU).
    """
    _check(a, sa, b, sb, variant)
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"fp8_gemm: out_dtype={out_dtype} is unsupported; use bfloat16 or float32")
    m, k = a.shape
    n = b.shape[0]
    if implementation == "auto":
        implementation = "pallas" if _pallas_supported(m, n, k) and jax.default_backend() in ("gpu", "tpu") \
            else "xla"
    if implementation == "xla":
        return gemm_reference(a, sa, b, sb, variant=variant, out_dtype=out_dtype)
    if implementation != "pallas":
        raise ValueError(f"fp8_gemm: implementation={implementation!r} is unknown; use 'auto', 'xla' or 'pallas'")
    if a.dtype != jnp.float8_e4m3fn or b.dtype != jnp.float8_e4m3fn:
        raise TypeError(f"fp8_gemm(implementation='pallas') needs float8_e4m3fn operands, got {a.dtype}, {b.dtype}")
    if not _pallas_supported(m, n, k):
        raise ValueError(f"fp8_gemm(implementation='pallas') does not support (M, N, K) = {(m, n, k)} on "
                         f"{jax.default_backend()}: needs K % 128 == 0 and N % 64 == 0 (GPU, Hopper only) or "
                         f"N % 128 == 0 (TPU). Fix: implementation='xla' or 'auto'")
    sa = sa.astype(jnp.float32)
    sb = sb.astype(jnp.float32)
    if jax.default_backend() == "gpu":
        cfg = resolve_config(m, n, k, config, variant=variant, out_dtype=out_dtype)
        mp = _cdiv(m, cfg.cluster_tile[0]) * cfg.cluster_tile[0]
        if mp != m:
            a = jnp.pad(a, ((0, mp - m), (0, 0)))
            sa = jnp.pad(sa, ((0, mp - m), (0, 0)))
        out = _batchable(_mgpu_gemm, a, sa.T, b, _kernel_sb(sb, variant, cfg, n), variant=variant,
                         out_dtype=jnp.dtype(out_dtype), cfg=cfg)
        return out[:m]
    mp = _cdiv(m, 128) * 128
    if mp != m:
        a = jnp.pad(a, ((0, mp - m), (0, 0)))
        sa = jnp.pad(sa, ((0, mp - m), (0, 0)))
    if interpret is None and jax.default_backend() != "tpu":
        from jax.experimental.pallas import tpu as pltpu
        interpret = pltpu.InterpretParams()
    return _batchable(_tpu_gemm, a, sa.T, b, sb, variant=variant, out_dtype=jnp.dtype(out_dtype),
                      interpret=interpret or False)[:m]


# ----------------------------------------------------------------------------------------------------------------
# m-grouped (MoE experts): rows of each group contiguous and aligned to 128-row tiles, one weight per group
# ----------------------------------------------------------------------------------------------------------------

def _check_grouped(a, sa, b, sb, tile_group):
    if a.ndim != 2 or b.ndim != 3 or sa.ndim != 2 or sb.ndim != 3 or tile_group.ndim != 1:
        raise ValueError(f"fp8_gemm_grouped expects a [M, K], sa [M, Kb], b [G, N, K], sb [G, Nb, Kb], tile_group "
                         f"[M/128]; got {a.shape}, {sa.shape}, {b.shape}, {sb.shape}, {tile_group.shape}")
    m, k = a.shape
    g, n, k2 = b.shape
    if k != k2 or m % BLOCK:
        raise ValueError(f"fp8_gemm_grouped: a {a.shape} and b {b.shape} must share K, and M must be a multiple of "
                         f"128 (each group's rows start on a 128-row tile)")
    kb = _cdiv(k, BLOCK)
    if sa.shape != (m, kb) or sb.shape != (g, _cdiv(n, BLOCK), kb) or tile_group.shape != (m // BLOCK,):
        raise ValueError(f"fp8_gemm_grouped: scales {sa.shape}, {sb.shape} or tile_group {tile_group.shape} do not "
                         f"match a {a.shape}, b {b.shape} (want {(m, kb)}, {(g, _cdiv(n, BLOCK), kb)}, "
                         f"{(m // BLOCK,)})")


def grouped_gemm_reference(a, sa, b, sb, tile_group, *, out_dtype=jnp.bfloat16) -> jax.Array:
    """Dequantise to f32 and multiply each 128-row tile by its group's weight (``lax.ragged_dot``, HIGHEST): the
    semantics of :func:`fp8_gemm_grouped` (needs ``tile_group`` non-decreasing, as the contiguous layout has it)."""
    _check_grouped(a, sa, b, sb, tile_group)
    m, k = a.shape
    g, n, _ = b.shape
    a, b = lax.optimization_barrier((a, b))
    a32 = a.astype(jnp.float32) * jnp.repeat(sa.astype(jnp.float32), BLOCK, axis=1)[:, :k]
    sb_full = jnp.repeat(jnp.repeat(sb.astype(jnp.float32), BLOCK, axis=1), BLOCK, axis=2)[:, :n, :k]
    b32 = b.astype(jnp.float32) * sb_full                                             # [G, N, K]
    sizes = BLOCK * jnp.bincount(tile_group.astype(jnp.int32), length=g).astype(jnp.int32)
    out = lax.ragged_dot(a32, jnp.swapaxes(b32, 1, 2), sizes, precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _tpu_gemm_grouped(a, sa_t, b, sb, tile_group, *, groups, out_dtype, interpret, bm=BLOCK, bn=128):
    """Mosaic TPU m-grouped GEMM: a [M, K], sa_t [Kb, M], b [G*N, K], sb [G*Nb, Kb]; ``tile_group [M/128]`` is
    scalar-prefetched and picks each row tile's weight blocks in the index maps."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    m, k = a.shape
    n = b.shape[0] // groups
    kb = k // BLOCK
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(m // bm, n // bn, kb),
        in_specs=[pl.BlockSpec((bm, BLOCK), lambda i, j, kk, tg: (i, kk)),
                  pl.BlockSpec((bn, BLOCK), lambda i, j, kk, tg: (tg[i] * (n // bn) + j, kk)),
                  pl.BlockSpec((kb, bm), lambda i, j, kk, tg: (0, i)),
                  pl.BlockSpec(memory_space=pltpu.SMEM)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, tg: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
    )
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, variant="1d2d", bn=bn, nb_per_group=n // BLOCK),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(tile_group, a, b, sa_t, sb)
    return vary_like(out, a, b, sa_t, sb)


def fp8_gemm_grouped(a: jax.Array, sa: jax.Array, b: jax.Array, sb: jax.Array, tile_group: jax.Array, *,
                     out_dtype=jnp.bfloat16, implementation: Implementation = "auto",
                     config: GemmConfig | None = None, interpret=None) -> jax.Array:
    """m-grouped blockwise FP8 GEMM for MoE experts (DeepGEMM's "contiguous" layout): ``out[rows of tile t] =
    a[rows of t] @ b[tile_group[t]]^T`` with 1x128 activation scales and 128x128 weight-block scales (1d2d).

    Args:
      a, sa: e4m3 ``[M, K]`` rows sorted by group, each group's rows starting on a 128-row boundary (zero rows pad
        each group to whole tiles; ``M % 128 == 0``), and ``[M, ceil(K/128)]`` scales.
      b, sb: e4m3 weights ``[G, N, K]`` (``[out, in]`` per group) and ``[G, ceil(N/128), ceil(K/128)]`` scales.
      tile_group: ``[M / 128]`` int32, the group of each 128-row tile, non-decreasing; trailing unused tiles may
        repeat the last group (their rows, zeros, give zeros).
      implementation: ``"pallas"`` (the Mosaic GPU kernel on Hopper: each persistent tile reads its group's weight
        rows from the stacked weights; elsewhere a Mosaic TPU ``pallas_call`` whose index maps pick each row tile's
        weight blocks from the scalar-prefetched ``tile_group``, interpreted off-TPU), ``"xla"`` (dequantise +
        ``lax.ragged_dot``), ``"auto"``: Pallas on Hopper GPUs and TPUs when ``N`` and ``K`` are multiples of 128,
        XLA otherwise.
      config: Mosaic GPU tiling (default ``default_config``; CTA pairs along M are not used: a pair could span two
        groups).
      interpret: for the TPU kernel off-TPU (default: interpret on CPU).
    """
    _check_grouped(a, sa, b, sb, tile_group)
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"fp8_gemm_grouped: out_dtype={out_dtype} is unsupported; use bfloat16 or float32")
    m, k = a.shape
    g, n, _ = b.shape
    backend = jax.default_backend()
    ok = n % BLOCK == 0 and k % BLOCK == 0 and (hardware.is_hopper() if backend == "gpu" else True)
    if implementation == "auto":
        implementation = "pallas" if ok and backend in ("gpu", "tpu") else "xla"
    if implementation == "xla":
        return grouped_gemm_reference(a, sa, b, sb, tile_group, out_dtype=out_dtype)
    if implementation != "pallas":
        raise ValueError(f"fp8_gemm_grouped: implementation={implementation!r}; use 'auto', 'xla' or 'pallas'")
    if not ok:
        raise ValueError(f"fp8_gemm_grouped(implementation='pallas') needs N, K multiples of 128 (and Hopper on "
                         f"GPUs); got (M, N, K) = {(m, n, k)} on {backend}. Fix: implementation='xla'")
    tile_group = jnp.clip(tile_group.astype(jnp.int32), 0, g - 1)
    if backend != "gpu":                     # Mosaic TPU (interpreted off-TPU, as fp8_gemm does)
        if interpret is None and backend != "tpu":
            from jax.experimental.pallas import tpu as pltpu
            interpret = pltpu.InterpretParams()
        return _tpu_gemm_grouped(a, sa.astype(jnp.float32).T, b.reshape(g * n, k),
                                 sb.astype(jnp.float32).reshape(-1, sb.shape[2]), tile_group, groups=g,
                                 out_dtype=jnp.dtype(out_dtype), interpret=interpret or False)
    cfg = resolve_config(m, n, k, config, out_dtype=out_dtype)
    if cfg.cluster == "m":
        cfg = dataclasses.replace(cfg, cluster="none")
    return _mgpu_gemm(a, sa.astype(jnp.float32).T, b.reshape(g * n, k),
                      _kernel_sb(sb.astype(jnp.float32).reshape(-1, sb.shape[2]), "1d2d", cfg, g * n), tile_group,
                      variant="1d2d",
                      out_dtype=jnp.dtype(out_dtype), cfg=cfg, groups=g)
