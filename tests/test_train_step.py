"""The pure train step: targets, chunked CE, schedules, decay mask, accumulation, NaN guard, bias update."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsjax import configs
from dsjax.model import Transformer
from dsjax.train import (BalanceConfig, LossConfig, OptimConfig, TrainConfig, chunked_cross_entropy,
                         flops_per_token, make_schedule, make_train_step, shifted_targets, split_model)
from dsjax.train.config import apply_overrides, tiny as tiny_preset
from dsjax.train.optim import decay_mask
from dsjax.train.step import init_state
from dsjax.configs import ConfigError


def test_shifted_targets_respect_documents_and_masks():
    tokens = jnp.array([[10, 11, 12, 20, 21, 22, 0, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0]])
    mask = jnp.array([[0, 1, 1, 0, 0, 1, 0, 0]])  # e.g. SFT: only some targets count
    tg, w = shifted_targets(tokens, seg, mask, 1)
    np.testing.assert_array_equal(tg[0, :5], [11, 12, 20, 21, 22])
    np.testing.assert_array_equal(w[0], [1, 1, 0, 0, 1, 0, 0, 0])  # no target across the 1|2 boundary
    tg2, w2 = shifted_targets(tokens, seg, mask, 2)  # MTP depth 1 predicts two ahead
    np.testing.assert_array_equal(w2[0], [1, 0, 0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(tg2[0, :1], [12])


@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_chunked_cross_entropy_matches_full(chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(k1, (2, 9, 8))
    w_head = jax.random.normal(k2, (8, 31))
    tg = jax.random.randint(k3, (2, 9), 0, 31)
    wt = (jnp.arange(18).reshape(2, 9) % 3 != 0).astype(jnp.float32)
    head = lambda x: x @ w_head
    ce, z = chunked_cross_entropy(h, head, tg, wt, chunk)
    logits = h @ w_head
    lse = jax.nn.logsumexp(logits, -1)
    ref = jnp.sum(wt * (lse - jnp.take_along_axis(logits, tg[..., None], -1)[..., 0]))
    np.testing.assert_allclose(ce, ref, rtol=1e-5)
    np.testing.assert_allclose(z, jnp.sum(wt * lse ** 2), rtol=1e-5)
    # gradients of CE + 0.3 z-loss w.r.t. the hidden states, the head and the weights (the custom backward reuses
    # the forward's logsumexp and writes the target term with a select: no scatter into a zeroed [C, V] block)
    def full(hh, ww, wts):
        lg = hh @ ww
        lse_ = jax.nn.logsumexp(lg, -1)
        tgt = jnp.take_along_axis(lg, tg[..., None], -1)[..., 0]
        return jnp.sum(wts * (lse_ - tgt)) + 0.3 * jnp.sum(wts * lse_ ** 2)

    def chunked(hh, ww, wts):
        c, zz = chunked_cross_entropy(hh, lambda x: x @ ww, tg, wts, chunk)
        return c + 0.3 * zz

    got = jax.grad(chunked, argnums=(0, 1, 2))(h, w_head, wt)
    want = jax.grad(full, argnums=(0, 1, 2))(h, w_head, wt)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    hlo = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1))).lower(h, w_head, wt).compile().as_text()
    assert " scatter(" not in hlo


def test_schedules():
    cos = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5) and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(110)) == pytest.approx(0.1, abs=1e-6)
    wsd = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                                    min_lr_ratio=0.0), 110)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(88)) == pytest.approx(1.0)
    assert float(wsd(110)) == pytest.approx(0.0, abs=1e-6) and 0 < float(wsd(100)) < 1
    const = make_schedule(OptimConfig(learning_rate=2.0, warmup_steps=0, schedule="constant"), 10)
    assert float(const(7)) == 2.0


def test_decay_mask():
    model = nnx.eval_shape(lambda: Transformer(configs.tiny(attention_bias=True), rngs=nnx.Rngs(0)))
    _, params, _ = split_model(model)
    mask = decay_mask(nnx.to_pure_dict(params), decay_embeddings=False)
    assert mask["layers"][1]["self_attn"]["q_b_proj"]["kernel"] is True
    assert mask["layers"][1]["self_attn"]["q_a_proj"]["bias"] is False
    assert mask["layers"][1]["mlp"]["experts"]["gate_proj"] is True
    assert mask["layers"][1]["mlp"]["gate"]["weight"] is True
    assert mask["layers"][1]["input_layernorm"]["weight"] is False
    assert mask["embed_tokens"]["embedding"] is False
    assert decay_mask(nnx.to_pure_dict(params), decay_embeddings=True)["embed_tokens"]["embedding"] is True


def _cfg(**kw):
    base = dict(steps=100, optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant"))
    base.update(kw)
    return tiny_preset(**base)


def _batch(cfg, seed=0, b=4, t=32):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 3, 200)
    seg = jnp.concatenate([jnp.ones((b, t // 2), jnp.int32), 2 * jnp.ones((b, t // 2), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(t // 2)] * 2)[None].repeat(b, 0)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": jnp.ones((b, t), jnp.int32)}


def _step(cfg):
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    return jax.jit(make_train_step(cfg, graphdef, p, r))


def test_train_step_learns_and_reports():
    cfg = _cfg()
    state = init_state(cfg, jax.random.key(0))
    step = _step(cfg)
    batch = _batch(cfg)
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    for k in ("ce", "mtp_loss_1", "balance_loss", "z_loss", "grad_norm", "lr", "skipped", "load_max",
              "load_min", "bias_spread", "tokens", "data_checksum"):
        assert k in m, k
    assert int(m["skipped_total"]) == 0 and int(state.step) == 15
    assert float(m["tokens"]) == 4 * 30  # two documents of 16 per row: 15 targets each
    # the routing bias moved (aux-loss-free update) and has zero mean (centred update)
    bias = state.rest["layers"][1]["mlp"]["gate"]["e_score_correction_bias"]
    assert float(jnp.abs(bias).max()) > 0 and abs(float(bias.mean())) < 1e-6


def test_gradient_accumulation_equals_one_big_batch():
    cfg1 = _cfg()
    cfg2 = dataclasses.replace(cfg1, micro_batches=2)
    s0 = init_state(cfg1, jax.random.key(1))
    batch = _batch(cfg1, seed=3)
    batch["loss_mask"] = batch["loss_mask"].at[0, :20].set(0)  # uneven targets per micro-batch
    a, ma = _step(cfg1)(s0, batch)
    s0 = init_state(cfg1, jax.random.key(1))
    b, mb = _step(cfg2)(s0, batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    # Adam's first update is ~lr * sign(g): compare at a fraction of lr (3e-3)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=3e-5)
    for x, y in zip(jax.tree.leaves(a.rest), jax.tree.leaves(b.rest)):  # global counts -> same bias update
        np.testing.assert_allclose(x, y, atol=1e-7)


def test_batch_without_segment_ids_is_one_document_per_row():
    """A batch without ``segment_ids`` (unpacked rows, as HF trains) gives the loss and update of all-ones document
    ids, through the mask-free causal attention path."""
    cfg = _cfg()
    batch = _batch(cfg, seed=4)
    batch["segment_ids"] = jnp.ones_like(batch["tokens"])
    batch["positions"] = jnp.arange(32)[None].repeat(4, 0)
    unpacked = {k: v for k, v in batch.items() if k != "segment_ids"}
    a, ma = _step(cfg)(init_state(cfg, jax.random.key(2)), batch)
    b, mb = _step(cfg)(init_state(cfg, jax.random.key(2)), unpacked)
    assert float(mb["tokens"]) == 4 * 31
    for k in ("loss", "ce", "mtp_loss_1", "grad_norm"):
        np.testing.assert_allclose(ma[k], mb[k], rtol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, atol=3e-5)


def test_nonfinite_step_is_skipped_without_touching_state():
    cfg = _cfg()
    state = init_state(cfg, jax.random.key(0))
    step = _step(cfg)
    state, _ = step(state, _batch(cfg, seed=1))
    # poison token 7: its embedding row becomes NaN, so any batch containing it has a NaN loss
    emb = state.params["embed_tokens"]["embedding"]
    params = {**state.params, "embed_tokens": {"embedding": emb.at[7].set(jnp.nan)}}
    state = dataclasses.replace(state, params=params)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state, state.rest))
    bad = _batch(cfg, seed=2)
    bad["tokens"] = bad["tokens"].at[0, 3].set(7)
    for i in range(3):
        state, m = step(state, bad)
        assert int(m["skipped"]) == 1 and int(m["consecutive_skips"]) == i + 1 and int(m["skipped_total"]) == i + 1
    after = jax.tree.map(np.asarray, (state.params, state.opt_state, state.rest))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)  # moments, count and biases untouched
    good = _batch(cfg, seed=4)
    good["tokens"] = jnp.where(good["tokens"] == 7, 8, good["tokens"])
    state, m = step(state, good)
    assert int(m["skipped"]) == 0 and int(m["consecutive_skips"]) == 0 and int(m["skipped_total"]) == 3


def test_aux_loss_free_bias_reduces_skewed_load():
    # Freeze the weights (tiny lr). Every token embedding shares a direction u and the router favours u for
    # experts 0-2, so they get every token; the bias update alone must rebalance the load.
    cfg = _cfg(optim=OptimConfig(learning_rate=1e-12, warmup_steps=0, schedule="constant", weight_decay=0.0),
               balance=BalanceConfig(gamma=5e-3), loss=LossConfig(mtp_lambda=0.0))
    state = init_state(cfg, jax.random.key(0))
    d = cfg.model.hidden_size
    u = jax.random.normal(jax.random.key(9), (d,))
    u = u / jnp.linalg.norm(u)
    params = jax.tree.map(lambda x: x, state.params)
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] + 0.1 * u
    for layer in (1, 2):
        w = params["layers"][layer]["mlp"]["gate"]["weight"]
        params["layers"][layer]["mlp"]["gate"]["weight"] = w.at[:, :3].add(u[:, None])
    state = dataclasses.replace(state, params=params)
    step = _step(cfg)
    loads = []
    for i in range(300):
        state, m = step(state, _batch(cfg, seed=i))
        loads.append(float(m["load_max_mean"]))
    first, last = loads[0], float(np.mean(loads[-20:]))
    assert first > 2.5, first  # skewed at the start (4.0 = three experts take every token)
    assert last < 0.6 * first, (first, last)


def test_bias_update_can_stop():
    cfg = _cfg(balance=BalanceConfig(gamma=1e-2, gamma_until_step=2))
    state = init_state(cfg, jax.random.key(0))
    step = _step(cfg)
    for i in range(2):
        state, _ = step(state, _batch(cfg, seed=i))
    frozen = np.asarray(state.rest["layers"][1]["mlp"]["gate"]["e_score_correction_bias"])
    state, _ = step(state, _batch(cfg, seed=5))
    np.testing.assert_array_equal(frozen, state.rest["layers"][1]["mlp"]["gate"]["e_score_correction_bias"])


def test_overrides_are_typed_and_checked():
    cfg = apply_overrides(tiny_preset(), ["optim.learning_rate=1e-3", "steps=7", "data.seq_len=64",
                                          "model.num_hidden_layers=2", "balance.gamma_until_step=none",
                                          "tensorboard=false", "data.paths=a.txt,b.txt", "data.source=text"])
    assert cfg.optim.learning_rate == 1e-3 and cfg.steps == 7 and cfg.data.seq_len == 64
    assert cfg.model.num_hidden_layers == 2 and cfg.tensorboard is False and cfg.data.paths == ("a.txt", "b.txt")
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'"):
        apply_overrides(tiny_preset(), ["optim.learning_rat=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(tiny_preset(), ["steps=many"])
    with pytest.raises(ConfigError, match="qk_rope_head_dim=7: must be even"):
        apply_overrides(tiny_preset(), ["model.qk_rope_head_dim=7"])
    with pytest.raises(ConfigError, match="micro_batches=3: must divide"):
        dataclasses.replace(tiny_preset(), micro_batches=3)


def test_split_overrides_keeps_tuple_values_together():
    from dsjax.train.config import split_overrides

    items = split_overrides("model.fp8=true,model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj,unpacked,steps=3",
                            bare=("unpacked",))
    assert items == ["model.fp8=true", "model.fp8_bf16_projections=kv_a_proj_with_mqa,kv_b_proj", "unpacked",
                     "steps=3"]
    cfg = apply_overrides(tiny_preset(), [x for x in items if x != "unpacked"])
    assert cfg.model.fp8_bf16_projections == ("kv_a_proj_with_mqa", "kv_b_proj") and cfg.steps == 3
    assert split_overrides("") == [] and split_overrides("a=1,,b=2") == ["a=1", "b=2"]


def test_mfu_formula():
    cfg = TrainConfig(model=configs.deepseek_v3(num_nextn_predict_layers=0),
                      data=tiny_preset().data.__class__(seq_len=4096))
    f = flops_per_token(cfg)
    # 6 x ~36.6B active + attention 3 * 61 * 128 * 320 * 4096
    assert f == pytest.approx(6 * 36.626e9 + 3 * 61 * 128 * 320 * 4096, rel=1e-3)


def test_bf16_compute_with_fp32_master_weights():
    cfg = _cfg(model=configs.tiny(dtype="bfloat16", param_dtype="float32"),
               optim=OptimConfig(learning_rate=3e-3, warmup_steps=0, schedule="constant", moment_dtype="bfloat16"))
    state = init_state(cfg, jax.random.key(0))
    assert state.params["layers"][0]["mlp"]["gate_proj"]["kernel"].dtype == jnp.float32  # master copy
    step = _step(cfg)
    losses = []
    for i in range(8):
        state, m = step(state, _batch(cfg))
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert state.params["layers"][0]["mlp"]["gate_proj"]["kernel"].dtype == jnp.float32


def test_token_log_probs_chunked():
    from dsjax.train import token_log_probs

    h = jax.random.normal(jax.random.key(0), (2, 7, 8))
    w_head = jax.random.normal(jax.random.key(1), (8, 13))
    tg = jax.random.randint(jax.random.key(2), (2, 7), 0, 13)
    out = token_log_probs(h, lambda x: x @ w_head, tg, temperature=0.7, chunk_tokens=5)
    ref = jnp.take_along_axis(jax.nn.log_softmax((h @ w_head) / 0.7), tg[..., None], -1)[..., 0]
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # gradients (the custom backward reuses the forward's logsumexp) w.r.t. hidden states and head
    c = jax.random.normal(jax.random.key(3), (2, 7))
    got = jax.grad(lambda hh, ww: jnp.sum(c * token_log_probs(hh, lambda x: x @ ww, tg, 0.7, 5)), (0, 1))(h, w_head)
    want = jax.grad(lambda hh, ww: jnp.sum(c * jnp.take_along_axis(jax.nn.log_softmax((hh @ ww) / 0.7),
                                                                   tg[..., None], -1)[..., 0]), (0, 1))(h, w_head)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
