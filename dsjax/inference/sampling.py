"""Token sampling: greedy, temperature, top-k and top-p (nucleus) with one PRNG key per sample.

Letters: B batch, V vocabulary.

The returned log-probability of a sampled token is ``log softmax(logits / temperature)`` at that token, before the
top-k / top-p truncation: the probability the policy assigns at that temperature, which is what GRPO's importance
ratios compare against a training forward pass at the same temperature. Greedy decoding (``temperature == 0``)
reports ``log softmax(logits)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["SamplingConfig", "sample_tokens"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to decode. Hashable: it is a static argument of the jitted generator.

    Attributes:
      max_new_tokens: tokens generated per sample (the stop token included).
      temperature: 0 for greedy; otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0: off).
      top_p: keep the smallest set whose probability reaches p (1.0: off).
      stop_ids: extra stop token ids (the model's ``eos_token_id`` is always a stop unless ``use_eos=False``).
      use_eos: stop at the config's EOS id(s).
      length_bucket: prompts are left-padded to a multiple of this, so calls with similar lengths share one compile.
      prefill_chunk: prompt tokens processed per prefill forward (bounds activation memory on long prompts).
      decode_unroll: decode steps per ``while_loop`` iteration; > 1 amortises the loop's per-iteration control
        overhead on GPUs (the stop test runs every ``decode_unroll`` tokens; extra steps are masked).
      unstack_layers: for a model built with ``scan_layers=True``, decode with the layers unrolled on per-layer
        copies of the stacked weights (:func:`dsjax.model.unstack_layers`), made once per call before the decode
        loop. A layer scan inside the loop slices every layer's weights out of the stacks at every step, and XLA
        copies those slices for the matmuls: a copy of all layer weights per decoded token. Costs a second copy
        of the layer weights in memory during the call (matmul weights in the compute dtype, so half the size of
        float32 masters) and a compile that grows with depth; set False when the weights do not fit twice.
      decode_copies: with ``unstack_layers``, also give each MLA module the weights decoding would re-derive on
        every step (``W_UK``/``W_UV``, the two down-projection kernels side by side: :func:`dsjax.model.
        transformer.add_decode_copies`). False is for A/B timing.
      fold_shared_experts: with ``unstack_layers``, where that copies the layer weights anyway (a model built with
        ``scan_layers=True``, or a cast), fold each MoE layer's shared experts into its routed-expert stacks as
        always-chosen experts of weight 1 (:func:`dsjax.model.moe.fold_shared_experts`): one set of expert GEMMs
        per decode step instead of two. Same maths (float32 sums in another order). False is for A/B timing.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    use_eos: bool = True
    length_bucket: int = 64
    prefill_chunk: int = 512
    decode_unroll: int = 1
    unstack_layers: bool = True
    decode_copies: bool = True
    fold_shared_experts: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.length_bucket < 1 or self.prefill_chunk < 1 or self.decode_unroll < 1:
            raise ValueError("length_bucket, prefill_chunk and decode_unroll must be >= 1")
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _truncate(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Sets logits outside the top-k / top-p set to -inf (``logits [B, V]`` already temperature-scaled)."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        # keep a token if the mass strictly before it is < p (the top token is always kept)
        keep = (cum - probs) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _log_probs(logits: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """``logits [..., V]`` -> (reported log-probs ``[..., V]``: log softmax at the temperature, before truncation,
    as :func:`sample_tokens` reports them; the log-probs of the distribution it samples from ``[..., V]``:
    temperature, top-k / top-p, renormalised, -inf outside). For samplers that need the whole distribution
    (speculative sampling's accept test)."""
    if cfg.greedy:
        lp = jax.nn.log_softmax(logits, axis=-1)
        return lp, lp
    scaled = logits / cfg.temperature
    flat = scaled.reshape(-1, scaled.shape[-1])
    trunc = _truncate(flat, cfg.top_k, cfg.top_p).reshape(scaled.shape)
    trunc = jnp.where(trunc <= jnp.finfo(trunc.dtype).min, -jnp.inf, trunc)
    return jax.nn.log_softmax(scaled, axis=-1), jax.nn.log_softmax(trunc, axis=-1)


def sample_tokens(logits: jax.Array, keys: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """``logits [B, V]`` (float32), ``keys [B]`` -> ``(tokens [B] int32, logprobs [B] float32)``."""
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        # argmax of the log-probs, not of the logits: the speculative sampler picks from the same values, so a
        # near-tie that the float32 subtraction of logsumexp merges breaks the same way in both
        logp = jax.nn.log_softmax(logits, axis=-1)
        tokens = jnp.argmax(logp, axis=-1)
    else:
        scaled = logits / cfg.temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        filtered = _truncate(scaled, cfg.top_k, cfg.top_p)
        tokens = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, filtered)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
