"""Model behaviour on tiny configs: RoPE/YaRN, RMSNorm, MLA paths, routers, dropless experts, masking, caches, MTP."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax import configs
from dsjax.model import (MLA, RMSNorm, RoutedExperts, Transformer, apply_rope, make_attention_mask, route,
                         rope_cos_sin, rope_frequencies)
from dsjax.model.moe import MoE

from cudnn_standin import reference_cudnn as _reference_cudnn


def _ids(cfg, b=2, t=16, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, t), 3, cfg.vocab_size)


# ----------------------------------------------------------------------------------------------- norms / rope
def test_rmsnorm_float32_then_cast():
    norm = RMSNorm(8, eps=1e-6, param_dtype=jnp.float32)
    norm.weight.set_value(jnp.arange(1.0, 9.0))
    x = jax.random.normal(jax.random.key(0), (3, 8)).astype(jnp.bfloat16)
    x32 = x.astype(jnp.float32)
    ref = (x32 / jnp.sqrt(jnp.mean(x32 ** 2, -1, keepdims=True) + 1e-6)).astype(jnp.bfloat16)
    ref = jnp.arange(1.0, 9.0).astype(jnp.bfloat16) * ref
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))


def test_yarn_frequencies_v3_recipe():
    cfg = configs.deepseek_v3()
    inv_freq, factor = rope_frequencies(cfg)
    assert inv_freq.dtype == np.float32 and inv_freq.shape == (32,)
    assert factor == 1.0
    base = 10000.0 ** (np.arange(0, 64, 2) / 64)
    # correction range for L0 = 4096, beta_fast 32 / beta_slow 1, dim 64: low = 10, high = 23
    np.testing.assert_allclose(inv_freq[:10], 1 / base[:10], rtol=1e-6)          # pure extrapolation
    np.testing.assert_allclose(inv_freq[23:], 1 / (40 * base[23:]), rtol=1e-6)   # pure interpolation
    ramp = (np.arange(32) - 10) / 13
    mid = (1 / (40 * base)) * ramp + (1 / base) * (1 - ramp)
    np.testing.assert_allclose(inv_freq[10:23], mid[10:23], rtol=1e-5)
    assert rope_frequencies(configs.deepseek_v2_lite())[1] == 1.0
    # mscale != mscale_all_dim gives a cos/sin multiplier of m(s, mscale) / m(s, mscale_all_dim)
    cfg2 = configs.tiny(rope_scaling=configs.RopeScaling(factor=4.0, original_max_position_embeddings=256,
                                                         mscale=1.0, mscale_all_dim=0.8))
    m = lambda a: 0.1 * a * math.log(4.0) + 1
    assert rope_frequencies(cfg2)[1] == pytest.approx(m(1.0) / m(0.8))
    # plain RoPE when rope_scaling is None
    plain, f = rope_frequencies(configs.small())
    np.testing.assert_allclose(plain, 1 / 10000.0 ** (np.arange(0, 32, 2) / 32), rtol=1e-6)
    assert f == 1.0


def test_interleaved_rope_is_relative_and_norm_preserving():
    cfg = configs.tiny()
    key = jax.random.key(0)
    q = jax.random.normal(key, (1, 1, cfg.qk_rope_head_dim))
    k = jax.random.normal(jax.random.key(1), (1, 1, cfg.qk_rope_head_dim))

    def rot(x, pos):
        cos, sin = rope_cos_sin(cfg, jnp.array([[pos]]), jnp.float32)
        return apply_rope(x, cos, sin)

    np.testing.assert_allclose(jnp.linalg.norm(rot(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
    d1 = jnp.sum(rot(q, 50) * rot(k, 45))
    d2 = jnp.sum(rot(q, 105) * rot(k, 100))
    np.testing.assert_allclose(d1, d2, rtol=1e-4)
    # pairs (x0, x1) rotate together: a vector living in pair 0 stays in output slots {0, P/2}
    e0 = jnp.zeros((1, 1, cfg.qk_rope_head_dim)).at[..., 0].set(1.0)
    out = rot(e0, 3)
    nz = set(np.nonzero(np.abs(np.asarray(out[0, 0])) > 1e-7)[0].tolist())
    assert nz <= {0, cfg.qk_rope_head_dim // 2}


# ----------------------------------------------------------------------------------------------- MLA
@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_mla_absorbed_equals_naive(q_lora_rank):
    cfg = configs.tiny(q_lora_rank=q_lora_rank)
    mla = MLA(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 12, cfg.hidden_size))
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    pos = jnp.array([list(range(5)) + list(range(7)), list(range(12))])
    cos, sin = rope_cos_sin(cfg, pos, jnp.float32)
    mask = make_attention_mask(seg, seg)
    naive, lat = mla(x, cos, sin, mask, impl="naive")
    absorbed, _ = mla(x, cos, sin, mask, impl="absorbed")
    assert lat[0].shape == (2, 12, cfg.kv_lora_rank) and lat[1].shape == (2, 12, cfg.qk_rope_head_dim)
    np.testing.assert_allclose(naive, absorbed, atol=1e-5, rtol=1e-5)


def test_attention_mask_is_causal_and_per_document():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = np.asarray(make_attention_mask(seg, seg)[0])
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(m, expected)


# ----------------------------------------------------------------------------------------------- routers
def test_v3_router_hand_computed():
    # 8 experts in 4 groups of 2, keep 2 groups, top-2, scaling 2.5, renormalised.
    cfg = configs.tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    s = jnp.array([[0.9, 0.1, 0.5, 0.5, 0.8, 0.7, 0.2, 0.3]])
    logits = jnp.log(s / (1 - s))  # sigmoid(logits) == s
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, -0.6, 0.0, 0.0, 0.9])
    # biased: [.9 .1 .5 .5 .2 .7 .2 1.2]; group sums of top-2: g0 1.0, g1 1.0, g2 0.9, g3 1.4 -> keep g3 and
    # one of the tied g0/g1; top_k breaks the tie towards the lower index: g0. Experts: 7 (1.2) and 0 (0.9).
    out = route(cfg, logits, bias)
    assert sorted(np.asarray(out.indices[0]).tolist()) == [0, 7]
    w = dict(zip(np.asarray(out.indices[0]).tolist(), np.asarray(out.weights[0]).tolist()))
    # weights come from the unbiased scores 0.9 and 0.3, renormalised, times 2.5
    assert w[0] == pytest.approx(2.5 * 0.9 / 1.2, rel=1e-5) and w[7] == pytest.approx(2.5 * 0.3 / 1.2, rel=1e-5)
    # without the bias the selection changes (expert 4 at 0.8 wins over 7): the bias is selection-only
    out2 = route(cfg, logits, jnp.zeros(8))
    assert sorted(np.asarray(out2.indices[0]).tolist()) == [0, 4]


@pytest.mark.parametrize("method", ["noaux_tc", "group_limited_greedy"])
def test_group_routing_equals_the_top_k_and_scatter_form(method):
    """The group scores as two max reductions and the kept-group mask by comparison give bitwise the routing of
    the ``top_k(., 2).sum`` / scatter formulation they replaced, ties included (scores rounded to force them)."""
    from pallas_kernels.moe_topk import _top2_sum

    kw = dict(scoring_func="sigmoid") if method == "noaux_tc" else dict(scoring_func="softmax")
    cfg = configs.tiny(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6, topk_method=method,
                       **kw)
    logits = jnp.round(jax.random.normal(jax.random.key(0), (257, 64)) * 4) / 4      # many exact ties
    bias = jnp.round(jax.random.normal(jax.random.key(1), (64,)) * 4) / 16 if method == "noaux_tc" else None
    grouped = jax.random.normal(jax.random.key(2), (99, 8, 8)).round()
    np.testing.assert_array_equal(_top2_sum(grouped), jax.lax.top_k(grouped, 2)[0].sum(-1))

    def old_route(logits, bias):
        scores = jax.nn.sigmoid(logits) if method == "noaux_tc" else jax.nn.softmax(logits, axis=-1)
        choice = scores + bias[None] if bias is not None else scores
        grouped = choice.reshape(logits.shape[0], 8, 8)
        gs = jax.lax.top_k(grouped, 2)[0].sum(-1) if method == "noaux_tc" else grouped.max(-1)
        _, keep = jax.lax.top_k(gs, 4)
        mask = jnp.zeros((logits.shape[0], 8), bool).at[jnp.arange(logits.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(mask, 8, axis=1), choice, -jnp.inf if method == "noaux_tc" else 0.0)
        _, idx = jax.lax.top_k(choice, 6)
        w = jnp.take_along_axis(scores, idx, axis=-1)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdims=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor

    out = jax.jit(lambda l, b: route(cfg, l, b))(logits, bias)
    idx, w = jax.jit(old_route)(logits, bias)
    np.testing.assert_array_equal(out.indices, idx)
    np.testing.assert_array_equal(out.weights, w)


def test_v2_routers_hand_computed():
    logits = jnp.log(jnp.array([[0.05, 0.30, 0.10, 0.05, 0.20, 0.02, 0.08, 0.20]]))  # softmax == these values
    greedy = configs.tiny(scoring_func="softmax", topk_method="greedy", n_routed_experts=8, n_group=1,
                          topk_group=1, num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=16.0)
    out = route(greedy, logits, None)
    idx = np.asarray(out.indices[0]).tolist()
    assert sorted(idx) == [1, 4, 7]
    np.testing.assert_allclose(sorted(np.asarray(out.weights[0]) / 16.0), [0.2, 0.2, 0.3], rtol=1e-5)
    # group-limited greedy: 4 groups of 2, group score = max; keep 2 groups: g0 (0.30) and g2/g3 (0.20, tie -> g2)
    glg = greedy.replace(topk_method="group_limited_greedy", n_group=4, topk_group=2)
    out = route(glg, logits, None)
    assert sorted(np.asarray(out.indices[0]).tolist()) == [0, 1, 4]


# (tokens, decode step, moe_dense_decode_tokens, path): 2 tokens x K=4 <= E/2 gathers the chosen experts' weights;
# a decode step of 20 tokens runs every expert (dense) unless the bound is below 20; otherwise the grouped path
@pytest.mark.parametrize("t,decode,bound,path", [(20, False, 128, "grouped"), (2, False, 128, "gathered"),
                                                 (20, True, 128, "dense"), (20, True, 16, "grouped"),
                                                 (2, True, 128, "gathered")])
def test_routed_experts_match_dense_reference(t, decode, bound, path, monkeypatch):
    cfg = configs.tiny(moe_dense_decode_tokens=bound)
    experts = RoutedExperts(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (t, cfg.hidden_size))
    r = route(cfg, jax.random.normal(jax.random.key(2), (t, cfg.n_routed_experts)), None)
    taken = []
    for name in ("_dense", "_gathered"):
        fn = getattr(RoutedExperts, name)
        monkeypatch.setattr(RoutedExperts, name,
                            lambda self, *a, _fn=fn, _n=name: taken.append(_n[1:]) or _fn(self, *a))
    out = experts(x, r.indices, r.weights, decode=decode)
    assert taken == ([] if path == "grouped" else [path])
    jaxpr = str(jax.make_jaxpr(lambda x: experts(x, r.indices, r.weights, decode=decode))(x))
    assert (" sort[" in jaxpr) == (path == "grouped")     # grouped path: pairs sorted by expert
    # test-only dense reference: every expert on every token, combined with one-hot routing weights
    g, u, d = (experts.gate_proj.get_value(), experts.up_proj.get_value(), experts.down_proj.get_value())
    h = jax.nn.silu(jnp.einsum("td,edf->tef", x, g)) * jnp.einsum("td,edf->tef", x, u)
    y = jnp.einsum("tef,efd->ted", h, d)
    dense_w = jnp.zeros((t, cfg.n_routed_experts)).at[jnp.arange(t)[:, None], r.indices].add(r.weights)
    ref = jnp.einsum("ted,te->td", y, dense_w)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_moe_statistics():
    cfg = configs.tiny()
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, cfg.hidden_size))
    valid = jnp.array([[True] * 10, [True] * 6 + [False] * 4])
    y, stats = moe(x, valid)
    assert y.shape == x.shape
    assert float(stats["counts"].sum()) == 16 * cfg.num_experts_per_tok
    # balance term against a direct per-sequence evaluation of DeepSeek-V3 eq. 17-20
    r = moe.gate(x.reshape(-1, cfg.hidden_size))
    s = np.asarray(r.scores).reshape(2, 10, -1)
    idx = np.asarray(r.indices).reshape(2, 10, -1)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    terms = []
    for b, n in ((0, 10), (1, 6)):
        f = np.zeros(e)
        for t in range(n):
            f[idx[b, t]] += 1
        f *= e / (k * n)
        p = (s[b, :n] / s[b, :n].sum(-1, keepdims=True)).mean(0)
        terms.append((f * p).sum())
    assert float(stats["balance"]) == pytest.approx(np.mean(terms), rel=1e-5)
    assert np.asarray(stats["indices"]).shape == (2, 10, k)


# ----------------------------------------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def tiny_model():
    cfg = configs.tiny()
    return cfg, Transformer(cfg, rngs=nnx.Rngs(0))


def test_forward_shapes_and_absorbed(tiny_model):
    cfg, model = tiny_model
    ids = _ids(cfg)
    out = model(ids, return_mtp=True, return_hidden=True)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert len(out.mtp_logits) == cfg.num_nextn_predict_layers and out.mtp_logits[0].shape == out.logits.shape
    assert out.hidden.shape == (2, 16, cfg.hidden_size)
    assert out.moe["counts"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    assert out.moe["indices"].shape == (cfg.num_moe_layers, 2, 16, cfg.num_experts_per_tok)
    absorbed = model(ids, mla_impl="absorbed", return_mtp=True)
    np.testing.assert_allclose(absorbed.logits, out.logits, atol=1e-5)
    np.testing.assert_allclose(absorbed.mtp_logits[0], out.mtp_logits[0], atol=1e-5)


def test_packed_documents_equal_separate_runs(tiny_model):
    cfg, model = tiny_model
    a, b = _ids(cfg, 1, 7, seed=5), _ids(cfg, 1, 9, seed=6)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.array([list(range(7)) + list(range(9))])
    out = model(packed, segment_ids=seg, positions=pos).logits
    np.testing.assert_allclose(out[:, :7], model(a).logits, atol=1e-5)
    np.testing.assert_allclose(out[:, 7:], model(b).logits, atol=1e-5)


@pytest.mark.parametrize("impl", ["einsum", "jax"])
def test_unpacked_rows_use_causal_attention_without_a_mask(impl):
    """``segment_ids=None`` (one document per row, no cache): no mask tensor is built (the fused kernel gets
    ``is_causal`` alone) and the outputs equal those with an explicit all-ones document mask, MTP and absorbed
    attention included."""
    cfg = configs.tiny(attention_impl=impl)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg)
    ones = jnp.ones(ids.shape, jnp.int32)
    for mla_impl in ("naive", "absorbed"):
        a = model(ids, return_mtp=True, mla_impl=mla_impl)
        b = model(ids, segment_ids=ones, return_mtp=True, mla_impl=mla_impl)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
        np.testing.assert_allclose(a.mtp_logits[0], b.mtp_logits[0], atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda i: model(i).logits)(ids))
    assert "bool[2,16,16]" not in jaxpr and "bool[2,16,16]" in str(jax.make_jaxpr(
        lambda i: model(i, segment_ids=ones).logits)(ids))


def test_padding_does_not_change_outputs(tiny_model):
    cfg, model = tiny_model
    x = _ids(cfg, 1, 10, seed=7)
    ref = model(x).logits
    pad = jnp.full((1, 6), 0, x.dtype)
    # right padding
    out = model(jnp.concatenate([x, pad], 1), segment_ids=jnp.array([[1] * 10 + [0] * 6])).logits
    np.testing.assert_allclose(out[:, :10], ref, atol=1e-5)
    # left padding with positions counted from the first real token
    pos = jnp.array([[0] * 6 + list(range(10))])
    out = model(jnp.concatenate([pad, x], 1), segment_ids=jnp.array([[0] * 6 + [1] * 10]), positions=pos).logits
    np.testing.assert_allclose(out[:, 6:], ref, atol=1e-5)
    # routing statistics ignore padding
    st = model(jnp.concatenate([x, pad], 1), segment_ids=jnp.array([[1] * 10 + [0] * 6])).moe
    assert float(st["counts"][0].sum()) == 10 * cfg.num_experts_per_tok


@pytest.mark.parametrize("impl", ["naive", "absorbed"])
def test_cached_decoding_matches_full_forward(tiny_model, impl):
    cfg, model = tiny_model
    ids = _ids(cfg, 2, 12, seed=8)
    full = model(ids).logits
    cache = dsjax.init_cache(cfg, 2, 16)
    step = jax.jit(lambda m, x, c, i: m(x, mla_impl=impl, cache=c, cache_index=i))
    out = step(model, ids[:, :8], cache, 0)            # prefill 8 tokens
    np.testing.assert_allclose(out.logits, full[:, :8], atol=1e-5)
    cache = out.cache
    for t in range(8, 12):                             # then one token at a time
        out = step(model, ids[:, t:t + 1], cache, t)
        cache = out.cache
        np.testing.assert_allclose(out.logits[:, 0], full[:, t], atol=1e-5)
    assert cache.c_kv.shape == (cfg.num_hidden_layers, 2, 16, cfg.kv_lora_rank)


def test_scanned_stack_matches_unrolled(tmp_path):
    cfg = configs.tiny()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    dsjax.save_hf(model, None, tmp_path)
    scanned = dsjax.load_hf(tmp_path, dtype=jnp.float32, scan_layers=True, remat_policy="dots_no_batch")
    assert scanned.layers is None and scanned.moe_layers is not None
    ids = _ids(cfg)
    a, b = model(ids, return_mtp=True), scanned(ids, return_mtp=True)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
    np.testing.assert_allclose(a.mtp_logits[0], b.mtp_logits[0], atol=1e-5)
    np.testing.assert_array_equal(a.moe["indices"], b.moe["indices"])


@pytest.mark.parametrize("policy", ["none", "full", "dots", "dots_no_batch", "dots_attn", "save_attn_out"])
def test_remat_policies_give_same_gradients(policy):
    cfg = configs.tiny(scan_layers=True, remat_policy=policy, num_hidden_layers=3)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = _ids(cfg, 2, 8)

    @jax.jit
    def loss(params, rest):
        out = nnx.merge(graphdef, params, rest)(ids, return_mtp=True)
        logp = jax.nn.log_softmax(out.logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1)) + out.moe["balance"].sum()

    val, grads = jax.value_and_grad(loss)(params, rest)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    # the routing bias is not a Param: it is in `rest`, never differentiated
    assert not any("e_score_correction_bias" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    flat = jnp.concatenate([g.ravel() for g in leaves])
    ref = getattr(test_remat_policies_give_same_gradients, "ref", None)
    if ref is None:
        test_remat_policies_give_same_gradients.ref = (val, flat)
    else:
        np.testing.assert_allclose(val, ref[0], rtol=1e-5)
        np.testing.assert_allclose(flat, ref[1], atol=1e-6)


def test_dots_attn_policy_saves_the_fused_attention_forward(monkeypatch):
    """remat_policy="dots_attn" keeps cuDNN's forward attention outputs for the backward pass: the gradient's jaxpr
    holds one cuDNN forward per attention site, where "dots_no_batch" adds a recomputation of each in the backward
    pass. (Traced on the CPU with jax's cuDNN availability checks patched: nothing is lowered or run.)"""
    import jax._src.cudnn.fused_attention_stablehlo as fa

    from dsjax.model import mla

    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fa, "check_compute_capability", lambda *a: True)
    monkeypatch.setattr(fa, "check_is_flash_attention", lambda *a, **k: None)
    monkeypatch.setattr(mla, "_cudnn_mla_available", lambda: True)

    def fwd_calls(policy):
        cfg = configs.tiny(remat_policy=policy, scan_layers=True, num_hidden_layers=3, num_nextn_predict_layers=0,
                           attention_impl="cudnn_mla", dtype="bfloat16")
        graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        ids = _ids(cfg, 2, 16)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(ids).logits.astype(jnp.float32) ** 2)  # noqa: E731
        jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
        return jaxpr.count("dot_product_attention_fwd"), jaxpr.count("dot_product_attention_bwd")

    (f_save, b_save), (f_re, b_re) = fwd_calls("dots_attn"), fwd_calls("dots_no_batch")
    assert b_save == b_re > 0
    assert f_save == b_save and f_re == 2 * b_re, (f_save, f_re, b_re)


def test_mtp_costs_nothing_when_not_requested():
    base = configs.tiny()
    ids = jax.ShapeDtypeStruct((2, 32), jnp.int32)

    def flops(cfg):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
        return f.lower(state, ids).compile().cost_analysis()["flops"]

    assert flops(base) == flops(base.replace(num_nextn_predict_layers=0))


def test_big_presets_evaluate_shapes_without_allocation():
    for name in ("deepseek-v3", "deepseek-v2-lite"):
        cfg = configs.get(name)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, return_mtp=True),
                             state, jax.ShapeDtypeStruct((1, 8), jnp.int32))
        assert out.logits.shape == (1, 8, cfg.vocab_size) and out.logits.dtype == jnp.bfloat16
        assert len(out.mtp_logits or ()) == cfg.num_nextn_predict_layers
        assert out.moe["counts"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)


def test_cache_sizes():
    v3 = configs.deepseek_v3()
    assert v3.kv_lora_rank + v3.qk_rope_head_dim == 576
    assert dsjax.cache_bytes_per_token(v3) == 70_272
    assert dsjax.mha_cache_bytes_per_token(v3) == 61 * 128 * (192 + 128) * 2


def test_scanned_program_size_is_flat_in_depth():
    # With scan_layers the traced program does not grow with depth (compile time stays flat).
    def n_eqns(layers, scan):
        cfg = configs.tiny(num_hidden_layers=layers, scan_layers=scan)
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x).logits)(state, jnp.zeros((1, 8), jnp.int32))
        return len(jaxpr.eqns)

    assert n_eqns(3, True) == n_eqns(9, True)
    assert n_eqns(9, False) > n_eqns(3, False)


@pytest.mark.parametrize("t", [20, 2])
def test_routed_expert_gradients_match_dense_reference(t):
    cfg = configs.tiny()
    experts = RoutedExperts(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (t, cfg.hidden_size))
    r = route(cfg, jax.random.normal(jax.random.key(2), (t, cfg.n_routed_experts)), None)
    g, st = nnx.split(experts)

    def sparse(st, x):
        return (nnx.merge(g, st)(x, r.indices, r.weights) ** 2).sum()

    def dense(st, x):  # test-only reference: every expert on every token
        e = nnx.merge(g, st)
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, e.gate_proj[...])) * jnp.einsum("td,edf->tef", x, e.up_proj[...])
        y = jnp.einsum("tef,efd->ted", h, e.down_proj[...])
        w = jnp.zeros((t, cfg.n_routed_experts)).at[jnp.arange(t)[:, None], r.indices].add(r.weights)
        return (jnp.einsum("ted,te->td", y, w) ** 2).sum()

    a = jax.grad(sparse, argnums=(0, 1))(st, x)
    b = jax.grad(dense, argnums=(0, 1))(st, x)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, atol=1e-5, rtol=1e-5)


def test_dot_f32_out_has_low_precision_backward():
    from dsjax.model.layers import dot_f32_out

    x = jax.random.normal(jax.random.key(0), (6, 32)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 48)).astype(jnp.bfloat16)
    y = dot_f32_out(x, w)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32)), rtol=1e-5, atol=1e-5)
    f = lambda x, w: jnp.sum(jnp.sin(dot_f32_out(x, w)))
    ref = lambda x, w: jnp.sum(jnp.sin(jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))))
    gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
    rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gx, np.float32), rx, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(np.asarray(gw, np.float32), rw, rtol=3e-2, atol=3e-2)


# ----------------------------------------------------------------------------------------------- packed documents
def test_document_runs_describe_each_rows_documents():
    from dsjax.model.mla import document_runs

    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 5, 6, 7, 0]], jnp.int32)
    offsets, lengths, runs = document_runs(seg, 4)
    np.testing.assert_array_equal(runs, [4, 1, 8])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [1, 1, 1, 1]])   # row 2: runs past M


@pytest.mark.parametrize("impl", ["cudnn_packed", "auto"])
@pytest.mark.parametrize("max_docs,branch", [(4, "packed"), (2, "dense")])
def test_cudnn_packed_attention_matches_the_dense_mask(monkeypatch, max_docs, branch, impl):
    """attention_impl="cudnn_packed" (and "auto" where cuDNN runs) describes each row's documents to cuDNN by
    offsets and lengths (V padded to the key head size), and falls back on the device to the dense-mask kernel when
    a row holds more documents than attention_max_documents. Checked on the CPU against the einsum path (logits and gradients) with a stand-in for
    the cuDNN entry point written from jax's documented semantics; GPU: tools/device/next_session.sh."""
    import jax._src.cudnn.fused_attention_stablehlo as fa

    from dsjax.model import mla

    calls = []
    monkeypatch.setattr(fa, "dot_product_attention", _reference_cudnn(calls))
    monkeypatch.setattr(mla, "_cudnn_flash_available", lambda dtype: True)
    monkeypatch.setattr(mla, "_cudnn_mla_available", lambda: True)
    monkeypatch.setattr(mla, "_cudnn_packed_available", lambda: True)
    seg = jnp.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * 10 + [2] * 6], jnp.int32)        # 3 and 2 documents
    pos = jnp.concatenate([jnp.concatenate([jnp.arange(n) for n in ns])[None] for ns in ((5, 7, 4), (10, 6))])

    def run(impl):
        cfg = configs.tiny(attention_impl=impl, attention_max_documents=max_docs, num_nextn_predict_layers=1)
        graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        ids = _ids(cfg, 2, 16)

        def loss(p):
            out = nnx.merge(graphdef, p, rest)(ids, seg, pos, return_mtp=True)
            return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits[0] ** 2), out.logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (l_ref, logits_ref), g_ref = run("einsum")
    calls.clear()
    (l_got, logits_got), g_got = run(impl)
    assert set(calls) == {branch}, calls
    np.testing.assert_allclose(logits_got, logits_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_max_documents"):
        configs.tiny(attention_max_documents=0)


def test_cudnn_packed_attention_with_padding(monkeypatch):
    """Left padding (generation prompts, GRPO rows) and right padding under the packed layout ("auto" where cuDNN
    runs): padding is a run of its own that no token of a document attends to, so the valid tokens' logits and all
    gradients of a loss over them equal the einsum path's."""
    import jax._src.cudnn.fused_attention_stablehlo as fa

    from dsjax.model import mla

    calls = []
    monkeypatch.setattr(fa, "dot_product_attention", _reference_cudnn(calls))
    monkeypatch.setattr(mla, "_cudnn_flash_available", lambda dtype: True)
    monkeypatch.setattr(mla, "_cudnn_mla_available", lambda: True)
    monkeypatch.setattr(mla, "_cudnn_packed_available", lambda: True)
    seg = jnp.array([[0] * 3 + [1] * 13, [1] * 6 + [2] * 8 + [0] * 2], jnp.int32)
    pos = jnp.array([[0] * 3 + list(range(13)), list(range(6)) + list(range(8)) + [0, 0]], jnp.int32)
    valid = (seg != 0).astype(jnp.float32)

    def run(impl):
        cfg = configs.tiny(attention_impl=impl, num_nextn_predict_layers=0)
        graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        ids = _ids(cfg, 2, 16)

        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids, seg, pos).logits
            return jnp.sum(jnp.mean(logits ** 2, -1) * valid), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, logits_ref), g_ref = run("einsum")
    calls.clear()
    (_, logits), g = run("auto")
    assert set(calls) == {"packed"}
    np.testing.assert_allclose(logits * valid[..., None], logits_ref * valid[..., None], atol=1e-5, rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(logits)))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cudnn_packed_attention_on_gpu():
    """The real cuDNN packed layout on a 1-layer bf16 `small` (attention + dense MLP: no router whose top-k could
    flip between backends) with packed rows, below and above attention_max_documents. Reference: the float32 einsum
    path. Bound: the packed layout's relative error in the logits and in every gradient leaf is at most 1.5x that of
    cuDNN with the dense [B,S,S] mask (the preset's path, same bf16 kernel family) plus 1e-3."""
    rel = lambda a, b: float(jnp.linalg.norm((a - b).astype(jnp.float32)) /  # noqa: E731
                             jnp.linalg.norm(b.astype(jnp.float32)))
    rng = np.random.default_rng(0)
    seg = np.zeros((4, 512), np.int32)
    pos = np.zeros((4, 512), np.int32)
    for r in range(4):
        cuts = np.sort(rng.choice(np.arange(16, 496), size=2 + r, replace=False))
        for d, (a, b) in enumerate(zip([0, *cuts], [*cuts, 512])):
            seg[r, a:b], pos[r, a:b] = d + 1, np.arange(b - a)
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)

    def run(impl, max_docs, dtype="bfloat16"):
        cfg = configs.small(attention_impl=impl, attention_max_documents=max_docs, num_hidden_layers=1,
                            num_nextn_predict_layers=0, remat_policy="none", dtype=dtype)
        graphdef, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        ids = _ids(cfg, 4, 512)
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(ids, seg, pos).logits.astype(jnp.float32)
            return jnp.mean(logits ** 2), logits
        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return [logits, *jax.tree.leaves(g)]

    ref = run("einsum", 8, "float32")
    dense = run("cudnn", 8)
    for max_docs in (8, 3):                       # rows hold 3-6 documents: 8 fits all, 3 takes the fallback
        got = run("cudnn_packed", max_docs)
        errs = [(rel(g, r), rel(d, r)) for g, d, r in zip(got, dense, ref)]
        print(f"max_docs={max_docs}: (packed, dense) rel errors vs float32, logits first:",
              [(round(a, 5), round(b, 5)) for a, b in errs])
        for i, (g, (e_got, e_dense)) in enumerate(zip(got, errs)):
            assert bool(jnp.all(jnp.isfinite(g))), (max_docs, i)
            assert e_got <= 1.5 * e_dense + 1e-3, (max_docs, i, e_got, e_dense)
