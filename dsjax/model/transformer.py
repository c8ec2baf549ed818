"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense | MoE) blocks, final norm, head and MTP modules.

Letters: B batch, T tokens, D hidden_size, V vocabulary, L layers, K experts per token, E routed experts,
Dm num_nextn_predict_layers (MTP depth).

``Transformer(cfg, rngs=...)(input_ids [B,T])`` returns a :class:`ModelOutput`. Layers are either a Python list
(``scan_layers=False``) or two stacked groups (dense first-k, then MoE) run with ``jax.lax.scan`` so compile time
stays flat with depth; ``remat_policy`` wraps each layer in ``jax.checkpoint``.

Multi-token prediction (DeepSeek-V3 section 2.2, released layer ``num_hidden_layers``): depth k combines the
previous depth's hidden state ``h^{k-1}_i`` (depth 0: the main model's final-normed output, as HF and vLLM feed it)
with the embedding of token ``t_{i+k}``:
``h' = eh_proj([RMSNorm_e(Emb(t_{i+k})) | RMSNorm_h(h^{k-1}_i)])`` (**embedding first**, as the weights were
released), ``h^k = RMSNorm_head(DecoderLayer_k(h'))``, ``logits_k = lm_head(h^k)`` predicting ``t_{i+k+1}``.
Positions beyond the sequence end read token 0; their targets do not exist and the loss must mask them (the
training code also masks targets that cross packed-document boundaries). MTP runs only when asked for, so the
main forward costs nothing extra.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsjax.configs import ModelConfig
from dsjax.model.cache import LatentCache, write_rows
from dsjax.model.layers import MLP, Embed, Linear, RMSNorm, dtype_of
from dsjax.model.mla import MLA, DocumentMask, MLAImpl, describes_documents
from dsjax.model.moe import MoE, can_fold_shared_experts, fold_shared_experts
from dsjax.model.rope import rope_cos_sin

__all__ = ["DecoderLayer", "MTPModule", "Transformer", "ModelOutput", "make_attention_mask", "mtp_draft_step"]

_CP = jax.checkpoint_policies
_GMM = _CP.save_only_these_names("moe_gmm")  # grouped-matmul outputs count as matmuls for "dots" policies


def _fused_attention_saveable(prim, *_, **__) -> bool:
    """The fused attention kernel's forward (cuDNN's ``dot_product_attention_fwd`` primitives): its outputs, the
    attention output and the softmax statistics, are what the backward kernel needs. Saving them (~33 MB per
    `small` layer at 8 x 2048) spares the backward pass a second forward attention; "dots" policies alone miss it
    (a custom call, not a dot)."""
    return prim.name.startswith("dot_product_attention_fwd")


_REMAT = {
    "full": None,
    "dots": _CP.save_from_both_policies(_CP.checkpoint_dots, _GMM),
    "dots_no_batch": _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable, _GMM),
    "dots_attn": _CP.save_from_both_policies(
        _CP.save_from_both_policies(_CP.dots_with_no_batch_dims_saveable, _GMM), _fused_attention_saveable),
    "save_attn_out": _CP.save_only_these_names("attn_out", "mlp_out"),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """Result of :meth:`Transformer.__call__`.

    Attributes:
      logits: ``[B, T, V]`` in the compute dtype (None when ``compute_logits=False``).
      hidden: ``[B, T, D]`` final-normed hidden states (when ``return_hidden``).
      mtp_logits: tuple of Dm ``[B, T, V]``; entry k-1 predicts token ``t+k+1`` (when ``return_mtp``).
      mtp_hidden: tuple of Dm ``[B, T, D]`` normed MTP hidden states (when ``return_mtp`` and ``return_hidden``).
      moe: routing statistics of the main model's MoE layers: ``counts [L_moe, E]`` float32 tokens per expert,
        ``balance [L_moe]`` sequence-wise balance terms (without alpha), ``indices [L_moe, B, T, K]``.
      mtp_moe: the same for the MTP modules' MoE layers (``[Dm, ...]``) when MTP ran.
      cache: the updated :class:`~dsjax.model.cache.LatentCache` when one was passed.
    """

    logits: jax.Array | None = None
    hidden: jax.Array | None = None
    mtp_logits: tuple[jax.Array, ...] | None = None
    mtp_hidden: tuple[jax.Array, ...] | None = None
    moe: dict[str, jax.Array] | None = None
    mtp_moe: dict[str, jax.Array] | None = None
    cache: LatentCache | None = None


def make_attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_offset: jax.Array | int = 0
                        ) -> jax.Array:
    """Causal + document mask ``[B, S, T]`` (True = attend).

    Query ``s`` sits at cache slot ``q_offset + s`` (``q_offset`` a scalar or one per row ``[B]``); it sees key
    slots ``t <= q_offset + s`` of the same segment. Padding (segment 0) only sees padding, so no row is empty and
    no NaN appears.
    """
    s, t = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    offset = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1, 1)  # [1 or B, 1, 1]
    causal = jnp.arange(t)[None, None, :] <= (jnp.arange(s)[None, :, None] + offset)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal & same


class DecoderLayer(nnx.Module):
    """``h += MLA(RMSNorm(h)); h += FFN(RMSNorm(h))`` with FFN a dense SwiGLU or a DeepSeekMoE block."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, fp8_block: tuple[int, int] | None = None):
        pd = dtype_of(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.self_attn = MLA(cfg, rngs=rngs, fp8_block=fp8_block)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.is_moe = moe
        self.mlp = (MoE(cfg, rngs=rngs, fp8_block=fp8_block) if moe
                    else MLP(cfg, cfg.intermediate_size, rngs=rngs, fp8_block=fp8_block))

    def __call__(self, h, cos, sin, mask, valid, *, mla_impl: MLAImpl = "naive", cache=None, cache_index=None):
        """``h [B,T,D] -> (h, latent (c_kv, k_rot), moe_stats | None)``."""
        with jax.named_scope("mla"):
            a, latent = self.self_attn(self.input_layernorm(h), cos, sin, mask, impl=mla_impl, cache=cache,
                                       cache_index=cache_index)
        h = h + checkpoint_name(a, "attn_out")
        x = self.post_attention_layernorm(h)
        with jax.named_scope("moe" if self.is_moe else "mlp"):
            if self.is_moe:
                m, stats = self.mlp(x, valid)
            else:
                m, stats = self.mlp(x), None
        h = h + checkpoint_name(m, "mlp_out")
        return h, latent, stats


class MTPModule(nnx.Module):
    """One multi-token-prediction depth (HF/DeepSeek names: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``).

    The embedding and output head are the main model's (the checkpoint's copies are duplicates).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8_block: tuple[int, int] | None = None):
        pd, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size, in_axes=("embed2",), out_axes=("embed",),
                              param_dtype=pd, dtype=dt, rngs=rngs, init_std=cfg.initializer_range)
        self.block = DecoderLayer(cfg, moe=True, rngs=rngs, fp8_block=fp8_block)
        self.shared_head_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)

    def __call__(self, h_prev, emb_next, cos, sin, mask, valid, *, mla_impl: MLAImpl = "naive", cache=None,
                 cache_index=None, return_latent: bool = False):
        """``h_prev [B,T,D]`` (depth k-1), ``emb_next [B,T,D]`` = Emb(t_{i+k}) ``-> (h_k [B,T,D] normed, stats)``.

        With ``cache = (c_kv [1,B,S,R], k_rot [1,B,S,P], 0)`` (the block's own one-layer latent cache, for drafting
        during decoding) the new latents are written at ``cache_index`` and ``return_latent`` returns the updated
        cache third.
        """
        x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
        x, latent, stats = self.block(x, cos, sin, mask, valid, mla_impl=mla_impl, cache=cache,
                                      cache_index=cache_index)
        if return_latent:
            return self.shared_head_norm(x), stats, latent
        return self.shared_head_norm(x), stats


def _stack_layers(cfg: ModelConfig, n: int, moe: bool, rngs: nnx.Rngs, fp8_block) -> DecoderLayer:
    """``n`` DecoderLayers with their parameters stacked on a leading ``layers`` axis (for ``lax.scan``)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(r):
        return DecoderLayer(cfg, moe=moe, rngs=r, fp8_block=fp8_block)

    stack = create(rngs)
    for _, v in nnx.iter_graph(stack):
        if isinstance(v, nnx.Variable) and "logical_axes" in v.get_metadata():
            v.set_metadata(logical_axes=("layers",) + tuple(v.get_metadata()["logical_axes"]))
    return stack


class Transformer(nnx.Module):
    """DeepSeek-V2/V3 causal LM. See the module docstring.

    Args:
      cfg: the model configuration.
      rngs: ``nnx.Rngs`` for parameter initialisation (normal(0, initializer_range) weights, unit norms, zero bias).
      fp8: keep the MLA/MLP/expert weights as float8_e4m3fn with 128x128 block scales (the format of FP8 hub
        checkpoints); they are dequantised on the fly. Default False (weights in ``cfg.param_dtype``).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: bool = False):
        self.cfg = cfg
        fp8_block = None
        if fp8:
            fp8_block = cfg.quantization_config.weight_block_size if cfg.quantization_config else (128, 128)
        self.fp8_block = fp8_block
        pd, dt = dtype_of(cfg.param_dtype), dtype_of(cfg.dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=pd, dtype=dt, rngs=rngs,
                                  init_std=cfg.initializer_range)
        k, n = cfg.first_k_dense_replace, cfg.num_hidden_layers
        nb = cfg.fp8_bf16_layers if cfg.fp8 else 0                   # leading layers kept in BF16 under fp8
        bf16_cfg = dataclasses.replace(cfg, fp8=False, fp8_bf16_layers=0) if nb else cfg
        if cfg.scan_layers:                                           # nb is 0 or k (validated)
            self.layers = None
            self.dense_layers = _stack_layers(bf16_cfg, k, False, rngs, fp8_block) if k > 0 else None
            self.moe_layers = _stack_layers(cfg, n - k, True, rngs, fp8_block) if n > k else None
        else:
            self.layers = nnx.List([DecoderLayer(bf16_cfg if i < nb else cfg, moe=i >= k, rngs=rngs,
                                                 fp8_block=fp8_block) for i in range(n)])
            self.dense_layers = self.moe_layers = None
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, in_axes=("embed",), out_axes=("vocab",),
                                  param_dtype=pd, dtype=dt, rngs=rngs, init_std=cfg.initializer_range)
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs, fp8_block=fp8_block)
                             for _ in range(cfg.num_nextn_predict_layers)])

    # ------------------------------------------------------------------ helpers
    def head(self, h: jax.Array) -> jax.Array:
        """Output head ``[..., D] -> [..., V]`` on already-normed hidden states."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def logits_f32(self, h: jax.Array) -> jax.Array:
        """Output head with float32 accumulation and result (for losses): ``[..., D] -> [..., V]``."""
        if self.lm_head is None:
            return self.embed_tokens.attend(h, out_dtype=jnp.float32)
        return self.lm_head(h, out_dtype=jnp.float32)

    def _remat(self, fn):
        policy = self.cfg.remat_policy
        if policy == "none":
            return fn
        return jax.checkpoint(fn, policy=_REMAT[policy], prevent_cse=not self.cfg.scan_layers)

    def _run_layers(self, h, cos, sin, mask, valid, mla_impl, cache, cache_index):
        """Runs all decoder layers; returns ``(h, [(c_kv, k_rot)] per layer or stacked, moe stats stacked)``."""

        def layer_fn(graphdef):
            def fn(h, layer_state, layer_cache):
                layer = nnx.merge(graphdef, layer_state)
                h, latent, stats = layer(h, cos, sin, mask, valid, mla_impl=mla_impl, cache=layer_cache,
                                         cache_index=cache_index)
                return h, (latent, stats)
            return self._remat(fn)

        # With a cache, every layer gets the whole stacked cache and its own index and returns the stack with its
        # new rows written: the stack is updated in place (a loop carry under scan), never copied per layer.
        moe_stats = []
        stacked = None if cache is None else (cache.c_kv, cache.k_rot)
        k = self.cfg.first_k_dense_replace
        if self.layers is not None:
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                layer_cache = None if cache is None else (*stacked, i)
                h, (latent, stats) = layer_fn(graphdef)(h, state, layer_cache)
                if cache is not None:
                    stacked = latent
                if stats is not None:
                    moe_stats.append(stats)
            stats = jax.tree.map(lambda *xs: jnp.stack(xs), *moe_stats) if moe_stats else None
            return h, stacked, stats

        stats = None
        for stack, lo, hi in ((self.dense_layers, 0, k), (self.moe_layers, k, self.cfg.num_hidden_layers)):
            if stack is None:
                continue
            graphdef, state = nnx.split(stack)
            fn = layer_fn(graphdef)
            if cache is None:
                def body(h, layer_state, fn=fn):
                    h, (_, st) = fn(h, layer_state, None)
                    return h, st

                h, st = jax.lax.scan(body, h, state)
            else:
                def body(carry, xs, fn=fn):
                    h, c_all, k_all = carry
                    layer_state, i = xs
                    h, ((c_all, k_all), st) = fn(h, layer_state, (c_all, k_all, i))
                    return (h, c_all, k_all), st

                (h, *stacked), st = jax.lax.scan(body, (h, *stacked), (state, jnp.arange(lo, hi, dtype=jnp.int32)))
                stacked = tuple(stacked)
            if st is not None:
                stats = st
        return h, stacked, stats

    # ------------------------------------------------------------------ forward
    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, *, return_mtp: bool = False, return_hidden: bool = False,
                 compute_logits: bool = True, mla_impl: MLAImpl = "naive", cache: LatentCache | None = None,
                 cache_index: jax.Array | int | None = None) -> ModelOutput:
        """Runs the model.

        Args:
          input_ids: ``[B, T]`` int token ids.
          segment_ids: ``[B, T]`` int document ids for packed sequences; tokens attend only within their segment;
            0 marks padding (excluded from routing statistics). Default: all ones.
          positions: ``[B, T]`` int RoPE positions (reset per document when packing). Default ``arange(T)``
            (offset by ``cache_index`` with a cache).
          return_mtp: also run the MTP modules and return their logits (training / speculative drafting).
          return_hidden: also return the final-normed hidden states.
          compute_logits: set False to skip the output head (e.g. a chunked loss computes it from ``hidden``).
          mla_impl: ``"naive"`` (expand K/V; training/prefill) or ``"absorbed"`` (attend over the latent).
          cache: a :class:`LatentCache`; the T new tokens are written at slot ``cache_index`` and attend to every
            cached token of their segment at or before their slot.
          cache_index: slot of the first new token (with ``cache``): a scalar, or ``[B]`` (one per row, e.g. when
            rows of a batch advance by different numbers of tokens in speculative decoding).
        """
        cfg = self.cfg
        b, t = input_ids.shape
        dt = dtype_of(cfg.dtype)
        unpacked = segment_ids is None and cache is None   # one document per row: causal only, no mask tensor
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        offset = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None] + offset.reshape(-1, 1), (b, t))
        valid = segment_ids != 0
        if cache is not None:
            kv_segments = write_rows(cache.segment_ids, segment_ids.astype(jnp.int32), offset)
            mask = make_attention_mask(segment_ids, kv_segments, offset)
        else:
            kv_segments = None
            mask = None if unpacked else make_attention_mask(segment_ids, segment_ids)
            if mask is not None and describes_documents(cfg, dt):
                # the documents described (once for all layers), not only masked
                mask = DocumentMask.of(mask, segment_ids.astype(jnp.int32), cfg.attention_max_documents)
        cos, sin = rope_cos_sin(cfg, positions, dt)

        h = self.embed_tokens(input_ids)
        h, latent, moe_stats = self._run_layers(h, cos, sin, mask, valid, mla_impl, cache, cache_index)
        h = self.norm(h)
        with jax.named_scope("lm_head"):
            logits = self.head(h) if compute_logits else None

        mtp_logits = mtp_hidden = mtp_stats = None
        if return_mtp and len(self.mtp):
            if cache is not None:
                raise ValueError("return_mtp with a cache is not supported; run MTP on the full sequence")
            hs, ls, sts = [], [], []
            h_prev = h
            for depth, module in enumerate(self.mtp, start=1):
                shifted = jnp.concatenate([input_ids[:, depth:], jnp.zeros((b, depth), input_ids.dtype)], axis=1)
                h_prev, st = module(h_prev, self.embed_tokens(shifted), cos, sin, mask, valid, mla_impl=mla_impl)
                hs.append(h_prev)
                sts.append(st)
                if compute_logits:
                    ls.append(self.head(h_prev))
            mtp_logits = tuple(ls) if compute_logits else None
            mtp_hidden = tuple(hs) if return_hidden else None
            mtp_stats = jax.tree.map(lambda *xs: jnp.stack(xs), *sts)

        new_cache = None
        if cache is not None:
            new_cache = LatentCache(c_kv=latent[0], k_rot=latent[1], segment_ids=kv_segments)
        return ModelOutput(logits=logits, hidden=h if return_hidden else None, mtp_logits=mtp_logits,
                           mtp_hidden=mtp_hidden, moe=moe_stats, mtp_moe=mtp_stats, cache=new_cache)


def mtp_draft_step(model: "Transformer", depth: int, h_prev: jax.Array, next_tokens: jax.Array,
                   positions: jax.Array, cache: LatentCache, cache_index: jax.Array | int,
                   segment_ids: jax.Array | None = None) -> tuple[jax.Array, LatentCache]:
    """Runs MTP module ``depth`` (0-based) on ``S`` new positions with its own latent cache (for speculative decoding).

    Args:
      h_prev: ``[B,S,D]`` the main model's final-normed hidden states at those positions (or depth-1's output).
      next_tokens: ``[B,S]`` the token following each position (``t_{i+1}`` for depth 0).
      positions: ``[B,S]`` RoPE positions; cache: a one-layer :class:`LatentCache` ``[1, B, T, ...]``;
      cache_index: slot of the first new position (scalar or ``[B]``).
      segment_ids: ``[B,S]`` (0 marks left padding of a prefill); default all ones.
    Returns ``(h [B,S,D] normed MTP hidden states, cache)``; ``model.logits_f32(h)`` gives the draft logits.
    """
    b, s = next_tokens.shape
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_segments = write_rows(cache.segment_ids, seg, cache_index)
    mask = make_attention_mask(seg, kv_segments, cache_index)
    cos, sin = rope_cos_sin(model.cfg, positions, dtype_of(model.cfg.dtype))
    h, _, latent = model.mtp[depth](h_prev, model.embed_tokens(next_tokens), cos, sin, mask, seg != 0,
                                    mla_impl="absorbed", cache=(cache.c_kv, cache.k_rot, 0),
                                    cache_index=cache_index, return_latent=True)
    return h, LatentCache(c_kv=latent[0], k_rot=latent[1], segment_ids=kv_segments)


def abstract_model(cfg: ModelConfig, *, fp8: bool = False) -> Any:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no allocation), via ``nnx.eval_shape``."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), fp8=fp8))


# Matmul weights that every use casts to the compute dtype (Linear kernels, routed-expert matrices, the output head and
# the embedding table, whose rows are cast on lookup): decoding copies them already cast (see unstack_layers)
_CAST_FOR_DECODING = ("kernel", "gate_proj", "up_proj", "down_proj", "embedding")


def unstack_layers(model: Transformer, *, decode_copies: bool = True, fold_shared_experts: bool = True
                   ) -> Transformer:
    """The same model with ``scan_layers=False``: layer ``i``'s variables are slice ``i`` of the stacks.

    For decoding loops: a layer ``lax.scan`` inside a ``while_loop`` slices every layer's weights out of the stacks
    on every step, and XLA materialises those slices (a copy of all layer weights per decoded token) where a matmul
    reads them. Unstacking once, before the loop, makes that copy once per call; the cost is a second copy of the
    layer weights in memory while the unstacked model lives.

    With ``param_dtype`` wider than the compute ``dtype`` (e.g. float32 master weights, as GRPO rollouts decode),
    the matmul weights that every use casts to ``dtype`` anyway (``Linear`` kernels, the output head, routed-expert
    matrices, the embedding table) are copied already cast: the same values, half the memory and half the bytes
    each decode step reads. The cast copies pass through one ``lax.optimization_barrier`` so that XLA cannot sink
    the cheap-looking converts back into the decode loop, which would then carry the float32 masters and read twice
    the bytes on every step: XLA on the CPU does that (its barrier is expanded before the loop passes, so there it
    happens anyway); on an H200 the compiled loop carries the cast copies. Router weights, norms and biases keep
    their dtype. A model built with
    ``scan_layers=False`` is copied only for that cast (else its module graph is copied, sharing the arrays). FP8
    training mode (whose GEMMs quantise the master copy) is copied as it is. Every MLA module gets its decoding
    copies (:func:`add_decode_copies`; ``decode_copies=False`` leaves them out); a model that has them is returned
    as is. FP8-stored weights stay FP8 (decode-sized products read them
    through the weight-only FP8 kernels), except MLA's ``kv_a_proj_with_mqa`` and ``kv_b_proj``
    (:func:`dequantize_for_decoding`), which decoding would otherwise dequantise on every step; an unscanned FP8
    model is copied for that.

    ``fold_shared_experts``: where the layer weights are copied anyway (a scanned model, or a cast), each MoE
    layer's shared experts are folded into its routed-expert stacks as experts ``E ..`` with routing weight 1
    (:func:`dsjax.model.moe.fold_shared_experts`): the copy is made with them appended, no extra memory, and a
    decode step runs shared and routed experts in the same expert GEMMs instead of separate launches. Not on a
    sharding plan, nor where :func:`~dsjax.model.moe.can_fold_shared_experts` says no; the copy is then as before.
    """
    cfg = model.cfg
    if _has_decode_copies(model):
        return model
    compute = dtype_of(cfg.dtype)
    cast = not cfg.fp8 and model.fp8_block is None and compute != dtype_of(cfg.param_dtype)
    if not cfg.scan_layers and not cast:
        if not decode_copies and model.fp8_block is None:
            return model
        flat = nnx.merge(*nnx.split(model))          # a copy of the module graph; the arrays are shared
    else:
        fold = fold_shared_experts and can_fold_shared_experts(cfg, model.fp8_block)
        flat = _unstacked_copy(model, cast, fold)
    if model.fp8_block is not None:
        flat = dequantize_for_decoding(flat)
    return add_decode_copies(flat) if decode_copies else flat


def _unstacked_copy(model: Transformer, cast: bool, fold: bool = False) -> Transformer:
    """:func:`unstack_layers`' copy: per-layer modules holding slice ``i`` of the stacks (matmul weights cast to the
    compute dtype when ``cast``; shared experts folded into the routed stacks when ``fold``)."""
    cfg = model.cfg
    compute = dtype_of(cfg.dtype)
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    graphdef, target = nnx.split(abstract_model(flat_cfg, fp8=model.fp8_block is not None))
    src = dict(nnx.to_flat_state(nnx.state(model)))
    k = cfg.first_k_dense_replace
    values = {}
    for path, _ in nnx.to_flat_state(target):
        if cfg.scan_layers and path[0] == "layers":
            i = int(path[1])
            stack, j = ("dense_layers", i) if i < k else ("moe_layers", i - k)
            values[path] = src[(stack, *path[2:])].get_value()[j]
        else:
            values[path] = src[path].get_value()
    folded = _fold_values(values, cfg, model.fp8_block) if fold else []
    unused = {p for p in values if any(p[:len(m) + 1] == (*m, "shared_experts") for m in folded)}
    if cast:
        paths = [p for p in values if p[-1] in _CAST_FOR_DECODING and p not in unused]
        for p, v in zip(paths, jax.lax.optimization_barrier([values[p].astype(compute) for p in paths])):
            values[p] = v
    elif folded:   # the concatenated stacks made once, before any loop (XLA would not hoist them back out)
        paths = [p for p in values if any(p[:len(m) + 1] == (*m, "experts") for m in folded)]
        for p, v in zip(paths, jax.lax.optimization_barrier([values[p] for p in paths])):
            values[p] = v
    out = {path: t.replace(values[path]) for path, t in nnx.to_flat_state(target)}
    flat = nnx.merge(graphdef, nnx.State.from_flat_path(out))
    for prefix in folded:
        moe = flat
        for key in prefix:
            moe = moe[key] if isinstance(key, int) else getattr(moe, key)
        moe.experts.n_folded = cfg.n_shared_experts
        moe.shared_experts = None
    return flat


def _fold_values(values: dict, cfg, fp8_block) -> list[tuple]:
    """Folds, in ``values`` (flat state paths -> arrays), every MoE module's shared experts into its routed stacks
    (:func:`~dsjax.model.moe.fold_shared_experts`); returns the MoE modules' paths."""
    names = ("gate_proj", "up_proj", "down_proj")
    scales = () if fp8_block is None else tuple(n + "_scale_inv" for n in names)
    prefixes = [p[:-2] for p in values if p[-2:] == ("experts", "gate_proj")
                and (*p[:-2], "shared_experts", "gate_proj", "kernel") in values]
    for m in prefixes:
        routed = {n: values[(*m, "experts", n)] for n in names + scales}
        shared = {n: values[(*m, "shared_experts", n, "kernel")] for n in names}
        if fp8_block is not None:
            shared.update({n + "_scale_inv": values[(*m, "shared_experts", n, "scale_inv")] for n in names})
        for n, v in fold_shared_experts(routed, shared, cfg.n_shared_experts, fp8_block).items():
            values[(*m, "experts", n)] = v
    return prefixes


def _mla_modules(model: Transformer) -> list:
    return [layer.self_attn for layer in [*(model.layers or ()), *(m.block for m in model.mtp)]]


def _has_decode_copies(model: Transformer) -> bool:
    mlas = [] if model.cfg.scan_layers else _mla_modules(model)
    return bool(mlas) and all(m.w_uk is not None for m in mlas)


def add_decode_copies(model: Transformer) -> Transformer:
    """Gives every MLA module of an unscanned model its decoding copies (:meth:`MLA.add_decode_copies`: ``W_UK``
    and ``W_UV`` split out of ``kv_b_proj``, the two down-projection kernels side by side), made here once instead
    of inside the decode loop on every step, passed through one ``lax.optimization_barrier`` so that XLA cannot
    sink them back into the loop. Changes ``model`` in place and returns it."""
    made = [v for mla in _mla_modules(model) for v in mla.add_decode_copies()]
    for var, value in zip(made, jax.lax.optimization_barrier([v.get_value() for v in made])):
        var.set_value(value)
    return model


# FP8-stored projections that decoding uses only through their dequantised weights: the absorbed attention folds
# kv_b_proj's halves into the query and output (W_UK, W_UV), and kv_a_proj_with_mqa's output width (kv_lora_rank +
# qk_rope_head_dim: 576 for V3) is not a multiple of the weight-only kernel's 128 columns
_DEQUANTIZED_FOR_DECODING = ("kv_a_proj_with_mqa", "kv_b_proj")


def dequantize_for_decoding(model: Transformer) -> Transformer:
    """Replaces, in place, the FP8 weights of each decoder layer's (and MTP block's) ``kv_a_proj_with_mqa`` and
    ``kv_b_proj`` by their dequantised copies in the compute dtype -- the values every decode step would otherwise
    recompute (``Linear.weight``): same numerics, a few kernels and ``5 - 2`` bytes per weight fewer per step and
    layer, for 2 bytes per weight of memory while the copy lives (V3: ~41 MB per layer). Needs an unscanned model
    (:func:`unstack_layers` calls it). Returns ``model``."""
    if model.cfg.scan_layers:
        raise ValueError("dequantize_for_decoding needs per-layer modules; call unstack_layers (which calls this)")
    blocks = [*(model.layers or ()), *(m.block for m in model.mtp)]
    for layer in blocks:
        for name in _DEQUANTIZED_FOR_DECODING:
            lin = getattr(layer.self_attn, name)
            if lin.scale_inv is not None:
                lin.kernel = nnx.Param(lin.weight(), logical_axes=lin.kernel_axes)
                lin.scale_inv = None
    return model
