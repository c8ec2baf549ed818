"""Expert selection (pallas_kernels.moe_topk): the Pallas Triton kernel (in the interpreter on the CPU) gives the XLA
reference's indices exactly, ties included; the model routes and trains through it, alone and under a plan; its
CUDA lowering and GPU run; its errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from pallas_kernels import moe_topk, moe_topk_weights
from pallas_kernels.moe_topk import (_pallas, default_block_rows, kernel_shapes_ok, moe_topk_reference,
                                     moe_topk_weights_reference)


def _choice(t, e, seed, ties, signed=True):
    """Random selection scores (``signed``: some negative, as V3's sigmoid scores plus bias can be; V2's softmax
    scores are positive); ``ties``: values rounded to quarters, so equal scores (within and across groups, and
    equal group scores) are common and the lower-index rule decides."""
    x = jax.random.uniform(jax.random.key(seed), (t, e), jnp.float32)
    return jnp.round(x * 4) / 4 if ties else x - 0.5 * signed


# (T, E, n_group, topk_group, K, group score): small's router, V3's (256 in 8, keep 4, top 8), V2-Lite's plain top-6,
# a V2-style max-score grouping where K exceeds the kept groups' experts (the 0-filled ones are picked by index),
# T not a multiple of any block; padded to powers of two: V2's router (160 in 8 groups of 20, keep 3, top 6, max
# scores), a top2_sum grouping of 48 in 4 groups of 12, a plain top-6 of 96
CASES = [(32, 64, 8, 4, 6, "top2_sum"), (16, 256, 8, 4, 8, "top2_sum"), (12, 64, 1, 1, 6, "top2_sum"),
         (8, 16, 4, 1, 6, "max"), (7, 32, 4, 2, 3, "top2_sum"), (9, 160, 8, 3, 6, "max"),
         (10, 48, 4, 2, 8, "top2_sum"), (5, 96, 1, 1, 6, "top2_sum")]


@pytest.mark.parametrize("t,e,g,tg,k,score", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_matches_reference_exactly(t, e, g, tg, k, score, ties):
    x = _choice(t, e, t * e + k, ties, signed=score == "top2_sum")
    want = np.asarray(moe_topk_reference(x, k, n_group=g, topk_group=tg, group_score=score))
    if g == 1:     # the reference is lax.top_k's order: descending value, the lower index first among equals
        vals = np.take_along_axis(np.asarray(x), want, axis=1)
        assert (np.diff(vals, axis=1) <= 0).all() and ((np.diff(vals, axis=1) < 0) | (np.diff(want, axis=1) > 0)).all()
    for bt in (1, None):
        got = _pallas(x, k, n_group=g, topk_group=tg, group_score=score, interpret=True, bt=bt)
        assert got.shape == (t, k) and got.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"bt={bt}")


@pytest.mark.parametrize("t,e,g,tg,k,score", CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_kernel_weights_match_reference(t, e, g, tg, k, score, norm):
    """``moe_topk_weights``: the kernel's indices are the reference's bitwise and its combine weights (the unbiased
    scores at the picks, renormalised and scaled in the kernel) equal the reference's gather to float32 summation
    order, padded groups included."""
    x = _choice(t, e, t * e + k, True, signed=score == "top2_sum")
    scores = jax.nn.sigmoid(_choice(t, e, 7, False))
    want_w, want_i = moe_topk_weights_reference(x, scores, k, n_group=g, topk_group=tg, group_score=score,
                                                norm=norm, scale=2.5)
    got_w, got_i = moe_topk_weights(x, scores, k, n_group=g, topk_group=tg, group_score=score, norm=norm, scale=2.5,
                                    implementation="pallas", interpret=True)
    assert got_w.shape == (t, k) and got_w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-6)


def test_kernel_weights_gradient_is_the_reference_gradient():
    """The weights' gradient: through the unbiased scores only (the selection scores rank, nothing flows through
    them), equal to the reference's for the same indices; also under jit."""
    x = _choice(6, 64, 3, False)
    scores = jax.nn.sigmoid(_choice(6, 64, 4, False))
    ct = jax.random.normal(jax.random.key(5), (6, 6))

    def loss(impl, c, s):
        w, _ = moe_topk_weights(c, s, 6, n_group=8, topk_group=4, norm=True, scale=2.5, implementation=impl,
                                interpret=impl == "pallas")
        return jnp.sum(w * ct)

    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1))(x, scores)
    got = jax.jit(jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1)))(x, scores)
    assert not np.asarray(got[0]).any() and not np.asarray(want[0]).any()
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want[1]), rtol=1e-5, atol=1e-7)


def test_masked_groups_and_ties_follow_top_k():
    """Hand-made: two groups tie on their score, the lower group wins; inside it equal experts go by index."""
    x = jnp.asarray([[0.5, 0.5, 0.1, 0.0, 0.5, 0.5, 0.1, 0.0, 0.9, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2, 0.2]], jnp.float32)
    # groups of 4: top-2 sums 1.0, 1.0, 0.9, 0.4 -> keep 2: groups 0 and 1 (equal, lower index first over group 2)
    want = [[0, 1, 4, 5, 2, 6]]
    for impl in ("xla", "interpret"):
        got = (moe_topk(x, 6, n_group=4, topk_group=2) if impl == "xla" else
               _pallas(x, 6, n_group=4, topk_group=2, group_score="top2_sum", interpret=True))
        assert np.asarray(got).tolist() == want, impl


def test_nan_scores_give_distinct_indices_in_range():
    """A NaN score ranks as -inf in the kernel: the token still gets K distinct experts in range (the other tokens
    are unaffected and equal the reference)."""
    x = _choice(4, 64, 3, False).at[1, 5].set(jnp.nan).at[2].set(jnp.nan)
    got = np.asarray(_pallas(x, 6, n_group=8, topk_group=4, group_score="top2_sum", interpret=True))
    assert ((got >= 0) & (got < 64)).all() and all(len(set(row)) == 6 for row in got.tolist())
    assert 5 not in got[1]
    want = np.asarray(moe_topk_reference(x, 6, n_group=8, topk_group=4))
    np.testing.assert_array_equal(got[[0, 3]], want[[0, 3]])


def test_default_block_rows():
    assert default_block_rows(32, 64) == 1                   # a decode step: one token per program
    assert default_block_rows(16384, 64) == 32               # training: 512 programs of 32 tokens (2,048 values)
    assert default_block_rows(16384, 256) == 16              # tiles of at most 4,096 values
    assert default_block_rows(12, 64, num_sms=1) == 4        # only powers of two dividing T
    assert 16384 % default_block_rows(16384, 64) == 0
    assert kernel_shapes_ok(32, 256, 8) and kernel_shapes_ok(1, 64, 1) and kernel_shapes_ok(1, 96, 1)
    assert kernel_shapes_ok(32, 160, 8, k=6, topk_group=3)                     # V2: 8 groups of 20, padded to 32
    assert not kernel_shapes_ok(32, 96, 3)                                     # groups: a power of two of them
    assert not kernel_shapes_ok(32, 160, 8, k=21, topk_group=1)                # picks beyond the kept 20 experts


def test_model_routes_through_the_kernel(monkeypatch):
    """A tiny V3-style model's forward pass and generation with ``routing_impl="pallas"`` (the kernel interpreted)
    equal the XLA selection's: the same experts, the combine weights to float32 summation order."""
    from dsjax.inference import SamplingConfig
    from dsjax.model import moe as moe_mod

    cfg = dsjax.configs.tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                             routing_impl="xla")
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
    calls = []

    def interpreted(choice, scores, k, **kw):
        assert kw["implementation"] == "pallas"
        calls.append(choice.shape)
        return moe_topk_weights(choice, scores, k, **kw, interpret=True)

    tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, cfg.vocab_size)
    ref = model(tokens)
    prompts = [[1, 5, 9, 22, 40], [1, 7, 3]]
    sc = SamplingConfig(max_new_tokens=4, temperature=0.0, use_eos=False, length_bucket=8)
    ref_gen = dsjax.generate(model, prompts, sampling=sc)
    monkeypatch.setattr(moe_mod, "moe_topk_weights", interpreted)
    kmodel = dsjax.Transformer(cfg.replace(routing_impl="pallas"), rngs=nnx.Rngs(0))
    got = kmodel(tokens)
    assert calls, "the router did not reach the kernel"
    np.testing.assert_array_equal(np.asarray(got.moe["indices"]), np.asarray(ref.moe["indices"]))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), rtol=1e-5, atol=1e-6)
    got_gen = dsjax.generate(kmodel, prompts, sampling=sc)
    np.testing.assert_array_equal(got_gen.tokens, ref_gen.tokens)


def test_gradients_through_the_kernel_alone_and_under_a_plan(monkeypatch):
    """Training through the kernel: the indices carry no gradient, the combine weights' backward is the reference's
    (XLA, outside the kernel), so a loss's parameter gradients equal the XLA selection's to float32 summation order
    on one device and under a data x expert plan, where each device selects for its own tokens inside
    ``shard_map``."""
    from dsjax.model import moe as moe_mod
    from dsjax.sharding import MeshConfig, make_plan, use_plan

    cfg = dsjax.configs.tiny(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                             routing_impl="xla")
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 3, cfg.vocab_size)

    def grads(c):
        graphdef, params, rest = nnx.split(dsjax.Transformer(c, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(tokens).logits.astype(jnp.float32) ** 2)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    ref = grads(cfg)
    calls = []
    def interpreted(choice, scores, k, *, call_wrapper, **kw):      # records the shapes each kernel call sees
        return moe_topk_weights(choice, scores, k, **kw, interpret=True,
                                call_wrapper=lambda f: call_wrapper(lambda c, s: calls.append(c.shape) or f(c, s)))

    monkeypatch.setattr(moe_mod, "moe_topk_weights", interpreted)
    for a, b in zip(ref, grads(cfg.replace(routing_impl="pallas"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert calls and set(calls) == {(24, 16)}, calls
    calls.clear()
    with use_plan(make_plan(MeshConfig(data=2, expert=2), jax.devices()[:4])):
        got = grads(cfg.replace(routing_impl="pallas"))
    assert calls and set(calls) == {(6, 16)}, calls          # 24 tokens over the 4 devices of the batch axes
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_kernel_lowers_for_cuda():
    """Without a GPU: the Triton lowering at `small`'s decode and training shapes, V3's and V2's (padded groups)."""
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    for t, e, g, tg, k, score in [(32, 64, 8, 4, 6, "top2_sum"), (16384, 64, 8, 4, 6, "top2_sum"),
                                  (1, 256, 8, 4, 8, "top2_sum"), (64, 64, 1, 1, 6, "top2_sum"),
                                  (32, 160, 8, 3, 6, "max")]:
        fn = functools.partial(_pallas, k=k, n_group=g, topk_group=tg, group_score=score, interpret=False)
        sds = jax.ShapeDtypeStruct((t, e), jnp.float32)
        with jax.sharding.use_abstract_mesh(mesh):
            for f, args in ((fn, (sds,)), (lambda c, s, fn=fn: fn(c, scores=s, scale=2.5), (sds, sds))):
                text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                assert "xla.gpu.triton" in text


def test_errors():
    x = _choice(4, 64, 0, False)
    with pytest.raises(ValueError, match="n_group"):
        moe_topk(x, 6, n_group=5)
    with pytest.raises(ValueError, match="topk_group"):
        moe_topk(x, 6, n_group=8, topk_group=9)
    with pytest.raises(ValueError, match="k = 65"):
        moe_topk(x, 65)
    with pytest.raises(ValueError, match="n_group a power of two"):
        moe_topk(_choice(4, 48, 0, False), 6, n_group=3, implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="interpret=True"):
        moe_topk(x, 6, implementation="pallas")
    with pytest.raises(ValueError, match="implementation"):
        moe_topk(x, 6, implementation="triton")
    with pytest.raises(dsjax.ConfigError, match="routing_impl"):
        dsjax.configs.tiny(routing_impl="cuda")
    np.testing.assert_array_equal(moe_topk(x, 6), moe_topk(x, 6, implementation="xla"))   # "auto" on the CPU
    with pytest.raises(ValueError, match="differ"):
        moe_topk_weights(x, x[:, :32], 6)


@pytest.mark.gpu
def test_kernel_on_gpu():
    """The compiled Triton kernel gives the reference's indices at decode, training, V3 and V2 (padded) shapes, ties
    included."""
    for t, e, g, tg, k, score in [(32, 64, 8, 4, 6, "top2_sum"), (1, 64, 8, 4, 6, "top2_sum"),
                                  (16384, 64, 8, 4, 6, "top2_sum"), (256, 256, 8, 4, 8, "top2_sum"),
                                  (64, 64, 1, 1, 6, "top2_sum"), (32, 160, 8, 3, 6, "max")]:
        for ties in (False, True):
            x = _choice(t, e, t + e, ties, signed=score == "top2_sum")
            want = moe_topk(x, k, n_group=g, topk_group=tg, group_score=score, implementation="xla")
            got = jax.jit(functools.partial(moe_topk, k=k, n_group=g, topk_group=tg, group_score=score,
                                            implementation="pallas"))(x)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str((t, e, ties)))
            scores = jax.nn.sigmoid(x)
            kw = dict(n_group=g, topk_group=tg, group_score=score, norm=True, scale=2.5)
            want_w, want_i = moe_topk_weights(x, scores, k, implementation="xla", **kw)
            got_w, got_i = jax.jit(functools.partial(moe_topk_weights, k=k, implementation="pallas", **kw))(x, scores)
            np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
            np.testing.assert_allclose(np.asarray(got_w), np.asarray(want_w), rtol=1e-6)
