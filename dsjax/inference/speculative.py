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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.inference.generate import GenerateOutput, _layout, _stop_ids, pad_prompts
from dsjax.inference.sampling import SamplingConfig
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


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pad_id"))
def speculative_generate_tokens(graphdef: Any, state: Any, prompts: jax.Array, prompt_lengths: jax.Array, *,
                                cfg: SamplingConfig, pad_id: int = 0) -> SpeculativeOutput:
    """Pure greedy speculative generator (see the module docstring); ``prompts [B, P]`` left-padded."""
    if not cfg.greedy:
        raise ValueError("speculative decoding here is greedy: use SamplingConfig(temperature=0)")
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
    first = jnp.argmax(model.logits_f32(hidden[:, -1]), -1).astype(jnp.int32)
    nxt = jnp.concatenate([prompts[:, 1:], first[:, None]], axis=1)
    h_mtp, mtp = mtp_draft_step(model, 0, hidden, nxt, pos, mtp, 0, segment_ids=seg)
    draft = jnp.argmax(model.logits_f32(h_mtp[:, -1]), -1).astype(jnp.int32)
    if cfg.unstack_layers:
        model = unstack_layers(model)  # once, outside the decode loop (see SamplingConfig.unstack_layers)

    rows = jnp.arange(b)
    out_tok = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    out_lp = jnp.zeros((b, n), jnp.float32)
    gen = jnp.ones((b,), jnp.int32)
    done = jnp.isin(first, stops) | (gen >= n)
    carry = (main, mtp, first, draft, prompt_lengths.astype(jnp.int32), out_tok, gen, done,
             jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32), jnp.int32(0))

    def cond(c):
        return ~jnp.all(c[7])

    def body(c):
        main, mtp, last, draft, cur, out_tok, gen, done, drafts, accepted, steps = c
        toks = jnp.stack([last, draft], axis=1)
        positions = jnp.stack([cur, cur + 1], axis=1)
        slots = start + cur
        o = model(toks, jnp.ones((b, 2), jnp.int32), positions, cache=main, cache_index=slots, mla_impl="absorbed",
                  compute_logits=False, return_hidden=True)
        g = jnp.argmax(model.logits_f32(o.hidden), -1).astype(jnp.int32)  # [B, 2]
        g0, g1 = g[:, 0], g[:, 1]
        ok = g0 == draft
        h_m, mtp = mtp_draft_step(model, 0, o.hidden, g, positions, mtp, slots)
        d_logits = model.logits_f32(jnp.where(ok[:, None], h_m[:, 1], h_m[:, 0]))
        new_draft = jnp.argmax(d_logits, -1).astype(jnp.int32)

        active = ~done
        out_tok = out_tok.at[rows, jnp.minimum(gen, n - 1)].set(jnp.where(active, g0, out_tok[rows, jnp.minimum(
            gen, n - 1)]))
        gen1 = gen + active
        stop0 = jnp.isin(g0, stops)
        second = active & ok & ~stop0 & (gen1 < n)
        out_tok = out_tok.at[rows, jnp.minimum(gen1, n - 1)].set(jnp.where(second, g1, out_tok[rows, jnp.minimum(
            gen1, n - 1)]))
        gen2 = gen1 + second
        new_done = done | (active & stop0) | (second & jnp.isin(g1, stops)) | (gen2 >= n)
        last = jnp.where(second, g1, g0)
        cur = jnp.where(active, cur + 1 + second, cur)
        return (o.cache, mtp, last, new_draft, cur, out_tok, gen2, new_done, drafts + active,
                accepted + (active & ok), steps + 1)

    main, mtp, _, _, _, out_tok, gen, _, drafts, accepted, steps = jax.lax.while_loop(cond, body, carry)
    out = GenerateOutput(tokens=out_tok, lengths=gen, logprobs=out_lp, prompt_lengths=prompt_lengths.astype(jnp.int32))
    return SpeculativeOutput(output=out, drafts=drafts, accepted=accepted, main_forwards=steps)


def speculative_generate(model: Transformer, prompts: Sequence[Sequence[int]], *,
                         sampling: SamplingConfig | None = None) -> SpeculativeOutput:
    """Greedy MTP self-speculative generation of token-id prompts; same tokens as greedy :func:`generate`.

    ``logprobs`` of the output are not computed on this path (zeros).
    """
    cfg = sampling or SamplingConfig(temperature=0.0)
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lengths = pad_prompts(prompts, cfg.length_bucket, pad_id)
    graphdef, state = nnx.split(model)
    return speculative_generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cfg=cfg,
                                       pad_id=pad_id)
