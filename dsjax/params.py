"""Parameter accounting without allocation: :func:`count_params` and :func:`param_table`.

Counting convention (it reproduces DeepSeek's published figures):

* ``total``: every trainable parameter of the main model (embedding, all layers, final norm, output head).
  MTP modules are reported separately (``mtp``; their embedding and head are shared with the main model), and
  ``total_with_mtp`` adds them. The V3 routing bias is non-trainable state and is not counted.
* ``active``: parameters touched per token: ``total`` minus the input embedding (a lookup, not a matmul) minus the
  routed experts a token does not use (``(1 - K/E)`` of them). The output head is counted. With this rule V3 gives
  36.63B (published "37B"), V2 20.85B ("21B") and V2-Lite 2.45B ("2.4B"); counting the input embedding as well
  would overshoot every published figure (37.55B, 21.38B, 2.66B). Totals: 671.03B, 235.74B, 15.71B.
* V3's MTP module adds 11.61B of its own (13.47B if its duplicated copies of the embedding and head are counted,
  the "14B" of the release notes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax.configs import ModelConfig

__all__ = ["count_params", "param_table", "format_param_table", "decode_bytes_per_step"]


def _abstract_state(cfg: ModelConfig):
    from dsjax.model.transformer import abstract_model

    return nnx.state(abstract_model(cfg), nnx.Param)


def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def _leaves(cfg_or_state) -> list[tuple[str, tuple[int, ...], Any]]:
    state = _abstract_state(cfg_or_state) if isinstance(cfg_or_state, ModelConfig) else cfg_or_state
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        out.append((_path_str(path), tuple(leaf.shape), leaf.dtype))
    return out


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of ``cfg`` computed with ``nnx.eval_shape`` (nothing is allocated).

    Returns a dict with ``total``, ``active`` (see the module docstring), ``embedding``, ``lm_head``,
    ``routed_experts``, ``mtp``, ``total_with_mtp``, ``active_with_mtp``.
    """
    counts = {"total": 0, "embedding": 0, "lm_head": 0, "routed_experts": 0, "mtp": 0, "mtp_routed_experts": 0}
    for path, shape, _ in _leaves(cfg):
        n = math.prod(shape)
        if path.startswith("mtp."):
            counts["mtp"] += n
            if ".experts." in path:
                counts["mtp_routed_experts"] += n
            continue
        counts["total"] += n
        if path.startswith("embed_tokens."):
            counts["embedding"] += n
        elif path.startswith("lm_head."):
            counts["lm_head"] += n
        elif ".mlp.experts." in path:
            counts["routed_experts"] += n
    frac_unused = 1.0 - cfg.num_experts_per_tok / cfg.n_routed_experts
    counts["active"] = int(round(counts["total"] - counts["embedding"] - counts["routed_experts"] * frac_unused))
    counts["total_with_mtp"] = counts["total"] + counts["mtp"]
    counts["active_with_mtp"] = int(round(counts["active"] + counts["mtp"]
                                          - counts["mtp_routed_experts"] * frac_unused))
    return counts


def _category(path: str) -> str:
    if path.startswith("mtp."):
        return "mtp modules (own layer + projections)"
    if path.startswith("embed_tokens."):
        return "embedding"
    if path.startswith("lm_head."):
        return "output head"
    if path.startswith("norm."):
        return "final norm"
    dense = path.startswith("dense_layers.")
    if path.startswith("layers."):
        # unscanned: decide from the module path
        dense = ".mlp.experts." not in path and ".mlp.gate." not in path and ".mlp.shared_experts." not in path \
            and ".mlp." in path
    if ".self_attn." in path:
        return "attention (MLA)"
    if ".mlp.experts." in path:
        return "routed experts"
    if ".mlp.shared_experts." in path:
        return "shared experts"
    if ".mlp.gate." in path:
        return "routers"
    if ".mlp." in path and dense:
        return "dense FFN (first-k layers)"
    return "layer norms"


_ORDER = ("embedding", "attention (MLA)", "dense FFN (first-k layers)", "routers", "routed experts", "shared experts",
          "layer norms", "final norm", "output head", "mtp modules (own layer + projections)")


def param_table(cfg: ModelConfig) -> "OrderedDict[str, int]":
    """Parameter counts per component (embedding, MLA, dense FFN, routed/shared experts, routers, norms, head, MTP)."""
    sums: dict[str, int] = {}
    for path, shape, _ in _leaves(cfg):
        cat = _category(path)
        sums[cat] = sums.get(cat, 0) + math.prod(shape)
    return OrderedDict((k, sums[k]) for k in _ORDER if k in sums)


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_param_table(cfg: ModelConfig) -> str:
    """A printable table of :func:`param_table` plus the :func:`count_params` summary."""
    table = param_table(cfg)
    counts = count_params(cfg)
    width = max(len(k) for k in table) + 2
    lines = [f"{'component':<{width}}{'params':>16}{'':>10}", "-" * (width + 26)]
    for k, v in table.items():
        lines.append(f"{k:<{width}}{v:>16,}{_human(v):>10}")
    lines.append("-" * (width + 26))
    for k in ("total", "active", "mtp", "total_with_mtp"):
        lines.append(f"{k:<{width}}{counts[k]:>16,}{_human(counts[k]):>10}")
    return "\n".join(lines)


FP8_STORED = ("attention (MLA)", "dense FFN (first-k layers)", "shared experts", "routed experts")


def decode_bytes_per_step(cfg: ModelConfig, batch: int, context: float, *, weight_bytes: float | None = None,
                          cache_bytes: float = 2.0, fp8_weights: bool = False) -> "OrderedDict[str, float]":
    """Bytes one decode step of the main model must read from device memory at the least (the bandwidth roofline).

    One step decodes one token for each of ``batch`` sequences holding ``context`` cached tokens on average. Every
    weight the step touches is read once (perfect reuse across the batch); routed experts are touched if at least
    one of the ``batch`` tokens picks them, ``E * (1 - (1 - K/E)^B)`` expected per MoE layer under balanced,
    independent routing (a batch of 1 reads exactly ``K``); the embedding costs one row per token; the latent cache
    is read whole (``context * cache_bytes_per_token``). Activations and writes are ignored (KBs at decode sizes).
    MTP modules are not counted (plain decoding).

    ``weight_bytes``: bytes per weight element (default: ``cfg.param_dtype``'s size). ``fp8_weights``: the weights
    DeepSeek-V3's checkpoints store in FP8 (``FP8_STORED``: MLA and MLP projections, shared and routed experts; the
    layout of ``load_hf(keep_fp8=True)``) count 1 byte plus ``4 / 128**2`` for their 128x128 block scales, the
    rest (embedding, output head, routers, norms) ``weight_bytes``. Returns the components and ``"total"``; divide
    a measured memory bandwidth by ``total / batch`` for the roofline's tokens per second.
    """
    if batch < 1:
        raise ValueError(f"decode_bytes_per_step: batch={batch} must be >= 1")
    if context < 0:
        raise ValueError(f"decode_bytes_per_step: context={context} must be >= 0")
    wb = float(jnp.dtype(cfg.param_dtype).itemsize if weight_bytes is None else weight_bytes)
    table = param_table(cfg)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1.0 - (1.0 - k / e) ** batch if e else 0.0
    out: OrderedDict[str, float] = OrderedDict()
    fb = 1.0 + 4.0 / 128**2 if fp8_weights else wb
    out["embedding rows"] = batch * cfg.hidden_size * wb
    for name in ("attention (MLA)", "dense FFN (first-k layers)", "routers", "shared experts", "layer norms",
                 "final norm"):
        out[name] = table.get(name, 0) * (fb if name in FP8_STORED else wb)
    # a tied head multiplies by the embedding matrix
    out["output head"] = table.get("output head", table["embedding"] if cfg.tie_word_embeddings else 0) * wb
    out["routed experts"] = table.get("routed experts", 0) * touched * fb
    out["latent cache"] = batch * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        * cache_bytes
    out["total"] = sum(out.values())
    return out
