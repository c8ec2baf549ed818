"""Batched generation on the MLA latent cache: chunked prefill (naive MLA), then a ``lax.while_loop`` decode (absorbed
MLA) with per-sample stopping, all in one jitted function of fixed shapes.

Letters: B batch, P padded prompt length (a multiple of ``length_bucket``), N max new tokens, V vocabulary,
L layers.

Layout. Prompts are left-padded to P: sample b's real tokens fill slots ``[P - len_b, P)`` with segment id 1 and
positions ``0 .. len_b - 1``; padding has segment id 0 and is never attended to by real tokens. Generated token i of
every sample is written at cache slot ``P + i`` with position ``len_b + i``. The cache is a
:class:`~dsjax.model.LatentCache` of ``P + N`` slots holding only ``c_kv`` and the rope key per token and layer.

``generate`` (Python) pads and buckets the prompts and calls :func:`generate_tokens` (pure, jitted once per
``(batch, bucket, sampling config)``): repeated calls with prompts in the same bucket do not recompile.

On a device mesh (``generate(..., plan=plan)``, or :func:`jit_generate` for the pure function): the same generator,
jitted with explicit layouts and traced under the plan. The model state is laid out by the rules table
(:func:`dsjax.sharding.param_shardings`), prompts, lengths, keys, the latent cache and every output by rows over the
batch axes (data x fsdp x expert), so each device prefills and decodes its own rows; MoE blocks run expert-parallel
(all-to-all over ``expert``), the absorbed attention per device in a ``shard_map`` (where the Pallas decode kernel
may run), the rest as XLA partitions it (tensor-split heads, vocabulary, FFN). B must split evenly over the batch
axes: :func:`generate` pads it (repeating the last prompt), :func:`jit_generate` raises a ``ConfigError``. Greedy
tokens equal one device's; log-probs agree to float32 summation order. With ``mesh.capacity_factor`` set, the
expert-parallel dispatch may drop (token, expert) pairs as in training; keep it ``None`` (the default) for exact
decoding. Without a plan nothing of this runs: the single-device program is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.inference.sampling import SamplingConfig, sample_tokens
from dsjax.inference.sharded import ShardedGenerator, prepare, sharded_generator
from dsjax.model import LatentCache, Transformer, constrain_cache, init_cache, padded_cache_length, unstack_layers
from dsjax.sharding import Plan

__all__ = ["GenerateOutput", "generate", "generate_tokens", "jit_generate", "prefill", "decode_step", "pad_prompts",
           "OUTPUT_AXES"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """Attributes:
      tokens: ``[B, N]`` int32 generated tokens; after a sample's stop token, ``pad_id``.
      lengths: ``[B]`` int32 generated tokens per sample, the stop token included.
      logprobs: ``[B, N]`` float32 log-probability of each generated token under the sampling temperature
        (see :mod:`dsjax.inference.sampling`); 0 after the stop.
      prompt_lengths: ``[B]`` int32.
    """

    tokens: jax.Array
    lengths: jax.Array
    logprobs: jax.Array
    prompt_lengths: jax.Array

    def to_lists(self) -> list[list[int]]:
        """The generated tokens of each sample (up to and including its stop token), as Python lists."""
        toks, lens = np.asarray(self.tokens), np.asarray(self.lengths)
        return [toks[b, :lens[b]].tolist() for b in range(toks.shape[0])]


def _layout(prompt_lengths: jax.Array, p: int) -> tuple[jax.Array, jax.Array]:
    idx = jnp.arange(p, dtype=jnp.int32)[None]
    start = (p - prompt_lengths)[:, None]
    return (idx >= start).astype(jnp.int32), jnp.maximum(idx - start, 0)


def prefill(model: Transformer, prompts: jax.Array, prompt_lengths: jax.Array, cache: LatentCache, *,
            chunk: int = 512) -> tuple[jax.Array, LatentCache]:
    """Runs left-padded ``prompts [B, P]`` through the model (naive MLA, ``chunk`` tokens per forward) into ``cache``.

    Returns ``(logits [B, V] float32 of the last prompt token, cache)``.
    """
    b, p = prompts.shape
    seg, pos = _layout(prompt_lengths, p)
    out = None
    for c0 in range(0, p, chunk):
        c1 = min(c0 + chunk, p)
        out = model(prompts[:, c0:c1], seg[:, c0:c1], pos[:, c0:c1], cache=cache, cache_index=c0,
                    mla_impl="naive", compute_logits=False, return_hidden=True)
        cache = out.cache
    return model.logits_f32(out.hidden[:, -1]), cache


def decode_step(model: Transformer, tokens: jax.Array, positions: jax.Array, cache: LatentCache,
                cache_index: jax.Array | int) -> tuple[jax.Array, LatentCache]:
    """One token per sample (``tokens/positions [B]``) at ``cache_index`` with absorbed MLA ->
    ``(logits [B, V] float32, cache)``."""
    b = tokens.shape[0]
    out = model(tokens[:, None], jnp.ones((b, 1), jnp.int32), positions[:, None], cache=cache,
                cache_index=cache_index, mla_impl="absorbed", compute_logits=False, return_hidden=True)
    return model.logits_f32(out.hidden[:, 0]), out.cache


def _stop_ids(model_cfg, cfg: SamplingConfig) -> tuple[int, ...]:
    ids = tuple(cfg.stop_ids)
    if cfg.use_eos:
        ids = ids + tuple(model_cfg.eos_token_ids)
    return tuple(sorted(set(ids)))


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "pad_id"))
def generate_tokens(graphdef: Any, state: Any, prompts: jax.Array, prompt_lengths: jax.Array, keys: jax.Array, *,
                    cfg: SamplingConfig, pad_id: int = 0) -> GenerateOutput:
    """Pure generator: ``prompts [B, P]`` (left-padded), ``prompt_lengths [B]``, ``keys [B]`` -> :class:`GenerateOutput`.

    ``graphdef, state = nnx.split(model)``. Sample b's i-th token uses ``jax.random.fold_in(keys[b], i)``. One device
    (or arrays whose layout ``jax.jit`` infers); :func:`jit_generate` is the same generator laid out on a mesh.
    """
    model = nnx.merge(graphdef, state)
    mcfg = model.cfg
    b, p = prompts.shape
    n = cfg.max_new_tokens
    stops = jnp.asarray(_stop_ids(mcfg, cfg) or (-1,), jnp.int32)
    cache = constrain_cache(init_cache(mcfg, b, padded_cache_length(p + n)))   # rows over the batch axes (a plan)
    with jax.named_scope("prefill"):
        logits, cache = prefill(model, prompts, prompt_lengths, cache, chunk=cfg.prefill_chunk)
    step_keys = lambda i: jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
    tok, lp = sample_tokens(logits, step_keys(0), cfg)
    if cfg.unstack_layers:
        with jax.named_scope("unstack"):
            model = unstack_layers(model, decode_copies=cfg.decode_copies,  # once, before the loop (SamplingConfig)
                                   fold_shared_experts=cfg.fold_shared_experts)

    out_tok = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(tok)
    out_lp = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    done = jnp.isin(tok, stops)
    lengths = jnp.ones((b,), jnp.int32)

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < n) & ~jnp.all(done)

    def one_step(carry):
        i, cache, prev, out_tok, out_lp, done, lengths = carry
        logits, cache = decode_step(model, prev, prompt_lengths + i - 1, cache, jnp.minimum(p + i - 1, p + n - 1))
        with jax.named_scope("sample"):
            tok, lp = sample_tokens(logits, step_keys(i), cfg)
        done = done | (i >= n)  # steps past N (unrolled tail) change nothing
        tok = jnp.where(done, pad_id, tok)
        j = jnp.minimum(i, n - 1)
        keep_tok = jax.lax.dynamic_index_in_dim(out_tok, j, axis=1, keepdims=False)
        keep_lp = jax.lax.dynamic_index_in_dim(out_lp, j, axis=1, keepdims=False)
        out_tok = jax.lax.dynamic_update_index_in_dim(out_tok, jnp.where(done, keep_tok, tok), j, axis=1)
        out_lp = jax.lax.dynamic_update_index_in_dim(out_lp, jnp.where(done, keep_lp, lp), j, axis=1)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stops)
        return i + 1, cache, tok, out_tok, out_lp, done, lengths

    def body(carry):
        for _ in range(cfg.decode_unroll):
            carry = one_step(carry)
        return carry

    carry = (jnp.int32(1), cache, tok, out_tok, out_lp, done, lengths)
    _, _, _, out_tok, out_lp, _, lengths = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens=out_tok, lengths=lengths, logprobs=out_lp,
                          prompt_lengths=prompt_lengths.astype(jnp.int32))


#: Logical axes of :class:`GenerateOutput`'s arrays on a mesh: rows over the batch axes.
OUTPUT_AXES = GenerateOutput(tokens=("batch", None), lengths=("batch",), logprobs=("batch", None),
                             prompt_lengths=("batch",))


def jit_generate(plan: Plan, graphdef: Any, state: Any, *, sampling: SamplingConfig, pad_id: int = 0
                 ) -> ShardedGenerator:
    """:func:`generate_tokens` jitted for a device mesh: returns ``gen(state, prompts, prompt_lengths, keys) ->
    GenerateOutput``, the same generator with every array laid out on ``plan``.

    In: ``state`` as :func:`dsjax.sharding.param_shardings` (``shard_params`` places it; ``load_hf(plan=...)`` and
    sharded training produce it), ``prompts [B, P]``, ``prompt_lengths [B]`` and ``keys [B]`` split by rows over the
    batch axes (data x fsdp x expert; B a multiple of ``plan.batch_size_divisor``, else a ``ConfigError``). Out: every
    ``GenerateOutput`` array split by rows likewise (:data:`OUTPUT_AXES`). Inside, the latent cache is laid out by
    rows too (:func:`dsjax.model.cache_shardings`), MoE blocks run expert-parallel and the absorbed attention runs
    per device (``shard_map``). Greedy tokens equal :func:`generate_tokens`' on one device; log-probs agree to
    float32 summation order. ``state`` may be abstract (only its structure and ``logical_axes`` are read); the
    jitted function is cached per (plan, graphdef, sampling, pad_id, state layout).
    """
    fn = functools.partial(generate_tokens.__wrapped__, graphdef, cfg=sampling, pad_id=pad_id)
    return sharded_generator("generate_tokens", fn, plan, state, OUTPUT_AXES, (graphdef, sampling, pad_id))


def pad_prompts(prompts: Sequence[Sequence[int]], bucket: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to a common length rounded up to a multiple of ``bucket``: ``(tokens [B, P], lengths)``."""
    if not prompts or any(len(x) == 0 for x in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the BOS id)")
    lengths = np.array([len(x) for x in prompts], np.int32)
    p = int(-(-lengths.max() // bucket) * bucket)
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    for i, x in enumerate(prompts):
        tokens[i, p - len(x):] = np.asarray(x, np.int32)
    return tokens, lengths


def generate(model: Transformer, prompts: Sequence[Sequence[int]], *, key: jax.Array | None = None,
             sampling: SamplingConfig | None = None, seed: int = 0, plan: Plan | None = None) -> GenerateOutput:
    """Generates continuations of token-id prompts (batched, different lengths allowed).

    Args:
      model: a :class:`~dsjax.Transformer`.
      prompts: B lists of token ids.
      key: a PRNG key; each sample gets ``fold_in(key, b)``. Default ``jax.random.key(seed)``.
      sampling: a :class:`SamplingConfig` (default: temperature 1, 64 new tokens).
      plan: a :class:`~dsjax.sharding.Plan` (``make_plan(MeshConfig(...))``) to generate on its mesh
        (:func:`jit_generate`): the model's variables are placed per the rules table (not copied if already so),
        the rows split over the batch axes; B is padded to a multiple of ``plan.batch_size_divisor`` by repeating
        the last prompt (its key too), and the padding rows are dropped from the output. ``None``: one device.
    """
    cfg = sampling or SamplingConfig()
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    tokens, lengths = pad_prompts(prompts, cfg.length_bucket, pad_id)
    key = jax.random.key(seed) if key is None else key
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(len(prompts)))
    graphdef, state = nnx.split(model)
    if plan is None:
        return generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys, cfg=cfg,
                               pad_id=pad_id)
    gen = jit_generate(plan, graphdef, state, sampling=cfg, pad_id=pad_id)
    out = gen(*prepare(plan, model.cfg, state, tokens, lengths, keys))
    b = len(prompts)
    return out if out.tokens.shape[0] == b else jax.tree.map(lambda x: x[:b], out)
