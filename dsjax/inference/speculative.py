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

**k drafts per forward** (``draft_tokens=k``; as SGLang and vLLM chain DeepSeek's MTP module): drafts 2..k come
from running the MTP module again on its own output hidden state (in place of the main model's, which does not
exist yet for a drafted position) and the previous draft. The main forward verifies ``[t_n, d_1..d_k]`` at once;
the drafts are checked in order and the first rejected one is replaced (its argmax, or a residual sample), so a
forward confirms 1 to k + 1 tokens. The MTP cache entries written while chaining are rewritten from the main
model's hidden states after the next verification; rejected drafts' main-cache slots are overwritten likewise.

**Speculative sampling** (``temperature > 0``; Leviathan et al. 2023, Chen et al. 2023): the draft ``d`` is sampled
from the MTP module's distribution ``q`` and the main model's ``p`` at position n + 1 decides: ``d`` is kept with
probability ``min(1, p(d) / q(d))``; a rejected draft is replaced by a sample of ``norm(max(0, p - q))``; a kept
draft is followed by a bonus token sampled from the main model's distribution at n + 2 given ``d``. With k drafts
the test runs draft by draft (each ``q`` conditioned on the earlier drafts, each ``p`` on the same prefix), the
first rejection ends the forward's tokens, and the bonus follows only when all k are kept. Both ``p`` and
``q`` are the sampling distributions (temperature, then top-k / top-p truncation), so every generated token is
distributed exactly as in plain sampling with the same :class:`SamplingConfig` (a test checks the marginals against
the exact ones); the random streams differ, so the samples themselves do not match :func:`generate`'s. Row ``b``'s
step ``i`` (0: the prefill) draws from ``fold_in(fold_in(keys[b], i), j)``: ``j`` = 0 the verification (folded
again: 0 the accept test, 1 the residual sample), 2 the bonus token (the prefill: the first token), 3 the next
draft; with k drafts, draft j's verification and the next draft j take 2 + 2j and 3 + 2j (j = 1..k-1).

``logprobs`` are those of :func:`~dsjax.inference.sample_tokens`: ``log softmax(logits / temperature)`` of the main
model at each generated token (``log softmax(logits)`` when greedy).

On a device mesh (``speculative_generate(..., plan=plan)`` or :func:`jit_speculative_generate`): laid out as
:mod:`dsjax.inference.generate` describes (both latent caches, the main and the MTP one, split by rows; the forward
count replicated); greedy output equals plain greedy decoding's, as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.inference.generate import OUTPUT_AXES, GenerateOutput, _layout, _stop_ids, pad_prompts
from dsjax.inference.sampling import SamplingConfig, _log_probs
from dsjax.inference.sharded import ShardedGenerator, prepare, sharded_generator
from dsjax.model import (Transformer, constrain_cache, init_cache, mtp_draft_step, padded_cache_length,
                         unstack_layers)
from dsjax.sharding import Plan

__all__ = ["SpeculativeOutput", "speculative_generate", "speculative_generate_tokens", "jit_speculative_generate",
           "SPECULATIVE_OUTPUT_AXES"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
    """:class:`GenerateOutput` fields plus ``drafts`` [B] (drafts proposed), ``accepted`` [B] (drafts accepted),
    ``accepted_by_depth`` [B, k] (how often draft j was kept: with every earlier draft of its forward) and
    ``main_forwards`` (verification forwards after the prefill)."""

    output: GenerateOutput
    drafts: jax.Array
    accepted: jax.Array
    accepted_by_depth: jax.Array
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


def _key_id(kind: str, j: int) -> int:
    """``fold_in`` ids of a step's random streams: the verification of draft j (0: accept test, 1: residual
    sample, folded once more), the bonus token, the draft at depth j. Draft 0 keeps the ids of single-draft decoding
    (0, 2, 3); later drafts take 4, 5, 6, ..."""
    if kind == "bonus":
        return 2
    base = {"verify": 0, "draft": 3}[kind]
    return base if j == 0 else 2 + 2 * j + (kind == "draft")


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pad_id", "draft_tokens"))
def speculative_generate_tokens(graphdef: Any, state: Any, prompts: jax.Array, prompt_lengths: jax.Array,
                                keys: jax.Array | None = None, *, cfg: SamplingConfig,
                                pad_id: int = 0, draft_tokens: int = 1) -> SpeculativeOutput:
    """Pure speculative generator (see the module docstring); ``prompts [B, P]`` left-padded, ``keys [B]`` one PRNG
    key per row (needed unless ``cfg`` is greedy); ``draft_tokens`` (k) drafts per verification forward.
    :func:`jit_speculative_generate` is the same generator laid out on a mesh."""
    greedy = cfg.greedy
    k = draft_tokens
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"draft_tokens={k!r}: must be an int >= 1 (drafts verified per main forward)")
    if not greedy and keys is None:
        raise ValueError("speculative sampling (temperature > 0) needs keys: one PRNG key per row")
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    if not len(model.mtp):
        raise ValueError("the model has no MTP module (num_nextn_predict_layers=0)")
    b, p = prompts.shape
    n = cfg.max_new_tokens
    stops = jnp.asarray(_stop_ids(mcfg, cfg) or (-1,), jnp.int32)
    # the verification writes up to slot cur + k, a chained draft up to cur + 2k - 1
    length = padded_cache_length(p + n + 2 * k)
    main = constrain_cache(init_cache(mcfg, b, length))        # rows over the batch axes under a plan
    mtp = constrain_cache(init_cache(mcfg.replace(num_hidden_layers=1), b, length))
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

    def chain(mtp, h, d, last_pos, i):
        """Drafts 2..k. ``last_pos [B]``: the last confirmed token's position; ``d`` drafts the next one, from MTP's
        output ``h [B, D]`` one position earlier. Draft j + 1 runs MTP at ``last_pos + j - 1`` on its own previous
        output (in place of the main model's hidden state, not computed yet) and the previous draft; its cache
        entries there are rewritten from the main model's hidden states after the next verification."""
        ds, qs = [], []
        for j in range(1, k):
            at = last_pos + j - 1
            hm, mtp = mtp_draft_step(model, 0, h[:, None], d[:, None], at[:, None], mtp, start + at)
            h = hm[:, 0]
            q = _log_probs(model.logits_f32(h), cfg)[1]
            d = _pick(q, step_keys(i, _key_id("draft", j)), greedy)
            ds.append(d)
            qs.append(q)
        return mtp, ds, qs

    rep0, samp0 = _log_probs(model.logits_f32(hidden[:, -1]), cfg)
    first = _pick(samp0, step_keys(0, 2), greedy)                        # the first token: plain sampling
    nxt = jnp.concatenate([prompts[:, 1:], first[:, None]], axis=1)
    h_mtp, mtp = mtp_draft_step(model, 0, hidden, nxt, pos, mtp, 0, segment_ids=seg)
    logq = _log_probs(model.logits_f32(h_mtp[:, -1]), cfg)[1]
    draft = _pick(logq, step_keys(0, 3), greedy)
    mtp, more, more_q = chain(mtp, h_mtp[:, -1], draft, prompt_lengths.astype(jnp.int32), 0)
    drafts0 = jnp.stack([draft, *more], axis=1)                          # [B, k]
    logq0 = jnp.stack([logq, *more_q], axis=1)                           # [B, k, V]
    if cfg.unstack_layers:
        model = unstack_layers(model, decode_copies=cfg.decode_copies,  # once, before the loop (SamplingConfig)
                                   fold_shared_experts=cfg.fold_shared_experts)

    rows = jnp.arange(b)
    out_tok = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    out_lp = jnp.zeros((b, n), jnp.float32).at[:, 0].set(_at(rep0, first))
    gen = jnp.ones((b,), jnp.int32)
    done = jnp.isin(first, stops) | (gen >= n)
    carry = (main, mtp, first, drafts0, logq0, prompt_lengths.astype(jnp.int32), out_tok, out_lp, gen, done,
             jnp.zeros((b,), jnp.int32), jnp.zeros((b, k), jnp.int32), jnp.int32(0))

    def cond(c):
        return ~jnp.all(c[9])

    def put(buf, at, value, where):
        at = jnp.minimum(at, n - 1)
        return buf.at[rows, at].set(jnp.where(where, value, buf[rows, at]))

    def body(c):
        main, mtp, last, drafts, logq, cur, out_tok, out_lp, gen, done, n_drafts, accepted, steps = c
        toks = jnp.concatenate([last[:, None], drafts], axis=1)              # [B, k+1]: t_n, d_1..d_k
        positions = cur[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]
        slots = start + cur
        o = model(toks, jnp.ones((b, k + 1), jnp.int32), positions, cache=main, cache_index=slots,
                  mla_impl="absorbed", compute_logits=False, return_hidden=True)
        rep, samp = _log_probs(model.logits_f32(o.hidden), cfg)           # [B, k+1, V]: at n+1 .. n+k+1
        i = steps + 1
        # verify the drafts in order; c_j is the token at n+1+j (the draft if kept, else its replacement; c_k the
        # bonus token), standing while every earlier draft was kept
        cs, oks = [], []
        for j in range(k):
            c_j, ok_j = _verify(samp[:, j], logq[:, j], drafts[:, j], step_keys(i, _key_id("verify", j)), greedy)
            cs.append(c_j)
            oks.append(ok_j)
        cs.append(_pick(samp[:, k], step_keys(i, _key_id("bonus", 0)), greedy))
        kept = jnp.cumprod(jnp.stack(oks, axis=1).astype(jnp.int32), axis=1)     # [B, k]: drafts 1..j all kept
        n_kept = jnp.sum(kept, axis=1)                                       # L: tokens c_0..c_L stand
        c_all = jnp.stack(cs, axis=1)                                        # [B, k+1]

        # write c_0..c_L, stopping after a stop token or at max_new_tokens
        active = ~done
        go, stopped, g = active, jnp.zeros_like(done), gen
        for j in range(k + 1):
            write = go & (j <= n_kept) & (g < n)
            out_tok = put(out_tok, g, c_all[:, j], write)
            out_lp = put(out_lp, g, _at(rep[:, j], c_all[:, j]), write)
            g = g + write
            hit = write & jnp.isin(c_all[:, j], stops)
            stopped, go = stopped | hit, write & ~hit
        new_done = done | stopped | (g >= n)
        last = jnp.take_along_axis(c_all, n_kept[:, None], axis=1)[:, 0]
        cur = jnp.where(active, cur + 1 + n_kept, cur)

        # the next drafts: MTP over the verified positions (entries past the kept ones are rewritten next time),
        # its output at the last kept position drafts d_1, then chained drafts
        h_m, mtp = mtp_draft_step(model, 0, o.hidden, c_all, positions, mtp, slots)
        h_last = jnp.take_along_axis(h_m, n_kept[:, None, None], axis=1)[:, 0]
        q1 = _log_probs(model.logits_f32(h_last), cfg)[1]
        d1 = _pick(q1, step_keys(i, _key_id("draft", 0)), greedy)
        mtp, more, more_q = chain(mtp, h_last, d1, cur, i)
        return (o.cache, mtp, last, jnp.stack([d1, *more], axis=1), jnp.stack([q1, *more_q], axis=1), cur, out_tok,
                out_lp, g, new_done, n_drafts + active * k, accepted + active[:, None] * kept, steps + 1)

    (main, mtp, _, _, _, _, out_tok, out_lp, gen, _, n_drafts, accepted,
     steps) = jax.lax.while_loop(cond, body, carry)
    out = GenerateOutput(tokens=out_tok, lengths=gen, logprobs=out_lp, prompt_lengths=prompt_lengths.astype(jnp.int32))
    return SpeculativeOutput(output=out, drafts=n_drafts, accepted=jnp.sum(accepted, axis=1),
                             accepted_by_depth=accepted, main_forwards=steps)


#: Logical axes of :class:`SpeculativeOutput`'s arrays on a mesh: rows over the batch axes, the forward count
#: replicated.
SPECULATIVE_OUTPUT_AXES = SpeculativeOutput(output=OUTPUT_AXES, drafts=("batch",), accepted=("batch",),
                                            accepted_by_depth=("batch", None), main_forwards=())


def jit_speculative_generate(plan: Plan, graphdef: Any, state: Any, *, sampling: SamplingConfig, pad_id: int = 0,
                             draft_tokens: int = 1) -> ShardedGenerator:
    """:func:`speculative_generate_tokens` jitted for a device mesh, as :func:`~dsjax.inference.jit_generate` is
    for :func:`~dsjax.inference.generate_tokens`: ``gen(state, prompts, prompt_lengths, keys) -> SpeculativeOutput``
    with the state laid out per the rules table and rows (inputs, both latent caches, outputs) split over the batch
    axes; ``main_forwards`` comes back replicated. ``keys [B]`` are required (unused when greedy). Greedy: the
    tokens of plain greedy decoding, as on one device."""
    fn = functools.partial(speculative_generate_tokens.__wrapped__, graphdef, cfg=sampling, pad_id=pad_id,
                           draft_tokens=draft_tokens)
    return sharded_generator("speculative_generate_tokens", fn, plan, state, SPECULATIVE_OUTPUT_AXES,
                             (graphdef, sampling, pad_id, draft_tokens))


def speculative_generate(model: Transformer, prompts: Sequence[Sequence[int]], *,
                         sampling: SamplingConfig | None = None, key: jax.Array | None = None,
                         seed: int = 0, draft_tokens: int = 1, plan: Plan | None = None) -> SpeculativeOutput:
    """MTP self-speculative generation of token-id prompts. Greedy (the default, ``temperature=0``): the same
    tokens as greedy :func:`generate`. ``temperature > 0``: speculative sampling, distributed as :func:`generate`'s
    samples with the same ``sampling`` (each row's key ``fold_in(key, b)``, default ``jax.random.key(seed)``).
    ``draft_tokens``: drafts per verification forward (the first from the main model's hidden state, the others
    chained through the MTP module; see the module docstring). ``plan``: generate on its mesh
    (:func:`jit_speculative_generate`), the batch padded and the padding dropped as :func:`~dsjax.generate` does."""
    cfg = sampling or SamplingConfig(temperature=0.0)
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lengths = pad_prompts(prompts, cfg.length_bucket, pad_id)
    graphdef, state = nnx.split(model)
    key = jax.random.key(seed) if key is None else key
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    if plan is not None:
        gen = jit_speculative_generate(plan, graphdef, state, sampling=cfg, pad_id=pad_id, draft_tokens=draft_tokens)
        out = gen(*prepare(plan, model.cfg, state, tokens, lengths, keys))
        b = len(prompts)
        if out.drafts.shape[0] == b:
            return out
        rows = lambda x: x[:b]  # noqa: E731 - the padding rows go; main_forwards is a scalar
        return dataclasses.replace(out, output=jax.tree.map(rows, out.output), drafts=rows(out.drafts),
                                   accepted=rows(out.accepted), accepted_by_depth=rows(out.accepted_by_depth))
    return speculative_generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                                       None if cfg.greedy else keys, cfg=cfg, pad_id=pad_id,
                                       draft_tokens=draft_tokens)
