"""The latent KV cache of MLA: an explicit pytree passed into and out of the model.

Letters: L layers, B batch, T cache length, R kv_lora_rank, P qk_rope_head_dim.

Per token and layer the cache holds only ``c_kv`` (R values, post-norm) and the shared rope key ``k_rot``
(P values, post-RoPE): 512 + 64 = 576 values for DeepSeek-V3, i.e. 70,272 bytes per token over 61 layers in BF16,
against 128 heads x (192 + 128) = 40,960 values per layer for an expanded MHA cache of the same model
(:func:`cache_bytes_per_token`, :func:`mha_cache_bytes_per_token`).

On a device mesh every array of the cache has logical axis names (:meth:`LatentCache.logical_axes`): ``c_kv``
``(cache_layers, batch, cache_seq, cache_kv_lora)``, ``k_rot`` ``(cache_layers, batch, cache_seq, cache_rope)``,
``segment_ids`` ``(batch, cache_seq)``. The rules table (:mod:`dsjax.sharding`) splits ``batch`` over the batch
axes (data x fsdp x expert) and leaves the ``cache_*`` axes whole, so each device holds the cache of its own rows;
:func:`cache_shardings` gives the ``NamedSharding`` of each array for a plan, :func:`constrain_cache` pins a cache
to them inside a jitted function (the identity without an active plan).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsjax.configs import ModelConfig
from dsjax.sharding import Plan, constrain, tree_shardings

__all__ = ["LatentCache", "init_cache", "cache_bytes_per_token", "mha_cache_bytes_per_token", "write_rows",
           "padded_cache_length", "CACHE_SLOT_MULTIPLE", "cache_shardings", "constrain_cache"]

# Generators allocate caches in multiples of this many slots: the fused decode-attention kernel streams the cache
# in tiles of up to 64 slots (pallas_kernels.mla_decode); slots past the last written one stay empty (segment 0)
# and masked.
CACHE_SLOT_MULTIPLE = 64


def padded_cache_length(slots: int) -> int:
    """``slots`` rounded up to a multiple of :data:`CACHE_SLOT_MULTIPLE`."""
    return -(-slots // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE


def write_rows(buf: jax.Array, new: jax.Array, index: jax.Array | int) -> jax.Array:
    """Writes ``new [B, S, ...]`` into ``buf [B, T, ...]`` at slot ``index`` (a scalar, or one slot per row ``[B]``)."""
    index = jnp.asarray(index, jnp.int32)
    new = new.astype(buf.dtype)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, index, axis=1)
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, axis=0))(buf, new, index)


def write_layer_rows(buf: jax.Array, new: jax.Array, layer: jax.Array | int, index: jax.Array | int) -> jax.Array:
    """Writes ``new [B, S, ...]`` into layer ``layer`` of a stacked cache ``buf [L, B, T, ...]`` at slot ``index``
    (a scalar, or one slot per row ``[B]``), touching only the new rows (the stacked buffer is updated in place
    under ``jit`` when it is a loop carry or donated)."""
    index = jnp.asarray(index, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    new = new.astype(buf.dtype)
    zeros = (0,) * (buf.ndim - 3)
    if index.ndim == 0:
        return jax.lax.dynamic_update_slice(buf, new[None], (layer, jnp.int32(0), index, *zeros))
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n[None], (layer, i, *zeros)),
                    in_axes=(1, 0, 0), out_axes=1)(buf, new, index)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Attributes:
      c_kv: ``[L, B, T, R]`` normalised latents.
      k_rot: ``[L, B, T, P]`` rotated rope keys.
      segment_ids: ``[B, T]`` int32 document id of each cached token; 0 marks an empty slot or padding.
    """

    c_kv: jax.Array
    k_rot: jax.Array
    segment_ids: jax.Array

    @property
    def max_length(self) -> int:
        return self.c_kv.shape[2]

    @staticmethod
    def logical_axes() -> "LatentCache":
        """A ``LatentCache`` whose fields are the logical axis names of each array (see the module docstring)."""
        return LatentCache(c_kv=("cache_layers", "batch", "cache_seq", "cache_kv_lora"),
                           k_rot=("cache_layers", "batch", "cache_seq", "cache_rope"),
                           segment_ids=("batch", "cache_seq"))


def cache_shardings(plan: Plan) -> LatentCache:
    """A ``LatentCache`` of ``NamedSharding``: each array of a cache laid out on ``plan`` (rows over the batch axes)."""
    return tree_shardings(plan, LatentCache.logical_axes())


def constrain_cache(cache: LatentCache) -> LatentCache:
    """``cache`` with its arrays constrained to their logical axes under the active plan; the identity without one."""
    axes = LatentCache.logical_axes()
    return LatentCache(c_kv=constrain(cache.c_kv, axes.c_kv), k_rot=constrain(cache.k_rot, axes.k_rot),
                       segment_ids=constrain(cache.segment_ids, axes.segment_ids))


def init_cache(cfg: ModelConfig, batch_size: int, max_length: int, dtype=None) -> LatentCache:
    """An empty cache for ``cfg.num_hidden_layers`` layers (the MTP modules keep no cache here)."""
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    n = cfg.num_hidden_layers
    return LatentCache(
        c_kv=jnp.zeros((n, batch_size, max_length, cfg.kv_lora_rank), dtype),
        k_rot=jnp.zeros((n, batch_size, max_length, cfg.qk_rope_head_dim), dtype),
        segment_ids=jnp.zeros((batch_size, max_length), jnp.int32),
    )


def cache_bytes_per_token(cfg: ModelConfig, dtype="bfloat16") -> int:
    """Bytes of latent cache per token over all layers: ``L * (R + P) * itemsize`` (70,272 for V3 in BF16)."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * jnp.dtype(dtype).itemsize


def mha_cache_bytes_per_token(cfg: ModelConfig, dtype="bfloat16", num_kv_heads: int | None = None) -> int:
    """Bytes per token of an expanded K/V cache for the same model (what HF 4.x cached): keys of ``C+P`` and values
    of ``V`` per head. ``num_kv_heads`` < heads gives the GQA equivalent."""
    heads = cfg.num_attention_heads if num_kv_heads is None else num_kv_heads
    per_layer = heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * jnp.dtype(dtype).itemsize
