"""MTP self-speculative decoding (greedy): the MTP module drafts the token after next, the main model verifies
the draft and its own next token in one forward of two tokens, and the longest agreeing prefix is kept.

Letters: B batch, P padded prompt length, N max new tokens, D hidden, V vocabulary.

Per row, with ``t_{n}`` the last confirmed token (at position n, not yet in the main cache) and ``d`` the draft for
position n + 1:

1. Main forward on ``[t_n, d]`` at positions ``n, n+1`` (absorbed MLA over the latent cache):
   ``g0 = argmax logits(n)`` is the model's token for n + 1, ``g1 = argmax logits(n+1)`` its token for n + 2 given d.
2. If ``g0 == d`` both ``g0`` and ``g1`` are confirmed (two tokens for one main forward); otherwise only ``g0``.
   A rejected draft's cache slot is overwritten by the next step, so nothing needs rolling back.
3. The MTP module runs on positions ``n, n+1`` with inputs ``(h_n, emb(g0))`` and ``(h_{n+1}, emb(g1))`` -- the main
   model's final-normed hidden states, embedding first, as released -- and its output at the last confirmed
   position drafts the next ``d``. (Its own one-layer latent cache is kept in step with the main one.)

The output is exactly plain greedy decoding's (same argmax at every confirmed position); rows advance by one or two
tokens independently (per-row cache slots). Only the first MTP depth is used for drafting.

**Speculative sampling** (``temperature > 0``; Leviathan et al. 2023, Chen et al. 2023): the draft ``d`` is sampled
from the MTP module's distribution ``q`` and the main model's ``p`` at position n + 1 decides: ``d`` is kept with
probability ``min(1, p(d) / q(d))``; a rejected draft is replaced by a sample of ``norm(max(0, p - q))``; a kept
draft is followed by a bonus token sampled from the main model's distribution at n + 2 given ``d``. Both ``p`` and
``q`` are the sampling distributions (temperature, then top-k / top-p truncation), so every generated token is
distributed exactly as in plain sampling with the same :class:`SamplingConfig` (a test checks the marginals against
the exact ones); the random streams differ, so the samples themselves do not match :func:`generate`'s. Row ``b``'s
step ``i`` (0: the prefill) draws from ``fold_in(fold_in(keys[b], i), j)``: ``j`` = 0 the verification (folded
again: 0 the accept test, 1 the residual sample), 2 the bonus token (the prefill: the first token), 3 the next
draft.

``logprobs`` are those of :func:`~dsjax.inference.sample_tokens`: ``log softmax(logits / temperature)`` of the main
model at each generated token (``log softmax(logits)`` when greedy).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.inference.generate import GenerateOutput, _layout, _stop_ids, pad_prompts
from dsjax.inference.sampling import SamplingConfig, _log_probs
from dsjax.model import Transformer, init_cache, mtp_draft_step, unstack_layers

__all__ = ["SpeculativeOutput", "speculative_generate", "speculative_generate_tokens"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
    """:class:`GenerateOutput` fields plus ``drafts`` [B] (drafts proposed), ``accepted`` [B] (drafts accepted) and
    ``main_forwards`` (verification forwards after the prefill)."""

    output: GenerateOutput
    drafts: jax.Array
    accepted: jax.Array
    main_forwards: jax.Array

    @property
    def acceptance_rate(self) -> float:
        return float(jnp.sum(self.accepted) / jnp.maximum(jnp.sum(self.drafts), 1))


def _at(a: jax.Array, t: jax.Array) -> jax.Array:
    """``a [B, V]`` at the tokens ``t [B]``: ``[B]``."""
    return jnp.take_along_axis(a, t[:, None], -1)[:, 0]


def _pick(logq: jax.Array, keys: jax.Array, greedy: bool) -> jax.Array:
    """A token per row from log-probs ``[B, V]``: argmax when greedy, else a sample with ``keys [B]``."""
    if greedy:
        return jnp.argmax(logq, -1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logq).astype(jnp.int32)


def _verify(logp0: jax.Array, logq: jax.Array, draft: jax.Array, keys: jax.Array, greedy: bool):
    """The token at n + 1 and whether the draft stands: ``logp0 [B, V]`` the main model's sampling log-probs there,
    ``logq [B, V]`` the draft's, ``draft [B]``. Greedy: the argmax, kept iff it is the draft. Sampling: the draft
    kept with probability ``min(1, p(d) / q(d))``, else a sample of ``norm(max(0, p - q))``."""
    if greedy:
        tok = jnp.argmax(logp0, -1).astype(jnp.int32)
        return tok, tok == draft
    u = jax.vmap(lambda k: jax.random.uniform(k))(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0))
    ok = jnp.log(u) < _at(logp0, draft) - _at(logq, draft)        # u < p(d) / q(d), in logs (q(d) > 0: d ~ q)
    resid = jnp.maximum(jnp.exp(logp0) - jnp.exp(logq), 0.0)
    # p == q leaves no residual mass, and then the draft is always kept; the fallback only keeps the log finite
    log_resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, jnp.log(resid), logp0)
    alt = jax.vmap(jax.random.categorical)(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1), log_resid)
    return jnp.where(ok, draft, alt.astype(jnp.int32)), ok


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pad_id"))
def speculative_generate_tokens(graphdef: Any, state: Any, prompts: jax.Array, prompt_lengths: jax.Array,
                                keys: jax.Array | None = None, *, cfg: SamplingConfig,
                                pad_id: int = 0) -> SpeculativeOutput:
    """Pure speculative generator (see the module docstring); ``prompts [B, P]`` left-padded, ``keys [B]`` one PRNG
    key per row (needed unless ``cfg`` is greedy)."""
    greedy = cfg.greedy
    if not greedy and keys is None:
        raise ValueError("speculative sampling (temperature > 0) needs keys: one PRNG key per row")
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    if not len(model.mtp):
        raise ValueError("the model has no MTP module (num_nextn_predict_layers=0)")
    b, p = prompts.shape
    n = cfg.max_new_tokens
    stops = jnp.asarray(_stop_ids(mcfg, cfg) or (-1,), jnp.int32)
    length = p + n + 2
    main = init_cache(mcfg, b, length)
    mtp = init_cache(mcfg.replace(num_hidden_layers=1), b, length)
    start = (p - prompt_lengths).astype(jnp.int32)  # slot of position 0, per row

    # Prefill: the main model over the prompt, then MTP over every prompt position (next token = the prompt's
    # following token, or the first generated token at the last position).
    seg, pos = _layout(prompt_lengths, p)
    hidden = []
    for c0 in range(0, p, cfg.prefill_chunk):
        c1 = min(c0 + cfg.prefill_chunk, p)
        out = model(prompts[:, c0:c1], seg[:, c0:c1], pos[:, c0:c1], cache=main, cache_index=c0, mla_impl="naive",
                    compute_logits=False, return_hidden=True)
        main = out.cache
        hidden.append(out.hidden)
    hidden = jnp.concatenate(hidden, axis=1)
    keys = jax.random.split(jax.random.key(0), b) if keys is None else keys   # (unused when greedy)
    step_keys = lambda i, j: jax.vmap(  # noqa: E731
        lambda k: jax.random.fold_in(jax.random.fold_in(k, i), j))(keys)
    rep0, samp0 = _log_probs(model.logits_f32(hidden[:, -1]), cfg)
    first = _pick(samp0, step_keys(0, 2), greedy)                        # the first token: plain sampling
    nxt = jnp.concatenate([prompts[:, 1:], first[:, None]], axis=1)
    h_mtp, mtp = mtp_draft_step(model, 0, hidden, nxt, pos, mtp, 0, segment_ids=seg)
    logq = _log_probs(model.logits_f32(h_mtp[:, -1]), cfg)[1]
    draft = _pick(logq, step_keys(0, 3), greedy)
    if cfg.unstack_layers:
        model = unstack_layers(model)  # once, outside the decode loop (see SamplingConfig.unstack_layers)

    rows = jnp.arange(b)
    out_tok = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    out_lp = jnp.zeros((b, n), jnp.float32).at[:, 0].set(_at(rep0, first))
    gen = jnp.ones((b,), jnp.int32)
    done = jnp.isin(first, stops) | (gen >= n)
    carry = (main, mtp, first, draft, logq, prompt_lengths.astype(jnp.int32), out_tok, out_lp, gen, done,
             jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.int32(0))

    def cond(c):
        return ~jnp.all(c[9])

    def put(buf, at, value, where):
        at = jnp.minimum(at, n - 1)
        return buf.at[rows, at].set(jnp.where(where, value, buf[rows, at]))

    def body(c):
        main, mtp, last, draft, logq, cur, out_tok, out_lp, gen, done, drafts, accepted, steps = c
        toks = jnp.stack([last, draft], axis=1)
        positions = jnp.stack([cur, cur + 1], axis=1)
        slots = start + cur
        o = model(toks, jnp.ones((b, 2), jnp.int32), positions, cache=main, cache_index=slots, mla_impl="absorbed",
                  compute_logits=False, return_hidden=True)
        rep, samp = _log_probs(model.logits_f32(o.hidden), cfg)           # [B, 2, V]: at n + 1, and n + 2 given d
        i = steps + 1
        g0, ok = _verify(samp[:, 0], logq, draft, step_keys(i, 0), greedy)
        g1 = _pick(samp[:, 1], step_keys(i, 2), greedy)                  # the bonus token (kept only if ok)
        g = jnp.stack([g0, g1], axis=1)
        h_m, mtp = mtp_draft_step(model, 0, o.hidden, g, positions, mtp, slots)
        new_logq = _log_probs(model.logits_f32(jnp.where(ok[:, None], h_m[:, 1], h_m[:, 0])), cfg)[1]
        new_draft = _pick(new_logq, step_keys(i, 3), greedy)

        active = ~done
        out_tok = put(out_tok, gen, g0, active)
        out_lp = put(out_lp, gen, _at(rep[:, 0], g0), active)
        gen1 = gen + active
        stop0 = jnp.isin(g0, stops)
        second = active & ok & ~stop0 & (gen1 < n)
        out_tok = put(out_tok, gen1, g1, second)
        out_lp = put(out_lp, gen1, _at(rep[:, 1], g1), second)
        gen2 = gen1 + second
        new_done = done | (active & stop0) | (second & jnp.isin(g1, stops)) | (gen2 >= n)
        last = jnp.where(second, g1, g0)
        cur = jnp.where(active, cur + 1 + second, cur)
        return (o.cache, mtp, last, new_draft, new_logq, cur, out_tok, out_lp, gen2, new_done, drafts + active,
                accepted + (active & ok), steps + 1)

    (main, mtp, _, _, _, _, out_tok, out_lp, gen, _, drafts, accepted,
     steps) = jax.lax.while_loop(cond, body, carry)
    out = GenerateOutput(tokens=out_tok, lengths=gen, logprobs=out_lp, prompt_lengths=prompt_lengths.astype(jnp.int32))
    return SpeculativeOutput(output=out, drafts=drafts, accepted=accepted, main_forwards=steps)


def speculative_generate(model: Transformer, prompts: Sequence[Sequence[int]], *,
                         sampling: SamplingConfig | None = None, key: jax.Array | None = None,
                         seed: int = 0) -> SpeculativeOutput:
    """MTP self-speculative generation of token-id prompts. Greedy (the default, ``temperature=0``): the same
    tokens as greedy :func:`generate`. ``temperature > 0``: speculative sampling, distributed as :func:`generate`'s
    samples with the same ``sampling`` (each row's key ``fold_in(key, b)``, default ``jax.random.key(seed)``)."""
    cfg = sampling or SamplingConfig(temperature=0.0)
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lengths = pad_prompts(prompts, cfg.length_bucket, pad_id)
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed) if key is None else key
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    return speculative_generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                                       None if cfg.greedy else keys, cfg=cfg, pad_id=pad_id)
