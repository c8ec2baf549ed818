"""A test-only stand-in for jax's cuDNN attention entry point, for CPU tests of the cuDNN code paths (shared by
test_model.py and test_parallel.py)."""

import jax
import jax.numpy as jnp


def reference_cudnn(calls):
    """A test-only stand-in for jax's cuDNN attention entry point on the CPU, written from its documented semantics:
    documents from ``q_offsets``/``q_seqlen`` (packed layout, causal within each), else the ``mask`` and causal
    flag. Records at run time which form was called."""
    import jax._src.cudnn.fused_attention_stablehlo as fa

    def attention(query, key, value, bias=None, mask=None, q_seqlen=None, kv_seqlen=None, q_offsets=None,
                  kv_offsets=None, *, scale=1.0, mask_type=fa.MaskType.NO_MASK, qkv_layout="BTNH", **_):
        s, t = query.shape[1], key.shape[1]
        causal = jnp.arange(t)[None, :] <= jnp.arange(s)[:, None]
        if q_offsets is not None:
            assert q_offsets.shape[1] == q_seqlen.shape[1] + 1 and mask is None and qkv_layout == "BTNH"
            starts, lens = q_offsets[:, :-1, None], q_seqlen[:, :, None]
            i = jnp.arange(s)[None, None, :]
            inside = (starts >= 0) & (i >= starts) & (i < starts + lens)                 # [B, M, S]
            doc = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)
            allowed = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & causal
            jax.debug.callback(lambda: calls.append("packed"))
        else:
            allowed = jnp.broadcast_to(mask[:, 0] if mask is not None else True, (query.shape[0], s, t))
            if mask_type == fa.MaskType.CAUSAL:
                allowed = allowed & causal
            jax.debug.callback(lambda: calls.append("dense"))
        scores = jnp.einsum("bsnh,btnh->bnst", query, key, preferred_element_type=jnp.float32) * scale
        p = jax.nn.softmax(jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bnst,btnv->bsnv", p, value.astype(jnp.float32)).astype(value.dtype)

    return attention
