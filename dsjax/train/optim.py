"""Optax optimiser: AdamW with warmup + cosine / constant / WSD / linear schedules, clipping, decay mask."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dsjax.train.config import OptimConfig

__all__ = ["make_schedule", "make_optimizer", "decay_mask"]


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (skipped steps do not advance it)."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    end = lr * cfg.min_lr_ratio
    rest = max(total_steps - warm, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    else:  # wsd: stable, then linear decay over the last decay_fraction of all steps
        decay = max(int(round(total_steps * cfg.decay_fraction)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules([optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)],
                                     [stable])
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True for matrices (kernels, expert weights, router weight); False for norms, biases, routing state and,
    unless ``decay_embeddings``, the embedding table."""

    def rule(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        last = names[-1]
        if last == "embedding":
            return decay_embeddings
        if last in ("bias",) or leaf.ndim < 2:
            return False
        if last == "weight" and "gate" not in names:  # RMSNorm scales are 1-D anyway; be explicit
            return False
        return True

    return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm -> adamw(schedule, mask)``; returns the transformation and its schedule."""
    schedule = make_schedule(cfg, total_steps)
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=lambda p: decay_mask(p, cfg.decay_embeddings),
                             mu_dtype=jnp.dtype(cfg.moment_dtype)))
    return optax.chain(*parts), schedule
