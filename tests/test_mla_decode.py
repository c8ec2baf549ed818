"""Absorbed-MLA decode attention (pallas_kernels.mla_decode): the XLA reference and the Pallas Triton kernel (run in
the interpreter on the CPU) against a float64 oracle, split and unsplit; the model's decode through the kernel; its
CUDA run; its errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import mla_decode_attention
from pallas_kernels.mla_decode import _pallas, default_tiling, kernel_shapes_ok

# bf16 inputs, exact float64 oracle: the output's bf16 rounding (2^-8 relative) and the probabilities' bf16 rounding
# before the value product bound the error. Measured: up to 1.1e-2 for the XLA reference (it rounds the normalised
# probabilities), ~2e-3 for the kernel (it rounds the unnormalised ones and divides in float32)
BF16_TOL = 2e-2


def _case(b, s, n, r, p, t, seed=0, left_pad=3):
    """Random bf16 queries and cache; a decode-style mask: each row's real keys start after ``left_pad`` slots of
    padding and end at its own (random) last slot, query j of the row seeing one slot more than query j - 1."""
    ks = jax.random.split(jax.random.key(seed), 5)
    ql = jax.random.normal(ks[0], (b, s, n, r), jnp.bfloat16)
    qr = jax.random.normal(ks[1], (b, s, n, p), jnp.bfloat16)
    ckv = jax.random.normal(ks[2], (b, t, r), jnp.bfloat16)
    kr = jax.random.normal(ks[3], (b, t, p), jnp.bfloat16)
    last = jax.random.randint(ks[4], (b, 1, 1), left_pad, t - s + 1)
    slot = jnp.arange(t)[None, None, :]
    mask = (slot <= last + jnp.arange(s)[None, :, None]) & (slot >= left_pad)
    return ql, qr, ckv, kr, mask


def _oracle(ql, qr, ckv, kr, mask, scale):
    ql, qr, ckv, kr = (np.asarray(a.astype(jnp.float32), np.float64) for a in (ql, qr, ckv, kr))
    sc = (np.einsum("bsnr,btr->bsnt", ql, ckv) + np.einsum("bsnp,btp->bsnt", qr, kr)) * scale
    sc = np.where(np.asarray(mask)[:, :, None], sc, -np.inf)
    w = np.exp(sc - sc.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bsnt,btr->bsnr", w, ckv)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (b, s, n, r, p, t, tiling): decode steps, a speculative verification (s = 4), heads not a power of two (padded),
# and explicit splits of the cache (flash-decoding: partial softmaxes merged after), with tiles of 16 to 64 slots
CASES = [(2, 1, 16, 64, 16, 64, {}), (3, 4, 16, 32, 32, 128, {}), (1, 3, 20, 32, 16, 128, dict(bt=16, splits=4)),
         (2, 2, 4, 32, 16, 256, dict(bt=32, splits=2)), (1, 1, 16, 256, 32, 1024, {})]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("b,s,n,r,p,t,tiling", CASES)
def test_mla_decode_attention_matches_float64(impl, b, s, n, r, p, t, tiling):
    args = _case(b, s, n, r, p, t)
    if impl == "pallas":
        fn = functools.partial(_pallas, scale=0.125, interpret=True, **tiling)
    else:
        fn = functools.partial(mla_decode_attention, scale=0.125, implementation="xla")
    out = jax.jit(fn)(*args)
    assert out.shape == (b, s, n, r) and out.dtype == jnp.bfloat16
    assert _rel(out, _oracle(*args, 0.125)) < BF16_TOL


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_stacked_cache_is_read_at_its_layer(impl):
    """``layer=``: a stacked ``[L, B, T, .]`` cache attended at one layer (a Python int, or a traced scalar as a layer
    scan passes it) gives, bitwise, what that layer's own ``[B, T, .]`` cache gives: the kernel indexes the stack in
    place instead of taking a sliced copy."""
    ql, qr, _, _, mask = _case(2, 1, 16, 64, 16, 128)
    ckv = jax.random.normal(jax.random.key(7), (3, 2, 128, 64), jnp.bfloat16)
    kr = jax.random.normal(jax.random.key(8), (3, 2, 128, 16), jnp.bfloat16)
    kw = dict(scale=0.125, implementation=impl, interpret=impl == "pallas")
    for layer in (0, 2):
        want = mla_decode_attention(ql, qr, ckv[layer], kr[layer], mask, **kw)
        np.testing.assert_array_equal(mla_decode_attention(ql, qr, ckv, kr, mask, layer=layer, **kw), want)
        traced = jax.jit(lambda i: mla_decode_attention(ql, qr, ckv, kr, mask, layer=i, **kw))(jnp.int32(layer))
        np.testing.assert_array_equal(traced, want)
    with pytest.raises(ValueError, match="stacked caches"):
        mla_decode_attention(ql, qr, ckv[0], kr[0], mask, layer=0, **kw)


def test_default_tiling_fills_the_gpu():
    assert default_tiling(1, 1, 128, 512, 4096) == (32, 64, 16)     # 4 head blocks x 16 splits of 4 tiles
    assert default_tiling(1, 1, 16, 256, 256) == (16, 64, 4)        # batch 1: 4 one-tile splits, merged after
    assert default_tiling(32, 1, 16, 256, 256) == (16, 64, 4)
    assert default_tiling(32, 4, 16, 256, 320) == (16, 64, 1)       # 128 programs already: no merge
    assert default_tiling(32, 1, 128, 512, 4096) == (32, 64, 2)
    b, s, n, r, t = 1, 1, 16, 256, 1088                             # 17 tiles: the splits divide them
    assert (t // 64) % default_tiling(b, s, n, r, t)[2] == 0


def test_model_decodes_through_the_kernel(monkeypatch):
    """A tiny model's generation with the absorbed attention routed through the (interpreted) kernel gives the
    tokens and, to float32 summation order, the log-probs of the XLA path; the MTP-verified speculative decode too."""
    import dsjax
    from dsjax.inference import SamplingConfig
    from dsjax.model import mla as mla_mod

    cfg = dsjax.configs.tiny(qk_rope_head_dim=16, kv_lora_rank=32, mla_decode_impl="xla")
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    sc = SamplingConfig(max_new_tokens=6, temperature=0.0, use_eos=False, length_bucket=8)
    ref = dsjax.generate(dsjax.Transformer(cfg, rngs=nnx.Rngs(0)), prompts, sampling=sc)
    # the same weights under another config value: the jitted generators trace again (into the patched call)
    model = dsjax.Transformer(cfg.replace(mla_decode_impl="pallas"), rngs=nnx.Rngs(0))
    calls = []

    def through_kernel(q_lat, q_rot, c_kv, k_rot, mask, *, scale, implementation, layer=None):
        assert layer is not None and c_kv.ndim == 4          # decoding hands the kernel the stacked cache
        assert kernel_shapes_ok(q_lat.shape, q_rot.shape, c_kv.shape[1:])
        calls.append(q_lat.shape)
        return _pallas(q_lat, q_rot, c_kv, k_rot, mask, scale=scale, interpret=True, layer=layer)

    monkeypatch.setattr(mla_mod, "mla_decode_attention", through_kernel)
    got = dsjax.generate(model, prompts, sampling=sc)
    assert calls, "the decode steps did not reach the kernel"
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
    from dsjax.inference import speculative_generate

    spec = speculative_generate(model, prompts, sampling=sc, draft_tokens=2)
    assert spec.output.to_lists() == ref.to_lists()
    assert any(shape[1] == 3 for shape in calls)                # verifications: k + 1 = 3 queries per row


def test_mla_decode_kernel_lowers_for_cuda():
    """Without a GPU: the Pallas Triton lowering at `small`'s decode shapes (batch 32, split and unsplit; a
    verification of 4 tokens) and V3's (128 heads, R = 512, 16 splits of a 4k cache)."""
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    for b, s, n, r, p, t, splits in [(32, 1, 16, 256, 32, 256, 4), (32, 1, 16, 256, 32, 256, 1),
                                     (32, 4, 16, 256, 32, 320, 1), (1, 1, 128, 512, 64, 4096, 16)]:
        bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
        args = [bf(b, s, n, r), bf(b, s, n, p), bf(b, t, r), bf(b, t, p), jax.ShapeDtypeStruct((b, s, t), jnp.bool_)]
        fn = functools.partial(_pallas, scale=0.1, interpret=False, splits=splits)
        stacked = functools.partial(_pallas, scale=0.1, interpret=False, splits=splits, layer=jnp.int32(5))
        stacked_args = [*args[:2], bf(12, b, t, r), bf(12, b, t, p), args[4]]      # a 12-layer cache, layer 5
        with jax.sharding.use_abstract_mesh(mesh):
            for f, a in ((fn, args), (stacked, stacked_args)):
                text = jax.jit(f).trace(*a).lower(lowering_platforms=("cuda",)).as_text()
                assert "xla.gpu.triton" in text


def test_mla_decode_attention_errors():
    ql, qr, ckv, kr, mask = _case(1, 1, 16, 64, 16, 64)
    with pytest.raises(ValueError, match="mask has shape"):
        mla_decode_attention(ql, qr, ckv, kr, mask[:, :, :32], scale=1.0)
    with pytest.raises(ValueError, match="powers of two"):
        mla_decode_attention(ql[..., :48], qr, ckv[..., :48], kr, mask, scale=1.0, implementation="pallas",
                             interpret=True)
    with pytest.raises(ValueError, match="interpret=True"):
        mla_decode_attention(ql, qr, ckv, kr, mask, scale=1.0, implementation="pallas")
    with pytest.raises(ValueError, match="implementation"):
        mla_decode_attention(ql, qr, ckv, kr, mask, scale=1.0, implementation="triton")
    out = mla_decode_attention(ql, qr, ckv, kr, mask, scale=1.0)         # "auto" on the CPU: the XLA reference
    np.testing.assert_array_equal(out, mla_decode_attention(ql, qr, ckv, kr, mask, scale=1.0, implementation="xla"))


@pytest.mark.gpu
def test_mla_decode_kernel_on_gpu():
    """The compiled Triton kernel on the GPU at `small`'s decode shapes (batch 32 and 1, a verification of 4 tokens)
    and DeepSeek-V3's (128 heads, R = 512, P = 64, a 4k cache split 16 ways) against the float64 oracle."""
    for b, s, n, r, p, t in [(32, 1, 16, 256, 32, 256), (1, 1, 16, 256, 32, 256), (32, 4, 16, 256, 32, 320),
                             (2, 1, 128, 512, 64, 4096)]:
        args = _case(b, s, n, r, p, t)
        out = jax.jit(functools.partial(mla_decode_attention, scale=0.125, implementation="pallas"))(*args)
        assert _rel(out, _oracle(*args, 0.125)) < BF16_TOL, (b, s, n, r, p, t)
        stack = lambda a: jnp.stack([jnp.zeros_like(a), a, -a])  # noqa: E731 - layer 1 of 3 holds the cache
        at_layer = jax.jit(functools.partial(mla_decode_attention, scale=0.125, implementation="pallas"))(
            *args[:2], stack(args[2]), stack(args[3]), args[4], layer=jnp.int32(1))
        np.testing.assert_array_equal(at_layer, out)
