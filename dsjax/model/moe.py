"""DeepSeekMoE: shared experts + fine-grained routed experts with V3 or V2 routing, dropless and sparse.

Letters: B batch, S tokens per sequence, T = B*S tokens, D hidden_size, E n_routed_experts, K num_experts_per_tok,
G n_group, F moe_intermediate_size, M = T*K routed (token, expert) pairs.

Routing (:class:`Router`, all in float32):

* V3 (``scoring_func="sigmoid"``, ``topk_method="noaux_tc"``):
  1. ``logits = x . W_g`` (``td,de->te``), ``s = sigmoid(logits)``.
  2. Selection scores ``s_c = s + b`` with ``b`` the routing bias (:class:`~dsjax.model.layers.RoutingBias`),
     used for selection only.
  3. Group-limited: group score = sum of the top-2 ``s_c`` in each of G groups; keep ``topk_group`` groups,
     experts outside them get ``-inf``.
  4. ``idx = top_k(s_c, K)``; weights from the **unbiased** ``s[idx]``; renormalise
     (``w / (sum w + 1e-20)``, when ``norm_topk_prob``) and multiply by ``routed_scaling_factor``.
* V2 (``scoring_func="softmax"``): ``s = softmax(logits)``; ``greedy`` top-k, or ``group_limited_greedy`` with the
  **max** score per group (masked experts get 0); ``w = s[idx]`` (renormalised only if ``norm_topk_prob``, which
  every V2 release leaves off), times ``routed_scaling_factor``.

Expert computation (:class:`RoutedExperts`) is dropless: the M pairs are sorted by expert and three grouped
matmuls (``pallas_kernels.grouped_matmul``: Mosaic GPU kernels on Hopper, ``jax.lax.ragged_dot`` elsewhere;
``md,edf->mf`` per group) run SwiGLU over exactly the tokens each expert got; no dense all-experts einsum outside
small decode steps (below). With few pairs (``2*M <= E``, e.g. decoding a small batch) the chosen experts' weights
are gathered per pair instead (``td,tkdf->tkf``): the grouped-matmul kernel would read every expert's weights. A decode
step of more pairs but at most ``cfg.moe_dense_decode_tokens`` tokens runs every expert on every token
(``etd,edf->etf``, one batched matmul per projection) and weights the outputs by the routing, zero for unchosen
experts (``etd,te->td``): it reads what the grouped kernel reads (every expert), with no sort or dispatch, and its
extra FLOPs (``E/K`` times the useful ones) cost less than the weight reads while ``T`` is small.

The router also returns what training needs: per-expert token counts (for the auxiliary-loss-free bias update)
and the per-layer sequence-wise balance loss term ``sum_i f_i P_i`` averaged over sequences (DeepSeek-V3 eq.
17-20: ``P_i`` from scores normalised over experts, ``f_i = E / (K S_valid) * #tokens routed to i``), without
the ``alpha`` factor.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import fp8_grouped_linear, grouped_matmul, moe_topk_weights
from pallas_kernels.moe_topk import kernel_supported as moe_topk_kernel_supported

from dsjax.configs import ModelConfig
from dsjax.model import layers
from dsjax.model.layers import MLP, FP8Scale, RoutingBias, dtype_of, make_param
from dsjax.sharding import current_plan, map_shards

__all__ = ["RouterOutput", "Router", "RoutedExperts", "MoE", "route", "fold_shared_experts", "can_fold_shared_experts"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterOutput:
    """What one MoE layer's router decided.

    Attributes:
      weights: ``[T, K]`` float32 combine weights (after renormalisation and routed scaling).
      indices: ``[T, K]`` int32 chosen experts.
      scores: ``[T, E]`` float32 affinities (sigmoid or softmax), unbiased.
    """

    weights: jax.Array
    indices: jax.Array
    scores: jax.Array


def route(cfg: ModelConfig, logits: jax.Array, bias: jax.Array | None) -> RouterOutput:
    """Applies the configured routing rule to float32 ``logits [T, E]``. Pure function; see module docstring.

    The expert selection (steps 3-4) and the combine weights are :func:`pallas_kernels.moe_topk_weights`:
    ``cfg.routing_impl`` picks its XLA reference or its Pallas kernel (the same indices, bitwise; the weights gathered
    and renormalised in the kernel, to float32 summation order). The kernel is a custom call the partitioner
    cannot split, so under a sharding plan it runs per device on its own tokens (``map_shards``)."""
    t, e = logits.shape
    k = cfg.num_experts_per_tok
    if cfg.scoring_func == "sigmoid":
        scores = jax.nn.sigmoid(logits)
    else:
        scores = jax.nn.softmax(logits, axis=-1)
    choice = scores + bias[None, :] if bias is not None else scores
    n_group, topk_group = (cfg.n_group, cfg.topk_group) if cfg.uses_group_routing else (1, 1)
    impl = cfg.routing_impl
    if impl == "auto":
        impl = "pallas" if moe_topk_kernel_supported(t, e, n_group, k, topk_group) else "xla"
    tokens = ("batch", None)
    weights, indices = moe_topk_weights(
        choice, scores, k, n_group=n_group, topk_group=topk_group, implementation=impl,
        group_score="top2_sum" if cfg.topk_method == "noaux_tc" else "max",
        norm=cfg.norm_topk_prob and (cfg.scoring_func == "sigmoid" or k > 1), scale=cfg.routed_scaling_factor,
        call_wrapper=lambda f: map_shards(f, (tokens, tokens), [tokens, tokens], check_vma=False))
    return RouterOutput(weights=weights, indices=indices, scores=scores)


class Router(nnx.Module):
    """Gate ``W_g [D, E]`` (float32, like HF's ``_keep_in_fp32_modules_strict``) and, for V3, the routing bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.weight = make_param(rngs, jax.nn.initializers.normal(cfg.initializer_range),
                                 (cfg.hidden_size, cfg.n_routed_experts), jnp.float32, ("embed", "expert_gate"))
        if cfg.has_routing_bias:
            self.e_score_correction_bias = make_param(None, 0.0, (cfg.n_routed_experts,), jnp.float32,
                                                      ("expert_gate",), var_type=RoutingBias)
        else:
            self.e_score_correction_bias = None

    def __call__(self, x: jax.Array) -> RouterOutput:
        """``x [T, D] -> RouterOutput``."""
        logits = jnp.einsum("td,de->te", x.astype(jnp.float32), self.weight.get_value().astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.get_value()
        return route(self.cfg, logits, bias)


def _rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x[idx]`` for indices known to lie in ``[0, len(x))``: a plain gather, without the wrap-around of negative
    indices and the NaN fill of out-of-bounds rows that ``jnp.take``'s default adds to every gathered element
    (unsigned indices skip the wrap-around; ``promise_in_bounds`` the fill)."""
    return x.at[idx.astype(jnp.uint32)].get(mode="promise_in_bounds")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """``x [T, D] -> xs [M, D]`` with ``xs[i] = x[order[i] // K]`` (token rows in expert order).

    Its gradient is a gather plus a sum over each token's K copies (no scatter-add with atomics)."""
    return _rows(x, jax.lax.div(order, jnp.asarray(k, order.dtype)))  # order >= 0: truncating division is floor


def _dispatch_fwd(x, order, inverse, k):
    return _dispatch(x, order, inverse, k), (inverse, x.shape[0])


def _dispatch_bwd(k, res, ct):
    inverse, t = res
    return _rows(ct, inverse).reshape(t, k, -1).sum(1), None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _permute(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``x[perm]`` for a permutation ``perm``; the gradient is the gather ``ct[inverse]``."""
    return _rows(x, perm)


_permute.defvjp(lambda x, p, i: (_rows(x, p), (i,)), lambda res, ct: (_rows(ct, res[0]), None, None))


# Forwards of at most this many tokens per sequence are decode steps for the MoE's path choice: plain decoding (1)
# and MTP speculative verification (k + 1: the last token and k <= 3 drafts). The verification thus takes the plain
# step's dense path (each expert's weights read once, no sort; still bounded by moe_dense_decode_tokens) rather than
# the grouped kernels; on the grouped path a verification step at batch 32 took twice a plain step's time (H200,
# docs/benchmarks.md).
DECODE_TOKENS_PER_ROW = 4


def expert_ffn(xs: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, group_sizes: jax.Array, *,
               implementation: str, dtype, fp8: bool | str = False) -> jax.Array:
    """SwiGLU over rows sorted by expert, ``xs [M, D] -> [M, D]``: ``silu(xs wg_g) * (xs wu_g)`` then ``wd_g``
    (``wg, wu [G, D, F]``, ``wd [G, F, D]``).

    Gate and up run as **one** grouped matmul on ``[G, D, 2F]`` (the two weights concatenated each step, a copy the
    weight cast already makes): one GEMM of twice the width ran the pair's forward + backward 1.38x faster than two
    on an H100 (``experiments/bench_grouped_matmul.py``), and reads ``xs`` once. ``fp8`` (False, or
    ``ModelConfig.fp8_grouped_gemm``) runs every GEMM through ``fp8_grouped_linear`` on the master weights; it is
    fused only when ``F % 128 == 0``, so that no 128x128 weight block or 1x128 gradient tile straddles gate and
    up (the quantisation is then exactly the separate GEMMs').
    """
    if fp8:
        gmm = lambda a, w: checkpoint_name(fp8_grouped_linear(  # noqa: E731
            a, w, group_sizes, compute_dtype=dtype, implementation=implementation, gemm=fp8), "moe_gmm")
    else:   # the grouped matmuls are custom calls, not "dots" to the remat policies: named so they can be saved
        gmm = lambda a, w: checkpoint_name(grouped_matmul(a, w, group_sizes, implementation=implementation),  # noqa
                                           "moe_gmm")
    f = wg.shape[-1]
    if not fp8 or f % 128 == 0:
        hu = gmm(xs, jnp.concatenate([wg, wu], axis=-1))                      # [M, 2F]
        h = jax.nn.silu(hu[:, :f]) * hu[:, f:]
    else:
        h = jax.nn.silu(gmm(xs, wg)) * gmm(xs, wu)
    return gmm(h.astype(dtype), wd)


def can_fold_shared_experts(cfg: ModelConfig, fp8_block: tuple[int, int] | None) -> bool:
    """Whether :func:`fold_shared_experts` applies: shared experts present, no MLP bias, not FP8 *training* (whose
    GEMMs quantise the master weights per step), no active sharding plan (the routed stacks are split over the
    ``expert`` axis there; one more expert would not divide it), and FP8-stored weights whose 128x128 blocks do not
    straddle two shared experts (``moe_intermediate_size`` a multiple of the block)."""
    f = cfg.moe_intermediate_size
    return (cfg.n_shared_experts > 0 and not cfg.mlp_bias and not cfg.fp8 and current_plan() is None
            and (fp8_block is None or (f % fp8_block[0] == 0 and f % fp8_block[1] == 0)))


def fold_shared_experts(routed: dict[str, jax.Array], shared: dict[str, jax.Array], n_shared: int,
                        fp8_block: tuple[int, int] | None) -> dict[str, jax.Array]:
    """The routed-expert stacks with the shared experts appended as experts ``E .. E + n_shared - 1``.

    A shared MLP of width ``n_shared * F`` is ``n_shared`` SwiGLU experts of width F side by side (SwiGLU is
    elementwise over the hidden units; the down projection sums over them), so ``Shared(x)`` equals the sum of
    those pseudo-experts with weight 1: a decode step then runs the shared and routed experts in the same expert
    GEMMs (the FP8 weight-only kernels, the dense or gathered decode einsums) instead of separate launches
    (:meth:`MoE.__call__` appends their ids with weight 1 to every token's routing).

    ``routed``: :class:`RoutedExperts`' arrays (``gate_proj``, ``up_proj``, ``down_proj`` and, FP8-stored, their
    ``*_scale_inv``); ``shared``: the shared :class:`~dsjax.model.layers.MLP`'s ``Linear`` kernels under the same
    names (and scales). Layouts: plain ``[E, D, F]`` / ``[E, F, D]`` against kernels ``[D, nF]`` / ``[nF, D]``;
    FP8-stored ``[E, F, D]`` / ``[E, D, F]`` against ``[nF, D]`` / ``[D, nF]`` with block scales split alike
    (:func:`can_fold_shared_experts` checks the blocks align). Returns the same keys as ``routed``, each with
    ``E + n_shared`` experts."""
    n = n_shared
    out = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        w = shared[name]
        down = name == "down_proj"
        # the weight's [n*F] axis comes first (plain down; FP8 gate/up) or last (plain gate/up; FP8 down)
        f_first = down == (fp8_block is None)
        split = lambda a: (a.reshape(n, a.shape[0] // n, *a.shape[1:]) if f_first  # noqa: E731
                           else jnp.moveaxis(a.reshape(a.shape[0], n, a.shape[1] // n), 1, 0))
        out[name] = jnp.concatenate([routed[name], split(w).astype(routed[name].dtype)], axis=0)
        if fp8_block is not None:
            s = shared[name + "_scale_inv"]
            out[name + "_scale_inv"] = jnp.concatenate([routed[name + "_scale_inv"], split(s)], axis=0)
    return out


class RoutedExperts(nnx.Module):
    """E SwiGLU experts stored as ``gate_proj/up_proj [E, D, F]`` and ``down_proj [E, F, D]``.

    With ``fp8_block`` set, weights are float8_e4m3fn in the checkpoint's own ``[out, in]`` layout per expert
    (``gate_proj/up_proj [E, F, D]``, ``down_proj [E, D, F]``: K contiguous, as the FP8 kernels read them) with
    ``*_scale_inv [E, ceil(out/bo), ceil(in/bi)]`` block scales (each expert's ``weight_scale_inv``); they are
    dequantised (and transposed) before the grouped matmuls, or read as they are by the weight-only FP8 kernels.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8_block: tuple[int, int] | None = None):
        self.cfg = cfg
        self.fp8_block = fp8_block
        # shared experts folded in as the stacks' last experts (decoding copies: dsjax.model.unstack_layers)
        self.n_folded = 0
        e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        init = jax.nn.initializers.normal(cfg.initializer_range)
        shapes = {"gate_proj": ((e, d, f), ("expert", "embed", "moe_mlp")),
                  "up_proj": ((e, d, f), ("expert", "embed", "moe_mlp")),
                  "down_proj": ((e, f, d), ("expert", "moe_mlp", "embed"))}
        for name, (shape, axes) in shapes.items():
            if fp8_block is None:
                setattr(self, name, make_param(rngs, init, shape, dtype_of(cfg.param_dtype), axes))
                setattr(self, name + "_scale_inv", None)
            else:   # [E, out, in]
                bo, bi = fp8_block
                setattr(self, name, make_param(None, 0.0, (e, shape[2], shape[1]), jnp.float8_e4m3fn,
                                               (axes[0], axes[2], axes[1])))
                sshape = (e, -(-shape[2] // bo), -(-shape[1] // bi))
                setattr(self, name + "_scale_inv", make_param(None, 1.0, sshape, jnp.float32, ("expert", None, None),
                                                              var_type=FP8Scale))

    def _w(self, name: str, experts: jax.Array | None = None) -> jax.Array:
        """The compute-dtype weights of all experts, or of ``experts`` (ids, gathered *before* the cast/dequant), in
        the ``[E, in, out]`` compute layout (FP8-stored ``[E, out, in]`` weights dequantised and transposed)."""
        w = getattr(self, name).get_value()
        s = getattr(self, name + "_scale_inv")
        if experts is not None:
            w = jnp.take(w, experts, axis=0)
        if s is not None:
            bo, bi = self.fp8_block
            s = s.get_value() if experts is None else jnp.take(s.get_value(), experts, axis=0)
            full = jnp.repeat(jnp.repeat(s, bo, axis=1), bi, axis=2)[:, :w.shape[1], :w.shape[2]]
            w = jnp.swapaxes(w.astype(jnp.float32) * full, 1, 2)
        return w.astype(dtype_of(self.cfg.dtype))

    def __call__(self, x: jax.Array, indices: jax.Array, weights: jax.Array, *, decode: bool = False) -> jax.Array:
        """``x [T, D]``, ``indices/weights [T, K] -> [T, D]`` (sum over the K chosen experts, weighted).
        ``decode``: the T tokens are a decode step (at most ``DECODE_TOKENS_PER_ROW`` per sequence: one new token,
        or a speculative verification's last token and drafts), which allows the dense path."""
        t, k = indices.shape
        e = self.gate_proj.get_value().shape[0]                 # n_routed_experts (+ folded shared experts)
        dt = dtype_of(self.cfg.dtype)
        fp8_training = self.cfg.fp8 and self.fp8_block is None      # FP8 training: always the grouped path
        if 2 * t * k <= e and not fp8_training:
            return self._gathered(x, indices, weights)
        if decode and t <= self.cfg.moe_dense_decode_tokens and not fp8_training:
            return self._dense(x, indices, weights)
        flat = indices.reshape(-1)                               # [M]
        order = jnp.argsort(flat, stable=True)                   # pairs sorted by expert
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
        group_sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
        xs = _dispatch(x.astype(dt), order, inverse, k)          # [M, D]
        names = ("gate_proj", "up_proj", "down_proj")
        # FP8 training quantises the master weights per step (fp8_grouped_linear); else the compute-dtype weights
        ws = [getattr(self, n).get_value() if fp8_training else self._w(n) for n in names]
        ys = expert_ffn(xs, *ws, group_sizes, implementation=self.cfg.grouped_matmul_impl, dtype=dt,
                        fp8=self.cfg.fp8_grouped_gemm if fp8_training else False)     # [M, D]
        y = _permute(ys, inverse, order).reshape(t, k, -1)       # back to token order
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(dt)

    def _fp8_kernel(self, x_shape: tuple[int, int, int], name: str) -> bool:
        """Whether ``x [G, M, K]`` times the FP8-stored ``name`` weights (``[E, N, K]``) runs the weight-only FP8
        kernel."""
        return self.fp8_block is not None and layers.use_fp8_weight_kernel(
            x_shape, getattr(self, name).get_value().shape, self.fp8_block)

    def _fp8_mm(self, x: jax.Array, name: str, index: jax.Array | None = None) -> jax.Array:
        """``x [G, M, K] @`` the FP8-stored ``name`` weights of each group (``index`` picks them from the stack)."""
        return layers.fp8_weight_dot(x, getattr(self, name).get_value(),
                                     getattr(self, name + "_scale_inv").get_value(), index,
                                     min_rows=self.cfg.fp8_weight_kernel_min_rows)

    def _fp8_swiglu(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        """``silu(x @ gate) * (x @ up)`` of the FP8-stored experts, one kernel launch (``[G, M, F]``)."""
        v = lambda name: getattr(self, name).get_value()  # noqa: E731
        return layers.fp8_weight_swiglu_dot(x, v("gate_proj"), v("gate_proj_scale_inv"), v("up_proj"),
                                            v("up_proj_scale_inv"), index,
                                            min_rows=self.cfg.fp8_weight_kernel_min_rows)

    def _gathered(self, x: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
        """Few (token, expert) pairs, as in decoding (``2*T*K <= E``): gather each pair's expert weights and apply
        them directly (``td,tkdf->tkf``, ``tkf,tkfd->tkd``). Reads ``T*K`` expert matrices instead of all ``E``:
        the grouped-matmul kernel visits every group's weight tiles, empty groups included, so at batch 1 it would
        read ``E/K`` times the weights the tokens use. No sort, no dispatch; same maths as the grouped path.
        FP8-stored experts on a GPU skip the gather: the weight-only FP8 kernel reads each pair's expert in place."""
        t, k = indices.shape
        dt = dtype_of(self.cfg.dtype)
        flat = indices.reshape(-1)
        if self._fp8_kernel((t * k, 1, x.shape[-1]), "gate_proj") and self._fp8_kernel(
                (t * k, 1, self.cfg.moe_intermediate_size), "down_proj"):
            # FP8-stored experts: each pair's expert read in place from the stack, dequantised in registers
            xg = jnp.broadcast_to(x.astype(dt)[:, None, None], (t, k, 1, x.shape[-1])).reshape(t * k, 1, -1)
            y = self._fp8_mm(self._fp8_swiglu(xg, flat), "down_proj", flat).reshape(t, k, -1)
            return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(dt)

        def w(name):                                             # [T, K, in, out] in the compute layout
            v = self._w(name, flat)
            return v.reshape(t, k, *v.shape[1:])

        xd = x.astype(dt)
        h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", xd, w("gate_proj"))) * jnp.einsum("td,tkdf->tkf", xd,
                                                                                     w("up_proj"))
        y = jnp.einsum("tkf,tkfd->tkd", h.astype(dt), w("down_proj"))
        return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights).astype(dt)

    def _dense(self, x: jax.Array, indices: jax.Array, weights: jax.Array) -> jax.Array:
        """A small decode step with many pairs: every expert on every token, ``etd,edf->etf`` (x broadcast over E so
        each projection is one batched matmul over the weights' own layout, no transpose of them), then
        ``etd,te->td`` with the routing weights spread to ``[T, E]`` by a one-hot (zero for unchosen experts, so
        they add exact zeros). Same maths as the grouped path. FP8-stored experts on a GPU go through the weight-only
        FP8 kernel (FP8 bytes read, no BF16 copy of the weights)."""
        e = self.gate_proj.get_value().shape[0]
        dt = dtype_of(self.cfg.dtype)
        if self._fp8_kernel((e, *x.shape), "gate_proj") and self._fp8_kernel(
                (e, x.shape[0], self.cfg.moe_intermediate_size), "down_proj"):               # FP8-stored: no BF16 copy
            # x as one group read by every expert's programs (a broadcast handed to the kernel would be written
            # out E times first)
            y = self._fp8_mm(self._fp8_swiglu(x.astype(dt)[None]), "down_proj")
        else:
            xe = jnp.broadcast_to(x.astype(dt)[None], (e, *x.shape))                  # [E, T, D]
            h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, self._w("gate_proj"))) * jnp.einsum(
                "etd,edf->etf", xe, self._w("up_proj"))
            y = jnp.einsum("etf,efd->etd", h.astype(dt), self._w("down_proj"))         # [E, T, D]
        combine = jnp.einsum("tk,tke->te", weights.astype(jnp.float32),
                             jax.nn.one_hot(indices, e, dtype=jnp.float32))             # [T, E]
        return jnp.einsum("etd,te->td", y.astype(jnp.float32), combine).astype(dt)


class MoE(nnx.Module):
    """DeepSeekMoE block: ``y = sum_k w_k E_{idx_k}(x) + Shared(x)`` for ``x [B, S, D]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8_block: tuple[int, int] | None = None):
        self.cfg = cfg
        self.gate = Router(cfg, rngs=rngs)
        self.experts = RoutedExperts(cfg, rngs=rngs, fp8_block=fp8_block)
        if cfg.n_shared_experts > 0:
            self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
                                      mlp_axis="moe_mlp", fp8_block=fp8_block)
        else:
            self.shared_experts = None

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x [B,S,D]``, ``valid [B,S]`` bool (False for padding) ``-> (y [B,S,D], stats)``.

        ``stats``: ``counts [E]`` float32 tokens routed to each expert (valid tokens only), ``balance`` scalar
        sequence-wise balance term ``mean_b sum_i f_{b,i} P_{b,i}`` (multiply by ``aux_loss_alpha``), and
        ``indices [B,S,K]`` the chosen experts; under a sharding plan also ``dropped``, the (token, expert)
        pairs the expert-parallel dispatch dropped (float32 scalar).
        """
        b, s, d = x.shape
        flat_x = x.reshape(b * s, d)
        with jax.named_scope("router"):
            r = self.gate(flat_x)
        plan = current_plan()
        n_f = self.experts.n_folded
        if n_f and plan is not None:
            raise ValueError("MoE: shared experts folded into the routed stacks (a decoding copy from "
                             "unstack_layers made without a sharding plan) cannot run under one. Fix: unstack under "
                             "the plan, where they are not folded")
        with jax.named_scope("routed_experts"):
            if plan is None:   # s <= 4: a decode step (one new token per sequence, or a verification's k + 1)
                idx, w = r.indices, r.weights
                if n_f:        # the folded shared experts: every token's last n_f picks, weight 1
                    e = self.cfg.n_routed_experts
                    idx = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(e, e + n_f, dtype=idx.dtype),
                                                                 (b * s, n_f))], axis=1)
                    w = jnp.concatenate([w, jnp.ones((b * s, n_f), w.dtype)], axis=1)
                y = self.experts(flat_x, idx, w, decode=s <= DECODE_TOKENS_PER_ROW).reshape(b, s, d)
            else:  # on a mesh: shard_map, tokens travel to their experts (dsjax.model.moe_ep)
                from dsjax.model.moe_ep import expert_parallel

                y, dropped = expert_parallel(self.experts, flat_x, r.indices, r.weights, plan)
                y = y.reshape(b, s, d)
        if self.shared_experts is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared_experts(x)
        with jax.named_scope("routing_stats"):
            stats = self._stats(r, valid, b, s)
        if plan is not None:
            stats["dropped"] = dropped
        return y, stats

    def _stats(self, r: RouterOutput, valid, b: int, s: int) -> dict[str, jax.Array]:
        e, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        valid = jnp.ones((b, s), bool) if valid is None else valid
        vf = valid.astype(jnp.float32)
        idx = r.indices.reshape(b, s, k)
        per_seq = jnp.zeros((b, e), jnp.float32).at[jnp.arange(b)[:, None, None], idx].add(
            jnp.broadcast_to(vf[:, :, None], idx.shape))                                   # [B,E] tokens per expert
        counts = per_seq.sum(0)
        n_valid = jnp.maximum(vf.sum(1, keepdims=True), 1.0)                               # [B,1]
        f = jax.lax.stop_gradient(per_seq * (e / (k * n_valid)))
        s_norm = r.scores / (r.scores.sum(-1, keepdims=True) + 1e-20)
        p = jnp.einsum("bse,bs->be", s_norm.reshape(b, s, e), vf) / n_valid
        balance = jnp.mean(jnp.sum(f * p, axis=-1))
        return {"counts": counts, "balance": balance, "indices": r.indices.reshape(b, s, k)}
