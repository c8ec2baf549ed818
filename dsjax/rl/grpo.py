"""GRPO: group-relative advantages, the clipped policy loss with a KL penalty, and the pure jit-compiled update.

Letters: M = prompts x G completions (rows, groups contiguous), T tokens per row (prompt + completion), G group size.

Per token t of completion i (``rho = pi_theta / pi_old``, log-ratios in float32, clamped to +-``logratio_clamp``
before ``exp``)::

    pg_it = max(-A_i * rho_it, -A_i * clip(rho_it, 1 - eps_low, 1 + eps_high))
    kl_it = k1: lp - ref         k2: 0.5 (lp - ref)^2         k3 (default): exp(ref - lp) - (ref - lp) - 1
    l_it  = pg_it + beta * kl_it

Aggregation (denominators over the whole update batch, never per micro-batch or device):
``seq_mean_token_mean`` (DeepSeekMath: mean over rows of each row's token mean), ``token_mean`` (DAPO: sum over
all tokens / number of tokens), ``dr_grpo`` (sum / (rows x max completion length), a constant).

Advantages (:func:`group_advantages`): ``(r - mean_G) / (std_G + eps)`` with the **population** std (``ddof=0``;
with G = 2 and rewards {0, 1} this gives +-1) and ``eps = 1e-4``; ``scale="batch"`` divides by the std of the
whole batch instead, ``"none"`` only centres (Dr. GRPO); ``rloo=True`` uses ``r_i - mean_{j != i} r_j``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsjax.configs import ConfigError
from dsjax.train.losses import token_log_probs
from dsjax.train.optim import make_optimizer
from dsjax.train.config import OptimConfig

__all__ = ["GRPOConfig", "deepseekmath", "r1_zero", "group_advantages", "grpo_token_loss", "GRPOState",
           "make_grpo_step", "sequence_log_probs"]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "dr_grpo")
SCALES = ("group", "batch", "none")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """GRPO hyper-parameters (see the module docstring for the exact loss)."""

    num_generations: int = 8
    beta: float = 0.04
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_estimator: str = "k3"
    adv_scale: str = "group"
    adv_eps: float = 1e-4
    rloo: bool = False
    loss_agg: str = "seq_mean_token_mean"
    mu: int = 1                 # inner updates per rollout (old log-probs computed once per rollout)
    minibatches: int = 1        # optimizer steps per inner update (the rollout batch is split)
    ref_update_every: int | None = None  # refresh the reference to the policy every N steps (R1: 400)
    logratio_clamp: float = 20.0
    temperature: float = 1.0
    max_new_tokens: int = 256
    dynamic_sampling: bool = False       # drop groups whose rewards all agree, refill with new prompts
    mask_truncated: bool = False         # completions without a stop token get no loss
    # roll out with MTP speculative sampling (dsjax.inference.speculative): the same sampling distribution as
    # plain decoding, fewer main-model forwards when the MTP drafts are accepted; needs an MTP module
    speculative_rollouts: bool = False

    def __post_init__(self):
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations}: GRPO compares completions within a group, "
                              f"so it needs >= 2. Fix: use e.g. 8 or 16")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"kl_estimator={self.kl_estimator!r}: unknown. Fix: use one of {KL_ESTIMATORS}")
        if self.loss_agg not in AGGREGATIONS:
            raise ConfigError(f"loss_agg={self.loss_agg!r}: unknown. Fix: use one of {AGGREGATIONS}")
        if self.adv_scale not in SCALES:
            raise ConfigError(f"adv_scale={self.adv_scale!r}: unknown. Fix: use one of {SCALES}")
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ConfigError(f"beta={self.beta}, eps_low={self.eps_low}, eps_high={self.eps_high}: must be >= 0")
        if self.mu < 1 or self.minibatches < 1:
            raise ConfigError(f"mu={self.mu}, minibatches={self.minibatches}: must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature}: GRPO samples, so it must be > 0")


def deepseekmath(**overrides: Any) -> GRPOConfig:
    """DeepSeekMath's GRPO: beta 0.04, eps 0.2, k3 KL, sequence-mean of token means, mu = 1."""
    return GRPOConfig(**{**dict(beta=0.04, eps_low=0.2, eps_high=0.2, kl_estimator="k3", num_generations=64,
                                loss_agg="seq_mean_token_mean"), **overrides})


def r1_zero(**overrides: Any) -> GRPOConfig:
    """DeepSeek-R1-Zero's settings: beta 0.001, G = 16, temperature 1, reference refreshed every 400 steps."""
    return GRPOConfig(**{**dict(beta=0.001, num_generations=16, eps_low=0.2, eps_high=0.2, temperature=1.0,
                                ref_update_every=400, kl_estimator="k3"), **overrides})


def group_advantages(rewards: jax.Array, group_size: int, *, scale: str = "group", eps: float = 1e-4,
                     rloo: bool = False) -> jax.Array:
    """``rewards [M]`` (groups of ``group_size`` contiguous rows) -> advantages ``[M]`` (float32)."""
    r = rewards.astype(jnp.float32).reshape(-1, group_size)
    g = group_size
    if rloo:
        adv = r - (r.sum(1, keepdims=True) - r) / (g - 1)
    else:
        adv = r - r.mean(1, keepdims=True)
    if scale == "group":
        adv = adv / (r.std(1, keepdims=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    return adv.reshape(-1)


def grpo_token_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, adv: jax.Array,
                    cfg: GRPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss ``[M, T]`` and per-token diagnostics. ``adv [M]`` broadcast over tokens."""
    lr = jnp.clip(logp - old_logp, -cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = jnp.exp(lr)
    a = adv[:, None]
    unclipped = -a * ratio
    clipped = -a * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = jnp.maximum(unclipped, clipped)
    diag = {"ratio": ratio, "clip_low": (ratio < 1.0 - cfg.eps_low) & (a < 0),
            "clip_high": (ratio > 1.0 + cfg.eps_high) & (a > 0), "pg": pg}
    loss = pg
    if ref_logp is not None and cfg.beta > 0:
        d = jnp.clip(ref_logp - logp, -cfg.logratio_clamp, cfg.logratio_clamp)  # log(ref / pi)
        if cfg.kl_estimator == "k1":
            kl = -d
        elif cfg.kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = jnp.exp(d) - d - 1.0
        diag["kl"] = kl
        loss = loss + cfg.beta * kl
    return loss, diag


def _aggregate(x: jax.Array, mask: jax.Array, cfg: GRPOConfig, n_rows: jax.Array, n_tokens: jax.Array,
               max_len: int) -> jax.Array:
    """Aggregates per-token values with the configured rule over a whole update batch (``n_rows``, ``n_tokens``
    are that batch's totals, so micro-batches sum to the same value)."""
    xm = jnp.where(mask, x, 0.0)
    if cfg.loss_agg == "token_mean":
        return xm.sum() / jnp.maximum(n_tokens, 1.0)
    if cfg.loss_agg == "dr_grpo":
        return xm.sum() / (n_rows * max_len)
    per_row = xm.sum(1) / jnp.maximum(mask.sum(1), 1)
    return per_row.sum() / jnp.maximum(n_rows, 1.0)


def sequence_log_probs(model, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                       temperature: float, chunk_tokens: int = 4096, *, with_entropy: bool = False
                       ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``log p(tokens[t+1] | tokens[<=t])`` at the sampling temperature, ``[M, T]`` (last column is 0); with
    ``with_entropy`` also the entropy of each next-token distribution ``[M, T]`` (no gradient)."""
    out = model(tokens, segment_ids, positions, compute_logits=False, return_hidden=True)
    targets = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
    res = token_log_probs(out.hidden, model.logits_f32, targets, temperature, chunk_tokens, with_entropy=with_entropy)
    if with_entropy:
        return res[0].at[:, -1].set(0.0), res[1]
    return res.at[:, -1].set(0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GRPOState:
    """Policy params, optimizer state, non-trainable variables, the frozen reference params and the step."""

    step: jax.Array
    params: Any
    opt_state: Any
    rest: Any
    ref_params: Any


def make_grpo_step(cfg: GRPOConfig, optim: OptimConfig, total_steps: int, graphdef: Any, params_template: Any,
                   rest_template: Any) -> tuple[Callable, Callable, Callable]:
    """Returns ``(init, log_probs, update)``, pure functions to jit:

    * ``init(params, rest) -> GRPOState`` (reference = a copy of the policy);
    * ``log_probs(params, rest, batch) -> [M, T]`` (old-policy or reference log-probs, once per rollout);
    * ``update(state, batch) -> (state, metrics)``: one optimizer step on ``batch`` =
      ``{"tokens", "segment_ids", "positions", "completion_mask", "advantages", "old_logp", "ref_logp"}``
      (``old_logp`` may be left out when the batch gets one update: the current policy is then the old one);
      ``completion_mask[m, t] = 1`` when ``tokens[m, t + 1]`` is a completion token that gets loss.
    """
    tx, schedule = make_optimizer(optim, total_steps)

    def merge(params, rest):
        p = nnx.State(params_template)
        nnx.replace_by_pure_dict(p, params)
        r = nnx.State(rest_template)
        nnx.replace_by_pure_dict(r, rest)
        return nnx.merge(graphdef, p, r)

    def init(params, rest) -> GRPOState:
        return GRPOState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rest=rest,
                         ref_params=jax.tree.map(jnp.copy, params))

    def log_probs(params, rest, batch):
        return sequence_log_probs(merge(params, rest), batch["tokens"], batch["segment_ids"], batch["positions"],
                                  cfg.temperature)

    def loss_fn(params, rest, batch):
        model = merge(params, rest)
        logp, entropy = sequence_log_probs(model, batch["tokens"], batch["segment_ids"], batch["positions"],
                                           cfg.temperature, with_entropy=True)
        mask = batch["completion_mask"].astype(bool)
        ref = batch["ref_logp"] if cfg.beta > 0 else None
        # without "old_logp" (one update per rollout: mu = 1, one minibatch) the old policy IS the current one:
        # stop_gradient(logp) gives ratio 1 and the same gradient, without a separate forward pass
        old = batch.get("old_logp")
        old = jax.lax.stop_gradient(logp) if old is None else old
        tok_loss, diag = grpo_token_loss(logp, old, ref, batch["advantages"], cfg)
        n_rows = jnp.sum(mask.any(1)).astype(jnp.float32)
        n_tok = jnp.sum(mask).astype(jnp.float32)
        max_len = cfg.max_new_tokens
        agg = lambda x: _aggregate(x, mask, cfg, n_rows, n_tok, max_len)
        loss = agg(tok_loss)
        tm = lambda x: jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(n_tok, 1.0)
        metrics = {"policy_loss": agg(diag["pg"]), "ratio_mean": tm(diag["ratio"]),
                   "ratio_max": jnp.max(jnp.where(mask, diag["ratio"], -jnp.inf)),
                   "ratio_min": jnp.min(jnp.where(mask, diag["ratio"], jnp.inf)),
                   "clip_frac_low": tm(diag["clip_low"].astype(jnp.float32)),
                   "clip_frac_high": tm(diag["clip_high"].astype(jnp.float32)),
                   "entropy": tm(entropy), "train_tokens": n_tok}
        if "kl" in diag:
            metrics["kl"] = tm(diag["kl"])
            metrics["kl_loss"] = cfg.beta * agg(diag["kl"])
        return loss, metrics

    def update(state: GRPOState, batch) -> tuple[GRPOState, dict[str, jax.Array]]:
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.rest, batch)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(ops):
            params, opt_state, grads = ops
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        params, opt_state = jax.lax.cond(ok, apply, lambda ops: (ops[0], ops[1]),
                                         (state.params, state.opt_state, grads))
        step = state.step + 1
        ref = state.ref_params
        if cfg.ref_update_every:
            refresh = (step % cfg.ref_update_every) == 0
            ref = jax.tree.map(lambda p, r: jnp.where(refresh, p, r), params, ref)
        new = GRPOState(step=step, params=params, opt_state=opt_state, rest=state.rest, ref_params=ref)
        metrics.update(loss=loss, grad_norm=grad_norm, lr=schedule(state.step), skipped=(~ok).astype(jnp.int32))
        return new, metrics

    return init, log_probs, update


def completion_arrays(prompt_tokens: np.ndarray, prompt_lengths: np.ndarray, completions: np.ndarray,
                      completion_lengths: np.ndarray, truncated_mask: np.ndarray | None = None
                      ) -> dict[str, np.ndarray]:
    """Builds a GRPO batch layout from left-padded prompts ``[M, P]`` and right-padded completions ``[M, N]``.

    Returns ``tokens, segment_ids, positions, completion_mask`` of shape ``[M, P + N]``; ``completion_mask[m, t]``
    marks positions whose NEXT token is one of the first ``completion_lengths[m]`` completion tokens (0 for rows in
    ``truncated_mask``).
    """
    m, p = prompt_tokens.shape
    n = completions.shape[1]
    tokens = np.concatenate([prompt_tokens, completions], axis=1).astype(np.int32)
    idx = np.arange(p + n)[None]
    start = (p - prompt_lengths)[:, None]
    end = p + completion_lengths[:, None]
    seg = ((idx >= start) & (idx < end)).astype(np.int32)
    pos = np.maximum(idx - start, 0).astype(np.int32)
    nxt = idx + 1
    cmask = ((nxt >= p) & (nxt < end)).astype(np.int32)
    if truncated_mask is not None:
        cmask = cmask * (~truncated_mask[:, None]).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "completion_mask": cmask}
