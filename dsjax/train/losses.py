"""Loss functions shared by pretraining, SFT and GRPO: shifted targets, chunked float32 cross-entropy.

Letters: B batch, T tokens, D hidden, V vocabulary, N = B*T flattened tokens, C chunk of tokens.

Targets. Position ``i`` predicts ``tokens[i + k]`` (``k = 1`` for the main head, ``k = d + 1`` for MTP depth
``d``) only when ``i + k < T``, ``segment_ids[i + k] == segment_ids[i] != 0`` (never across packed documents or
into padding) and ``loss_mask[i + k] == 1`` (SFT: completion tokens only).

Cross-entropy is computed from hidden states ``C`` tokens at a time: each chunk's logits ``[C, V]`` are formed in
float32 (``preferred_element_type``), reduced to ``logsumexp`` and the target logit, and recomputed in the backward
pass (``jax.checkpoint``), so at most one ``[C, V]`` float32 block is alive instead of ``[B, T, V]``. The backward
keeps each chunk's ``lse [C]`` from the forward (a named residual) and forms ``d logits = a * exp(logits - lse) -
b * onehot(target)`` in one elementwise pass (:func:`_ce_given_lse`), where autodiff of ``logsumexp`` and
``take_along_axis`` would recompute the max and the exp-sum and scatter the target gradient into a zeroed
``[C, V]`` block.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

__all__ = ["shifted_targets", "chunked_cross_entropy", "token_log_probs"]


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array, loss_mask: jax.Array, k: int
                    ) -> tuple[jax.Array, jax.Array]:
    """``-> (targets [B, T] int32, weights [B, T] float32)`` for predicting ``k`` tokens ahead."""
    b, t = tokens.shape
    pad = ((0, 0), (0, k))
    nxt = jnp.pad(tokens, pad)[:, k:]
    nxt_seg = jnp.pad(segment_ids, pad)[:, k:]
    nxt_mask = jnp.pad(loss_mask, pad)[:, k:]
    valid = (nxt_seg == segment_ids) & (segment_ids != 0) & (nxt_mask != 0)
    return nxt.astype(jnp.int32), valid.astype(jnp.float32)


def _chunk(chunk_tokens: int, *arrays: jax.Array):
    """Pads the leading (token) axis of each array to a multiple of C and splits it into ``[n_chunks, C, ...]``."""
    n = arrays[0].shape[0]
    c = min(chunk_tokens, n)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    out = tuple(jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((n_chunks, c) + a.shape[1:])
                for a in arrays)
    return out, n_chunks, c, n


@jax.custom_vjp
def _ce_given_lse(logits: jax.Array, lse: jax.Array, targets: jax.Array, weights: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
    """``(sum w * (lse - logits[target]), sum w * lse**2)`` of a chunk, ``logits [C, V]`` float32 and ``lse [C]``
    their logsumexp, passed in (computed under ``stop_gradient`` by the caller). The custom backward gives the
    *total* derivative with respect to ``logits`` (through ``lse`` too): ``w (g_ce + 2 g_z lse) softmax -
    w g_ce onehot``; none flows to ``lse``."""
    return _ce_given_lse_fwd(logits, lse, targets, weights)[0]


def _ce_given_lse_fwd(logits, lse, targets, weights):
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    sums = (jnp.sum(weights * (lse - tgt)), jnp.sum(weights * lse * lse))
    return sums, (logits, lse, targets, weights, tgt)


def _softmax_minus_onehot(z, lse, targets, a, b):
    """``a * softmax(z) - b * onehot(targets)`` per row (``a, b [C]``), softmax from the given ``lse``: one
    elementwise pass over ``z [C, V]``, the target term a select (no scatter)."""
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == targets[:, None]
    return a[:, None] * jnp.exp(z - lse[:, None]) - jnp.where(onehot, b[:, None], 0.0)


def _ce_given_lse_bwd(res, g):
    logits, lse, targets, weights, tgt = res
    g_ce, g_z = g
    d_logits = _softmax_minus_onehot(logits, lse, targets, weights * (g_ce + 2.0 * g_z * lse), g_ce * weights)
    d_weights = g_ce * (lse - tgt) + g_z * lse * lse
    return d_logits, jnp.zeros_like(lse), None, d_weights


_ce_given_lse.defvjp(_ce_given_lse_fwd, _ce_given_lse_bwd)


@jax.custom_vjp
def _target_log_prob_given_lse(z: jax.Array, lse: jax.Array, targets: jax.Array) -> jax.Array:
    """``z[target] - lse`` per row of ``z [C, V]`` (``lse`` its logsumexp, passed in under ``stop_gradient``), with
    the total derivative ``g (onehot - softmax(z))`` formed from ``lse`` in one pass (see the module docstring)."""
    return _target_log_prob_fwd(z, lse, targets)[0]


def _target_log_prob_fwd(z, lse, targets):
    return jnp.take_along_axis(z, targets[:, None], axis=-1)[:, 0] - lse, (z, lse, targets)


def _target_log_prob_bwd(res, g):
    z, lse, targets = res
    return _softmax_minus_onehot(z, lse, targets, -g, -g), jnp.zeros_like(lse), None


_target_log_prob_given_lse.defvjp(_target_log_prob_fwd, _target_log_prob_bwd)


def chunked_cross_entropy(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                          weights: jax.Array, chunk_tokens: int = 4096) -> tuple[jax.Array, jax.Array]:
    """Sums of weighted cross-entropy and of ``logsumexp**2`` (for z-loss) over all tokens.

    Args:
      hidden: ``[B, T, D]`` final-normed hidden states.
      head: ``[C, D] -> [C, V]`` float32 logits (e.g. ``Transformer.logits_f32``).
      targets: ``[B, T]`` int target ids; weights: ``[B, T]`` float (0 masks a position).
      chunk_tokens: C, tokens per logits chunk.
    Returns ``(sum_i w_i * (lse_i - logit_i[target_i]), sum_i w_i * lse_i**2)``, both float32 scalars.
    """
    (h, tg, w), n_chunks, _, _ = _chunk(chunk_tokens, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1),
                                        weights.reshape(-1).astype(jnp.float32))

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("ce_lse"))
    def chunk(hc, tc, wc):
        logits = head(hc).astype(jnp.float32)  # [C, V]
        lse = checkpoint_name(jax.lax.stop_gradient(jax.nn.logsumexp(logits, axis=-1)), "ce_lse")
        return _ce_given_lse(logits, lse, tc, wc)

    if n_chunks == 1:
        return chunk(h[0], tg[0], w[0])

    def body(carry, xs):
        ce, z = chunk(*xs)
        return (carry[0] + ce, carry[1] + z), None

    # zeros typed like a chunk's sums: inside ``shard_map`` they vary over the batch axes (a plain float32(0) would
    # not, and scan needs equal carry types)
    init = jax.tree.map(jnp.zeros_like, jax.eval_shape(chunk, h[0], tg[0], w[0]))
    (ce, z), _ = jax.lax.scan(body, init, (h, tg, w))
    return ce, z


def token_log_probs(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], targets: jax.Array,
                    temperature: float = 1.0, chunk_tokens: int = 4096, *, with_entropy: bool = False
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-token ``log p(target)`` ``[B, T]`` (float32) under ``softmax(logits / temperature)``, chunked.

    With ``with_entropy`` also returns the per-token entropy ``H = logsumexp(z) - sum softmax(z) z`` of that
    distribution (``[B, T]``, float32, no gradient: a diagnostic), computed in the same chunk as the log-prob.
    """
    b, t, d = hidden.shape
    (h, tg), _, _, n = _chunk(chunk_tokens, hidden.reshape(-1, d), targets.reshape(-1))

    @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names("lp_lse"))
    def chunk(hc, tc):
        logits = head(hc).astype(jnp.float32) / temperature
        lse = checkpoint_name(jax.lax.stop_gradient(jax.nn.logsumexp(logits, -1)), "lp_lse")
        lp = _target_log_prob_given_lse(logits, lse, tc)
        if not with_entropy:
            return lp
        z = jax.lax.stop_gradient(logits)
        ent = lse - jnp.sum(jnp.exp(z - lse[:, None]) * z, -1)
        return lp, ent

    out = jax.lax.map(lambda xs: chunk(*xs), (h, tg))
    unchunk = lambda x: x.reshape(-1)[:n].reshape(b, t)
    return (unchunk(out[0]), unchunk(out[1])) if with_entropy else unchunk(out)
