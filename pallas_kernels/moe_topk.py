"""DeepSeekMoE expert selection in one kernel: group-limited top-k over routing scores.

``idx[t] = top_k(where(expert in kept_groups(t), choice[t], fill), k)`` with
``kept_groups(t) = top_k(group_score(choice[t] per group), topk_group)``

Letters: ``T`` tokens, ``E`` routed experts, ``G`` expert groups (``E / G`` experts each), ``K`` experts per token.
``choice [T, E]`` float32 is what selection ranks: V3's sigmoid scores plus the selection-only bias, V2's softmax
scores. :func:`moe_topk` returns the indices only; :func:`moe_topk_weights` also the combine weights, the unbiased
``scores [T, E]`` at ``idx`` (renormalised over the K picks when asked, times the routed scaling factor), gathered
in the same kernel while the scores are in registers: the two XLA kernels that gather and renormalise after the
selection go (a decode step runs them once per MoE layer). The weights are differentiable in ``scores``
(``jax.custom_vjp``: the backward is the XLA reference's, for the kernel's indices); the indices are not.

Group scores: ``"top2_sum"`` (V3's ``noaux_tc``: the sum of a group's two largest values, a tie counting twice) with
``fill = -inf``; ``"max"`` (V2's ``group_limited_greedy``) with ``fill = 0``, as the HF and DeepSeek code mask.
``n_group = 1``: a plain top-k over all experts.

Ordering: as ``lax.top_k``, descending value and, among equal values, the lower index first; ``idx[t, 0]`` is the
largest. The kernel reproduces the XLA reference's indices exactly (same comparisons on the same float32 values, no
arithmetic on them beyond the top-2 sum, added in the same order), so switching backends never changes a routing
decision -- for finite scores: the kernel ranks a NaN as -inf and always returns indices in range and distinct
per token, where ``lax.top_k`` orders NaNs its own way (a step with NaN scores is one training skips).

Why: XLA runs the reference as about seven kernels per MoE layer (group reductions, two ``top_k`` sorts, the
masking selects). A decode step of `small` is a few hundred small kernels, and the router's took ~12% of its device
time on an H200 (docs/benchmarks.md). Here one program ranks ``bt`` tokens' scores in registers: ``topk_group``
then ``K`` rounds of "largest value not taken yet, lowest index among equals" (two reductions per round). On an
H100 (`bench_moe_topk`, kernel durations): 2.3 vs 8.2 us at `small`'s batch 1, 3.4 vs 9.8 us at batch 32, 9.0 vs
75.5 us over a 16k-token training batch; V3's router 3.0 vs 9.4-11.2 us when decoding, 39.6 vs 163 us over 16k
tokens. Ranking all experts at once instead (one ``[E, E]`` comparison per token, no dependent rounds) measured
slower at every size (4.0-5.3 us when decoding, 180 us at 16k tokens) and was dropped.

Backends (``implementation=``):

* ``"xla"``: the reference (``lax.top_k`` on group scores and on the masked scores; any platform, any shape).
* ``"pallas"``: a Pallas Triton kernel, grid ``(T / bt,)``. Triton's tensor sizes are powers of two: V3's 256
  experts in 8 groups, `small`'s 64 in 8 and V2-Lite's 64 run as they are; V2's 160 in 8 groups are padded to 8 x 32
  with -inf columns (one XLA pad before the kernel, the ids mapped back after), exact while ``G`` is a power of two
  and the picks fit in the kept groups (:func:`kernel_shapes_ok`). ``interpret=True`` runs it on the CPU.
* ``"auto"``: Pallas on GPUs where the shapes allow, XLA otherwise.

Pallas' Triton backend is deprecated in jax 0.11 (lowering warns); the project pins jax 0.11.2, where it lowers and
runs (see ``fp8_weight_gemm.py`` for the same note).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

from pallas_kernels import hardware

__all__ = ["moe_topk", "moe_topk_reference", "moe_topk_weights", "moe_topk_weights_reference", "kernel_shapes_ok",
           "kernel_supported", "default_block_rows"]

Implementation = Literal["auto", "xla", "pallas"]
GroupScore = Literal["top2_sum", "max"]
_NEG_INF = float("-inf")


def _check(choice, k, n_group, topk_group, group_score):
    if choice.ndim != 2:
        raise ValueError(f"moe_topk expects choice [T, E]; got shape {choice.shape}")
    t, e = choice.shape
    if not 1 <= k <= e:
        raise ValueError(f"moe_topk: k = {k} must lie in [1, E = {e}]")
    if n_group < 1 or e % n_group:
        raise ValueError(f"moe_topk: n_group = {n_group} must divide E = {e}")
    if n_group > 1 and not 1 <= topk_group <= n_group:
        raise ValueError(f"moe_topk: topk_group = {topk_group} must lie in [1, n_group = {n_group}]")
    if group_score not in ("top2_sum", "max"):
        raise ValueError(f"moe_topk: group_score = {group_score!r}; use 'top2_sum' (V3) or 'max' (V2)")


def _top2_sum(x: jax.Array) -> jax.Array:
    """``lax.top_k(x, 2)[0].sum(-1)`` by two max reductions (XLA fuses them with their producers; top_k is a sort
    kernel of its own): the largest value plus the largest of the rest with one instance of it removed (ties
    count twice, as in top_k). Bitwise equal to the top_k form: the same two values, added in the same order."""
    m1 = jnp.max(x, axis=-1)
    first = jnp.argmax(x, axis=-1)
    rest = jnp.where(jnp.arange(x.shape[-1]) == first[..., None], -jnp.inf, x)
    return m1 + jnp.max(rest, axis=-1)


def moe_topk_reference(choice: jax.Array, k: int, *, n_group: int = 1, topk_group: int = 1,
                       group_score: GroupScore = "top2_sum") -> jax.Array:
    """The XLA path: group scores by reductions, ``lax.top_k`` over them, the kept groups as a mask by comparison
    (an elementwise op XLA fuses, not a scatter), ``lax.top_k`` over the masked scores. ``[T, E] -> [T, K]`` int32."""
    _check(choice, k, n_group, topk_group, group_score)
    choice = jax.lax.stop_gradient(choice)
    t, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(t, n_group, e // n_group)
        scores, fill = (_top2_sum(grouped), _NEG_INF) if group_score == "top2_sum" else (grouped.max(-1), 0.0)
        _, keep = jax.lax.top_k(scores, topk_group)                                     # [T, topk_group]
        group_mask = jnp.any(keep[:, :, None] == jnp.arange(n_group, dtype=keep.dtype)[None, None, :], axis=1)
        choice = jnp.where(jnp.repeat(group_mask, e // n_group, axis=1), choice, fill)
    return jax.lax.top_k(choice, k)[1].astype(jnp.int32)


def _combine_weights(scores: jax.Array, idx: jax.Array, norm: bool, scale: float) -> jax.Array:
    """``scores [T, E]`` at ``idx [T, K]``, over their sum (+ 1e-20) when ``norm``, times ``scale`` (float32)."""
    w = jnp.take_along_axis(scores.astype(jnp.float32), idx, axis=-1)
    if norm:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return w * scale


def moe_topk_weights_reference(choice: jax.Array, scores: jax.Array, k: int, *, n_group: int = 1,
                               topk_group: int = 1, group_score: GroupScore = "top2_sum", norm: bool = True,
                               scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The XLA path of :func:`moe_topk_weights`: ``(weights [T, K] float32, idx [T, K] int32)``."""
    idx = moe_topk_reference(choice, k, n_group=n_group, topk_group=topk_group, group_score=group_score)
    return _combine_weights(scores, idx, norm, scale), idx


def _pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def kernel_shapes_ok(t: int, e: int, n_group: int = 1, k: int = 1, topk_group: int = 1) -> bool:
    """Whether the Pallas kernel takes ``choice [T, E]`` in ``n_group`` groups. Triton's tensors are powers of two:
    without groups any ``E`` (padded to the next power of two with -inf columns, which rank after every real expert
    by index); with groups ``n_group`` a power of two and each group padded to one (V2's 160 experts: 8 groups of
    20 -> 32), which stays exact while the ``k`` picks fit in the kept groups' real experts
    (``k <= topk_group * E / n_group``: padded columns can then tie with masked experts only after every kept
    expert is taken)."""
    if t < 1 or e < 2 or n_group < 1 or e % n_group:
        return False
    if n_group == 1:
        return True
    return _pow2(n_group) and (_pow2(e // n_group) or k <= topk_group * (e // n_group))


def kernel_supported(t: int, e: int, n_group: int = 1, k: int = 1, topk_group: int = 1) -> bool:
    """Whether ``implementation="auto"`` picks the Pallas kernel: on a GPU, shapes as :func:`kernel_shapes_ok`."""
    return jax.default_backend() == "gpu" and kernel_shapes_ok(t, e, n_group, k, topk_group)


def default_block_rows(t: int, e: int, num_sms: int = 132) -> int:
    """Tokens per program: a power of two dividing ``T``, small enough that about two programs per multiprocessor
    run (decode steps: one token each, as many programs as tokens) and that a ``[bt, E]`` tile stays at most 4,096
    values (32 per thread of 4 warps)."""
    bt = 1
    while t % (2 * bt) == 0 and 2 * bt * e <= 4096 and t // (2 * bt) >= 2 * num_sms:
        bt *= 2
    return bt


def _pick(x: jax.Array, taken: jax.Array, iota: jax.Array, n: int) -> jax.Array:
    """Per row of ``x [bt, n]``: the lowest index among the largest values not yet ``taken`` (``[bt]`` int32).
    Works when the largest remaining value is -inf: ``x == m`` then matches -inf entries, ``~taken`` the untaken
    ones. Clamped to ``n - 1``, so that even a NaN that slipped through gives an index in range."""
    m = jnp.max(jnp.where(taken, _NEG_INF, x), axis=1)
    return jnp.minimum(jnp.min(jnp.where(~taken & (x == m[:, None]), iota, n), axis=1), n - 1)


def _kernel(*refs, k: int, n_group: int, topk_group: int, group_score: str, real: int,
            weights: tuple[bool, float] | None = None):
    """One program: ``bt`` tokens. ``c_ref [bt, E]`` float32 -> ``o_ref [bt, Kp]`` int32 (slots >= K unused).
    ``real``: the real experts per group (the rest of each ``E / n_group`` columns is padding, -inf).
    ``weights = (norm, scale)``: also ``s_ref [bt, E]`` (the unbiased scores) in and ``w_ref [bt, Kp]`` float32 out,
    each pick's score, over the picks' sum (+ 1e-20, added in pick order) when ``norm``, times ``scale``."""
    from jax import lax

    if weights is None:
        (c_ref, o_ref), s_ref, w_ref = refs, None, None
    else:
        c_ref, s_ref, o_ref, w_ref = refs
    c = c_ref[...]
    c = jnp.where(c == c, c, _NEG_INF)                 # NaN ranks as -inf (lax.top_k ranks it otherwise; see docs)
    bt, e = c.shape
    kp = o_ref.shape[1]
    if n_group > 1:
        gs = e // n_group
        cg = c.reshape(bt, n_group, gs)
        m1 = jnp.max(cg, axis=2)                                                    # [bt, G]
        if group_score == "top2_sum":
            giota = lax.broadcasted_iota(jnp.int32, (bt, n_group, gs), 2)
            first = jnp.min(jnp.where(cg == m1[:, :, None], giota, gs), axis=2)   # argmax: first of the largest
            score = m1 + jnp.max(jnp.where(giota == first[:, :, None], _NEG_INF, cg), axis=2)
            fill = _NEG_INF
        else:
            score, fill = m1, 0.0
        iota_g = lax.broadcasted_iota(jnp.int32, (bt, n_group), 1)
        keep = iota_g < 0                                                           # all False
        for _ in range(topk_group):
            g = _pick(score, keep, iota_g, n_group)
            keep = keep | (iota_g == g[:, None])
        mask = jnp.broadcast_to(keep[:, :, None], (bt, n_group, gs)).reshape(bt, e)
        c = jnp.where(mask, c, fill)
    iota = lax.broadcasted_iota(jnp.int32, (bt, e), 1)
    if real != e // n_group:                           # padding stays below every real expert, masked ones included
        c = jnp.where(iota % (e // n_group) < real, c, _NEG_INF)
    slot = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
    taken = iota < 0
    out = jnp.zeros((bt, kp), jnp.int32)
    if weights is not None:
        sc = s_ref[...]
        w, total = jnp.zeros((bt, kp), jnp.float32), jnp.zeros((bt,), jnp.float32)
    for j in range(k):
        i = _pick(c, taken, iota, e)
        hit = iota == i[:, None]
        taken = taken | hit
        out = jnp.where(slot == j, i[:, None], out)
        if weights is not None:                        # the pick's unbiased score (exactly one column matches)
            v = jnp.sum(jnp.where(hit, sc, 0.0), axis=1)
            w = jnp.where(slot == j, v[:, None], w)
            total = total + v
    o_ref[...] = out
    if weights is not None:
        norm, scale = weights
        if norm:
            w = w / (total + 1e-20)[:, None]
        w_ref[...] = w * scale


def _pallas(choice: jax.Array, k: int, *, n_group: int, topk_group: int, group_score: str, interpret: bool,
            bt: int | None = None, num_warps: int | None = None, scores: jax.Array | None = None,
            norm: bool = True, scale: float = 1.0):
    """The Pallas call; ``bt`` and ``num_warps`` are what a sweep may override (default
    :func:`default_block_rows`; 1 warp for tiles of at most 256 values, else 4). With ``scores``: ``(weights,
    idx)`` (:func:`moe_topk_weights`; not differentiable here), else ``idx``."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    t, e = choice.shape
    choice = jax.lax.stop_gradient(choice).astype(jnp.float32)
    gs = e // n_group
    gsp = _next_pow2(gs)                       # Triton's sizes: each group (or, without groups, E) padded with -inf

    def pad(a, value):
        return jnp.pad(a.reshape(t, n_group, gs), ((0, 0), (0, 0), (0, gsp - gs)),
                       constant_values=value).reshape(t, n_group * gsp)

    if gsp != gs:
        choice = pad(choice, -jnp.inf)
    inputs = [choice]
    if scores is not None:
        scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
        inputs.append(pad(scores, 0.0) if gsp != gs else scores)
    ep = n_group * gsp
    bt = bt or default_block_rows(t, ep, hardware.num_sms())
    if t % bt:
        raise ValueError(f"moe_topk: T = {t} is not a multiple of bt = {bt}")
    kp = _next_pow2(k)                                                              # Triton: a power of two
    num_warps = num_warps or (1 if bt * ep <= 256 else 4)
    spec_in, spec_out = pl.BlockSpec((bt, ep), lambda i: (i, 0)), pl.BlockSpec((bt, kp), lambda i: (i, 0))
    with_w = scores is not None
    res = pl.pallas_call(
        functools.partial(_kernel, k=k, n_group=n_group, topk_group=topk_group, group_score=group_score, real=gs,
                          weights=(bool(norm), float(scale)) if with_w else None),
        grid=(t // bt,),
        in_specs=[spec_in] * len(inputs),
        out_specs=[spec_out, spec_out] if with_w else spec_out,
        out_shape=([jax.ShapeDtypeStruct((t, kp), jnp.int32), jax.ShapeDtypeStruct((t, kp), jnp.float32)]
                   if with_w else jax.ShapeDtypeStruct((t, kp), jnp.int32)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*inputs)
    out, w = res if with_w else (res, None)
    out = out[:, :k] if kp != k else out
    out = out if gsp == gs else (out // gsp) * gs + out % gsp                      # padded -> real expert ids
    return out if w is None else (w[:, :k] if kp != k else w, out)


def _resolve(choice, k, n_group, topk_group, group_score, implementation, interpret) -> str:
    """``implementation`` resolved to "xla" or "pallas" (errors for impossible requests)."""
    _check(choice, k, n_group, topk_group, group_score)
    t, e = choice.shape
    return hardware.resolve_triton(
        "moe_topk", implementation, supported=kernel_supported(t, e, n_group, k, topk_group),
        shapes_ok=kernel_shapes_ok(t, e, n_group, k, topk_group), interpret=interpret,
        requirement=f"n_group a power of two and, where E / n_group is not one (groups padded), k <= topk_group * "
                    f"E / n_group; got E = {e}, n_group = {n_group}, topk_group = {topk_group}, k = {k}")


def moe_topk_weights(choice: jax.Array, scores: jax.Array, k: int, *, n_group: int = 1, topk_group: int = 1,
                     group_score: GroupScore = "top2_sum", norm: bool = True, scale: float = 1.0,
                     implementation: Implementation = "auto", interpret: bool = False,
                     call_wrapper=None) -> tuple[jax.Array, jax.Array]:
    """:func:`moe_topk` plus the combine weights: ``(weights [T, K] float32, idx [T, K] int32)`` with
    ``weights = scores[idx]`` (over its sum + 1e-20 when ``norm``) ``* scale``.

    Args as :func:`moe_topk`, and:
      scores: ``[T, E]`` the unbiased scores the weights are gathered from (differentiable).
      norm, scale: renormalise over the K picks; the routed scaling factor.
      call_wrapper: applied to the kernel call ``f(choice, scores) -> (weights, idx)`` before it runs (e.g. a
        ``shard_map`` over tokens); the backward pass is XLA's (the reference's gradient for the kernel's indices),
        outside it.
    """
    if scores.shape != choice.shape:
        raise ValueError(f"moe_topk_weights: scores {scores.shape} and choice {choice.shape} differ")
    kw = dict(n_group=n_group, topk_group=topk_group, group_score=group_score)
    if _resolve(choice, k, n_group, topk_group, group_score, implementation, interpret) == "xla":
        return moe_topk_weights_reference(choice, scores, k, norm=norm, scale=scale, **kw)
    kernel = functools.partial(_pallas, k=k, interpret=interpret, norm=norm, scale=scale, **kw)

    def run(choice, scores):
        return kernel(choice, scores=scores)

    call = run if call_wrapper is None else call_wrapper(run)

    @jax.custom_vjp
    def fused(choice, scores):
        return call(choice, scores)

    def fwd(choice, scores):
        w, idx = call(choice, scores)
        return (w, idx), (scores, idx)

    def bwd(res, ct):
        scores, idx = res
        _, vjp = jax.vjp(lambda s: _combine_weights(s, idx, norm, scale), scores)
        return jnp.zeros_like(scores), vjp(ct[0])[0]                # choice ranks only: no gradient through it

    fused.defvjp(fwd, bwd)
    return fused(choice, scores)


def moe_topk(choice: jax.Array, k: int, *, n_group: int = 1, topk_group: int = 1,
             group_score: GroupScore = "top2_sum", implementation: Implementation = "auto",
             interpret: bool = False) -> jax.Array:
    """The ``k`` experts each token routes to (see the module docstring).

    Args:
      choice: ``[T, E]`` float32 selection scores (V3: sigmoid scores + bias; V2: softmax scores). Not
        differentiated through (the indices are piecewise constant).
      k: experts per token.
      n_group, topk_group: group-limited routing (``n_group = 1``: plain top-k).
      group_score: ``"top2_sum"`` (V3, masked experts get -inf) or ``"max"`` (V2, masked experts get 0).
      implementation: ``"auto"``, ``"xla"`` or ``"pallas"``.
      interpret: run the Pallas kernel in the interpreter (CPU tests).

    Returns ``[T, K]`` int32, by descending value, ties to the lower index (``lax.top_k``'s order).
    """
    if _resolve(choice, k, n_group, topk_group, group_score, implementation, interpret) == "xla":
        return moe_topk_reference(choice, k, n_group=n_group, topk_group=topk_group, group_score=group_score)
    return _pallas(choice, k, n_group=n_group, topk_group=topk_group, group_score=group_score, interpret=interpret)
