"""Multi-head Latent Attention (DeepSeek-V2/V3) with a naive (training/prefill) and an absorbed (decode) path.

Letters: B batch, S query tokens, T key tokens, D hidden_size, N heads, R_q q_lora_rank, R kv_lora_rank,
C qk_nope_head_dim, P qk_rope_head_dim, V v_head_dim.

Algorithm (per layer):

1. Query: ``q = q_b_proj(RMSNorm(q_a_proj(x)))`` (q-LoRA, V3/V2) or ``q = q_proj(x)`` (V2-Lite):
   ``[B,S,D] -> [B,S,N,C+P]``, split into ``q_nope [B,S,N,C]`` and ``q_rot [B,S,N,P]``; RoPE on ``q_rot``.
2. Latent: ``kv_a_proj_with_mqa(x) -> [B,T,R+P]``; ``c_kv = RMSNorm(first R)`` and ``k_rot = RoPE(last P)``:
   one rope key per token shared by all heads. ``(c_kv, k_rot)`` -- R + P = 576 values for V3 -- is the only
   per-token state a cache needs.
3. Naive path: ``kv_b_proj(c_kv) -> [B,T,N,C+V]`` = ``k_nope | v``; ``K = [k_nope | bcast(k_rot)]``,
   ``Q = [q_nope | q_rot]``; ``softmax(Q.K * scale + mask)`` in float32; ``O = P.V``; ``o_proj``.
4. Absorbed path: with ``W_UK = kv_b_proj[:, :, :C]`` ``(R,N,C)`` and ``W_UV = kv_b_proj[:, :, C:]`` ``(R,N,V)``:
   ``q_lat = q_nope . W_UK`` (``bsnc,rnc->bsnr``), scores ``q_lat . c_kv + q_rot . k_rot``, ``o_lat = P . c_kv``
   (``bnst,btr->bsnr``), ``O = o_lat . W_UV`` (``bsnr,rnv->bsnv``). Same function, no K/V expansion: per decoded
   token the cost is linear in R instead of N*(C+V). The scores, masked softmax and ``o_lat`` run as one fused
   kernel on GPUs (``pallas_kernels.mla_decode_attention``, ``cfg.mla_decode_impl``), the einsums elsewhere.
   Under a sharding plan that core runs in a ``shard_map`` over the batch axes (and the ``act_heads`` rule's axes):
   each device attends over its own rows of the batch-split cache, with whichever implementation ``"auto"`` picks
   for the per-device shapes, so the kernel never runs on all-gathered operands.

The softmax scale is ``cfg.softmax_scale`` (``(C+P)**-0.5`` times the YaRN ``mscale_all_dim`` correction squared).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.configs import ModelConfig
from dsjax.model.cache import write_layer_rows
from dsjax.model.layers import DecodeCopy, Linear, RMSNorm, dtype_of
from dsjax.model.rope import apply_rope
from dsjax.sharding import map_shards
from pallas_kernels.hardware import hopper_or_newer
from pallas_kernels.mla_decode import mla_decode_attention

__all__ = ["MLA", "MLAImpl", "DocumentMask", "document_runs"]


def _causal(s: int, t: int) -> jax.Array:
    """``[1, S, T]`` causal mask for queries at slots ``0..S-1`` over keys ``0..T-1`` (no cache, one document)."""
    return (jnp.arange(t)[None, :] <= jnp.arange(s)[:, None])[None]

MLAImpl = Literal["naive", "absorbed"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DocumentMask:
    """The attention mask of packed documents without a cache: ``dense [B,S,S]`` (causal within each document,
    :func:`dsjax.model.make_attention_mask`) plus the same documents as ``attention_impl="cudnn_packed"`` describes
    them to cuDNN (:func:`document_runs`, computed once per forward for every layer): ``offsets [B, M+1]``,
    ``lengths [B, M]`` and ``fits`` (scalar bool: every row has at most ``M`` documents; else the layers use
    ``dense``). Build it with :meth:`of`.

    The packed description treats each run of equal consecutive ids as one document, as packing lays them out; a
    row that repeats an id after another one (which the dense mask would join into one document) is not packing's
    output and would be split there."""

    dense: jax.Array
    offsets: jax.Array
    lengths: jax.Array
    fits: jax.Array

    @classmethod
    def of(cls, dense: jax.Array, segment_ids: jax.Array, max_documents: int) -> "DocumentMask":
        offsets, lengths, runs = document_runs(segment_ids, max_documents)
        return cls(dense, offsets, lengths, jnp.max(runs) <= max_documents)


def document_runs(segment_ids: jax.Array, max_documents: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs of equal consecutive ``segment_ids [B,S]`` per row (a packed row's documents, padding included) in the
    description jax's cuDNN packed layout takes: ``offsets [B, M+1]`` the first token of each run, ``lengths [B, M]``
    their lengths (both padded with -1), and ``runs [B]`` how many runs each row has (``M = max_documents``; runs
    past ``M`` are left out, so the caller must check ``runs <= M``)."""
    b, s = segment_ids.shape
    idx = jnp.arange(s, dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(start, axis=1, dtype=jnp.int32) - 1                       # [B,S] the run of each token
    rows = jnp.arange(b)[:, None]
    slot = jnp.where(start, run, max_documents)                                 # non-starts write out of bounds
    offsets = jnp.full((b, max_documents), -1, jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(idx, (b, s)), mode="drop")
    counts = jnp.zeros((b, max_documents), jnp.int32).at[rows, run].add(1, mode="drop")
    lengths = jnp.where(counts > 0, counts, -1)
    offsets = jnp.concatenate([offsets, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return offsets, lengths, start.sum(axis=1, dtype=jnp.int32)
_MLA_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use the RMSNorm default in HF and DeepSeek's code


def _cudnn_flash_available(dtype) -> bool:
    """cuDNN fused attention runs on Hopper-or-newer GPUs in bf16/fp16."""
    if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return False
    return hopper_or_newer()


def _cudnn_at_least(version: int) -> bool:
    """Whether the cuDNN jax runs is at least ``version`` (e.g. 91000 for 9.10); False when unknown."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        return check_cudnn_version() >= version
    except Exception:  # noqa: BLE001 - no cuDNN, or jax moved its internal API: take the public paths
        return False


def _cudnn_mla_available() -> bool:
    """cuDNN's MLA mode (key and value head sizes differ) needs cuDNN >= 9.10 on Hopper or newer."""
    return _cudnn_at_least(91000)


def _cudnn_packed_available() -> bool:
    """The packed (offsets and lengths) layout through jax's internal entry point; "auto" takes it only with a
    cuDNN as new as the one it was verified on (9.10+, session 13) and an entry point that still takes offsets."""
    try:
        import inspect

        from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention

        takes_offsets = "q_offsets" in inspect.signature(dot_product_attention).parameters
    except Exception:  # noqa: BLE001
        return False
    return takes_offsets and _cudnn_at_least(91000)


def _auto_impl(q: jax.Array, v: jax.Array) -> str:
    """``attention_impl="auto"``: cuDNN on Hopper with bf16/fp16 (its MLA mode when the value head size differs and
    cuDNN >= 9.10), else the einsum core."""
    if not _cudnn_flash_available(q.dtype):
        return "einsum"
    return "cudnn_mla" if v.shape[-1] != q.shape[-1] and _cudnn_mla_available() else "cudnn"


def describes_documents(cfg: ModelConfig, dtype) -> bool:
    """Whether packed rows reach attention described as documents (:class:`DocumentMask`) and not only masked:
    ``attention_impl="cudnn_packed"``, or ``"auto"`` where cuDNN flash attention runs with the packed layout
    (cuDNN >= 9.10: it matched the dense-mask kernel's error against float32 and ran a `small` train step 1.04x
    faster on an H200)."""
    impl = cfg.attention_impl
    return impl == "cudnn_packed" or (impl == "auto" and _cudnn_flash_available(dtype) and _cudnn_packed_available())


class MLA(nnx.Module):
    """Multi-head Latent Attention. See the module docstring for the algorithm and shape letters."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8_block: tuple[int, int] | None = None):
        self.cfg = cfg
        pd, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        kw = dict(param_dtype=pd, dtype=dt, rngs=rngs, init_std=cfg.initializer_range, fp8_block=fp8_block,
                  fp8_kernel_min_rows=cfg.fp8_weight_kernel_min_rows)
        d, n = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(d, (n, cfg.qk_head_dim), in_axes=("embed",), out_axes=("heads", "qk_head"),
                                 fp8_compute=cfg.fp8_compute("q_proj"), **kw)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(d, cfg.q_lora_rank, in_axes=("embed",), out_axes=("q_lora",),
                                   use_bias=cfg.attention_bias, fp8_compute=cfg.fp8_compute("q_a_proj"), **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=_MLA_NORM_EPS, param_dtype=pd, axis_name="q_lora")
            self.q_b_proj = Linear(cfg.q_lora_rank, (n, cfg.qk_head_dim), in_axes=("q_lora",),
                                   out_axes=("heads", "qk_head"), fp8_compute=cfg.fp8_compute("q_b_proj"), **kw)
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, in_axes=("embed",),
                                         out_axes=("kv_lora_rope",), use_bias=cfg.attention_bias,
                                         fp8_compute=cfg.fp8_compute("kv_a_proj_with_mqa"), **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=_MLA_NORM_EPS, param_dtype=pd, axis_name="kv_lora")
        self.kv_b_proj = Linear(cfg.kv_lora_rank, (n, cfg.qk_nope_head_dim + cfg.v_head_dim),
                                in_axes=("kv_lora",), out_axes=("heads", "kv_head"),
                                fp8_compute=cfg.fp8_compute("kv_b_proj"), **kw)
        self.o_proj = Linear((n, cfg.v_head_dim), d, in_axes=("heads", "v_head"), out_axes=("embed",),
                             use_bias=cfg.attention_bias, fp8_compute=cfg.fp8_compute("o_proj"), **kw)
        # Decoding copies (DecodeCopy variables; set by `add_decode_copies`, None otherwise): W_UK and W_UV as their
        # own arrays, and q_a_proj's and kv_a_proj_with_mqa's kernels side by side for one GEMM.
        self.w_uk, self.w_uv, self.qkv_a = nnx.data(None), nnx.data(None), nnx.data(None)

    def add_decode_copies(self) -> list:
        """Gives this module the weights decoding would otherwise re-derive on every step, as
        :class:`~dsjax.model.layers.DecodeCopy` variables: ``w_uk [R, N, C]`` and ``w_uv [R, N, V]``, the halves of
        ``kv_b_proj`` that the absorbed attention folds into the query and the output, and -- when both are plain
        (not FP8, no bias) -- ``qkv_a [D, Q + R + P]``, ``q_a_proj``'s and ``kv_a_proj_with_mqa``'s kernels side by
        side, so that both projections of ``x`` are one GEMM. XLA would slice ``kv_b_proj`` and concatenate the two
        kernels (its dot merger) inside the decode loop, a copy of each per layer and step: it does not hoist slices
        out of loops. Memory: one more copy of those three weights while the decode model lives (V3: ~64 MB per layer
        in bf16, ~4 GB over 61 layers). Returns the new variables (to pass through one ``optimization_barrier``)."""
        w_uk, w_uv = self._w_uk_uv()
        axes = self.kv_b_proj.kernel_axes
        self.w_uk = DecodeCopy(w_uk, logical_axes=axes)
        self.w_uv = DecodeCopy(w_uv, logical_axes=axes)
        made = [self.w_uk, self.w_uv]
        a, kv = self.q_a_proj, self.kv_a_proj_with_mqa
        if (a is not None and all(m.scale_inv is None and m.bias is None and not m.fp8_compute for m in (a, kv))
                and a.dtype == kv.dtype):
            self.qkv_a = DecodeCopy(jnp.concatenate([a.weight(), kv.weight()], axis=-1),
                                    logical_axes=("embed", None))
            made.append(self.qkv_a)
        return made

    # ----------------------------------------------------------------- projections
    def project_q(self, x: jax.Array, cos: jax.Array, sin: jax.Array, q_a: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
        """``x [B,S,D] -> (q_nope [B,S,N,C], q_rot [B,S,N,P])`` with RoPE applied to ``q_rot`` (``q_a``: the
        ``q_a_proj(x)`` output when already computed)."""
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x) if q_a is None else q_a))
        c = self.cfg.qk_nope_head_dim
        return q[..., :c], apply_rope(q[..., c:], cos, sin)

    def project_latent(self, x: jax.Array, cos: jax.Array, sin: jax.Array, kv: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
        """``x [B,T,D] -> (c_kv [B,T,R] post-norm, k_rot [B,T,P] post-RoPE)``: the cacheable per-token state
        (``kv``: the ``kv_a_proj_with_mqa(x)`` output when already computed)."""
        kv = self.kv_a_proj_with_mqa(x) if kv is None else kv
        r = self.cfg.kv_lora_rank
        return self.kv_a_layernorm(kv[..., :r]), apply_rope(kv[..., r:], cos, sin)

    def _project(self, x, cos, sin):
        """``(q_nope, q_rot), (c_kv, k_rot)``: with a ``qkv_a`` decode copy, both down-projections as one GEMM."""
        if self.qkv_a is None:
            return self.project_q(x, cos, sin), self.project_latent(x, cos, sin)
        y = jnp.einsum("...d,de->...e", x.astype(self.q_a_proj.dtype), self.qkv_a.get_value())
        q = self.cfg.q_lora_rank
        return self.project_q(x, cos, sin, y[..., :q]), self.project_latent(x, cos, sin, y[..., q:])

    def _w_uk_uv(self) -> tuple[jax.Array, jax.Array]:
        if self.w_uk is not None:
            return self.w_uk.get_value(), self.w_uv.get_value()
        w = self.kv_b_proj.weight()  # (R, N, C+V)
        c = self.cfg.qk_nope_head_dim
        return w[..., :c], w[..., c:]

    # ----------------------------------------------------------------- attention cores
    def _softmax(self, scores: jax.Array, mask: jax.Array | None, dtype) -> jax.Array:
        scores = scores * self.cfg.softmax_scale
        if mask is not None:
            scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
        return jax.nn.softmax(scores, axis=-1).astype(dtype)

    def attend_naive(self, q_nope, q_rot, c_kv, k_rot, mask, causal_from_start: bool = False) -> jax.Array:
        """Expands K/V from the latent: returns ``O [B,S,N,V]``. ``mask [B,S,T]`` bool (True = attend).

        ``cfg.attention_impl`` picks the core: explicit einsum scores, or ``jax.nn.dot_product_attention``
        (``"cudnn"``: fused flash attention on Hopper). ``causal_from_start`` tells the fused kernel that query
        ``s`` sits at key slot ``s`` (no cache), so it may skip the blocks above the diagonal; ``mask`` still
        carries the document boundaries.
        """
        docs = None
        if isinstance(mask, DocumentMask):
            docs, mask = mask, mask.dense
        kv = self.kv_b_proj(c_kv)  # [B,T,N,C+V]
        c = self.cfg.qk_nope_head_dim
        k_nope, v = kv[..., :c], kv[..., c:]
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot[:, :, None, :], k_nope.shape[:-1] + k_rot.shape[-1:])],
                            axis=-1)
        q = jnp.concatenate([q_nope, q_rot], axis=-1)
        if mask is None and not causal_from_start:
            raise ValueError("attend_naive: mask=None means causal attention from slot 0 (no cache); pass a mask "
                             "when attending over a cache")
        impl = self.cfg.attention_impl
        if impl in ("cudnn_packed", "auto"):
            if docs is not None and causal_from_start and _cudnn_flash_available(q.dtype):
                return self._attend_packed(q, k, v, docs)
            impl = "auto"   # with a cache (queries are not the keys), one document per row, or no cuDNN
        return self._attend(q, k, v, mask, causal_from_start, _auto_impl(q, v) if impl == "auto" else impl)

    def _attend(self, q, k, v, mask, causal_from_start: bool, impl: str) -> jax.Array:
        """The attention core over expanded ``q, k [B,S|T,N,C+P]``, ``v [B,T,N,V]`` with ``impl`` resolved."""
        if impl == "cudnn_mla":
            # cuDNN's MLA mode (key head size C+P != value head size V; cuDNN >= 9.10 on Hopper) through jax's
            # internal entry point, which the public API does not expose: no zero-padded V, no padded output
            from jax._src.cudnn.fused_attention_stablehlo import MaskType
            from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

            o = cudnn_attention(q, k, v, None, None if mask is None else mask[:, None],
                                scale=self.cfg.softmax_scale,
                                mask_type=MaskType.CAUSAL if causal_from_start else MaskType.NO_MASK)
            return o.astype(v.dtype)
        if impl != "einsum":
            # the public API wants equal key/value head sizes: pad V with zeros to C+P, drop the padding after
            dv = v.shape[-1]
            vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv))) if q.shape[-1] > dv else v
            o = jax.nn.dot_product_attention(
                q, k, vp, mask=None if mask is None else mask[:, None], scale=self.cfg.softmax_scale,
                is_causal=causal_from_start, implementation="cudnn" if impl == "cudnn" else None)
            return o[..., :dv].astype(v.dtype)
        scores = jnp.einsum("bsnh,btnh->bnst", q, k, preferred_element_type=jnp.float32)
        p = self._softmax(scores, _causal(q.shape[1], k.shape[1]) if mask is None else mask, v.dtype)
        return jnp.einsum("bnst,btnv->bsnv", p, v)

    def _attend_packed(self, q, k, v, docs: DocumentMask) -> jax.Array:
        """cuDNN flash attention in its packed layout: each row's documents given by offsets and lengths
        (``docs``), causal within each document, no dense mask. V is zero-padded to the key head size: jax's
        packed layout strides the key *and* value offsets by the query's head size, which would misread an
        unpadded MLA value (V < C+P). When a row has more than ``cfg.attention_max_documents`` documents
        (``docs.fits`` false) the dense-mask kernel runs instead (``lax.cond``; on XLA GPU a conditional reads its
        predicate on the host, one sync per layer: not yet measured)."""
        from jax._src.cudnn import fused_attention_stablehlo as fa

        dv = v.shape[-1]
        vp = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv))) if q.shape[-1] > dv else v

        def packed(q, k, v, vp, dense):
            o = fa.dot_product_attention(q, k, vp, q_seqlen=docs.lengths, kv_seqlen=docs.lengths,
                                         q_offsets=docs.offsets, kv_offsets=docs.offsets,
                                         scale=self.cfg.softmax_scale, mask_type=fa.MaskType.PADDING_CAUSAL,
                                         qkv_layout="BTNH")
            return o[..., :dv].astype(v.dtype)

        def fallback(q, k, v, vp, dense):
            return self._attend(q, k, v, dense, True, _auto_impl(q, v))

        return jax.lax.cond(docs.fits, packed, fallback, q, k, v, vp, docs.dense)

    def attend_absorbed(self, q_nope, q_rot, c_kv, k_rot, mask, layer=None) -> jax.Array:
        """Attends directly over the latent (W_UK folded into q, W_UV after attention): ``O [B,S,N,V]``.
        ``layer``: ``c_kv [L,B,T,R]``/``k_rot [L,B,T,P]`` are the stacked cache and this layer's index in it (the
        decode kernel reads that layer in place; a slice handed to it would be a copy per layer and step)."""
        if isinstance(mask, DocumentMask):
            mask = mask.dense
        w_uk, w_uv = self._w_uk_uv()
        q_lat = jnp.einsum("bsnc,rnc->bsnr", q_nope, w_uk)
        mask = _causal(q_lat.shape[1], c_kv.shape[-2]) if mask is None else mask
        mask = jnp.broadcast_to(mask, (q_lat.shape[0], *mask.shape[1:]))
        scale, impl = self.cfg.softmax_scale, self.cfg.mla_decode_impl
        if layer is None:                                   # one layer's cache: a stack of one (a bitcast)
            c_kv, k_rot, layer = c_kv[None], k_rot[None], 0
        layer = jnp.asarray(layer, jnp.int32)

        def core(q_lat, q_rot, c_kv, k_rot, mask, layer):
            return mla_decode_attention(q_lat, q_rot, c_kv, k_rot, mask, scale=scale, implementation=impl,
                                        layer=layer)

        # Under a sharding plan each device attends for its own rows (and, with a tensor axis, its heads) in a
        # shard_map: the Pallas kernel is a custom call XLA's partitioner cannot split (it would gather the cache and
        # run the whole batch everywhere). Without a plan, map_shards returns `core` itself. check_vma off: a
        # pallas_call's outputs carry no varying-axes type (decoding takes no gradient through it).
        q_axes, kv_axes = ("batch", None, "act_heads", None), ("batch", None, None)
        cache_axes = (None, *kv_axes)
        o_lat = map_shards(core, (q_axes, q_axes, cache_axes, cache_axes, kv_axes, ()), q_axes, check_vma=False)(
            q_lat, q_rot.astype(q_lat.dtype), c_kv, k_rot, mask, layer)
        return jnp.einsum("bsnr,rnv->bsnv", o_lat, w_uv)

    # ----------------------------------------------------------------- layer call
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array | None, *,
                 impl: MLAImpl = "naive", cache: tuple[jax.Array, jax.Array] | None = None,
                 cache_index: jax.Array | int | None = None):
        """``x [B,S,D] -> (y [B,S,D], latent)``.

        Without ``cache``, attention runs over the ``S`` tokens themselves (``mask [B,S,S]``) and ``latent`` is
        their ``(c_kv, k_rot)``. With ``cache = (c_kv [L,B,T,R], k_rot [L,B,T,P], layer)`` -- a stacked cache and
        this layer's index in it -- the new latents are written at ``cache_index`` (a scalar slot, or one slot per
        row ``[B]``) of layer ``layer`` only, attention runs over all ``T`` cached tokens of that layer
        (``mask [B,S,T]``) and ``latent`` is the updated stack (so a decode step never copies every layer's cache).
        """
        (q_nope, q_rot), (c_kv, k_rot) = self._project(x, cos, sin)
        latent = (c_kv, k_rot)
        dt = dtype_of(self.cfg.dtype)
        if cache is not None:
            idx = 0 if cache_index is None else cache_index
            c_all, k_all, layer = cache
            with jax.named_scope("cache_write"):
                latent = (write_layer_rows(c_all, c_kv, layer, idx), write_layer_rows(k_all, k_rot, layer, idx))
            if impl == "absorbed" and latent[0].dtype == dt and latent[1].dtype == dt:
                with jax.named_scope("attn_core"):      # the stacked cache, read in place at this layer
                    o = self.attend_absorbed(q_nope, q_rot, *latent, mask, layer=layer)
                return self.o_proj(o), latent
            with jax.named_scope("cache_write"):
                c_kv = jax.lax.dynamic_index_in_dim(latent[0], layer, 0, keepdims=False)
                k_rot = jax.lax.dynamic_index_in_dim(latent[1], layer, 0, keepdims=False)
        with jax.named_scope("attn_core"):
            o = self._attend_impl(impl, q_nope, q_rot, c_kv.astype(dt), k_rot.astype(dt), mask, cache is None)
        return self.o_proj(o), latent

    def _attend_impl(self, impl, q_nope, q_rot, c_kv, k_rot, mask, causal_from_start):
        if impl == "naive":
            return self.attend_naive(q_nope, q_rot, c_kv, k_rot, mask, causal_from_start=causal_from_start)
        if impl == "absorbed":
            return self.attend_absorbed(q_nope, q_rot, c_kv, k_rot, mask)
        raise ValueError(f"impl={impl!r} is unknown. Fix: use 'naive' or 'absorbed'")
