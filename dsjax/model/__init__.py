"""Flax NNX modules of the DeepSeek-V2/V3 family (MLA, DeepSeekMoE, MTP). Imports no training/data/IO code."""

from dsjax.model.cache import (LatentCache, cache_bytes_per_token, cache_shardings, constrain_cache, init_cache,
                               mha_cache_bytes_per_token, padded_cache_length)
from dsjax.model.layers import MLP, Embed, FP8Scale, Linear, RMSNorm, RoutingBias
from dsjax.model.mla import MLA
from dsjax.model.moe import MoE, RoutedExperts, Router, RouterOutput, route
from dsjax.model.rope import apply_rope, rope_cos_sin, rope_frequencies
from dsjax.model.transformer import (DecoderLayer, ModelOutput, MTPModule, Transformer, abstract_model,
                                     make_attention_mask, mtp_draft_step, unstack_layers)

__all__ = [
    "LatentCache", "cache_bytes_per_token", "cache_shardings", "constrain_cache", "init_cache",
    "mha_cache_bytes_per_token", "padded_cache_length", "MLP", "Embed", "FP8Scale",
    "Linear", "RMSNorm", "RoutingBias", "MLA", "MoE", "RoutedExperts", "Router", "RouterOutput", "route",
    "apply_rope", "rope_cos_sin", "rope_frequencies", "DecoderLayer", "ModelOutput", "MTPModule", "Transformer",
    "abstract_model", "make_attention_mask", "mtp_draft_step", "unstack_layers",
]
