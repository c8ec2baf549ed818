"""MTP self-speculative decoding: identical to greedy decoding, high acceptance once the MTP module has learned."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.inference.speculative import speculative_generate
from dsjax.train import config as tc
from dsjax.train import init_state, make_train_step, split_model


@pytest.fixture(scope="module")
def trained():
    """tiny (2 layers) trained for 100 steps on counting sequences (t, t+1, ...) mod 40: main and MTP learn them."""
    cfg = tc.apply_overrides(tc.tiny(), ["model.num_hidden_layers=2", "optim.learning_rate=1e-2",
                                         "optim.warmup_steps=5", "steps=100", "loss.mtp_lambda=1.0"])
    g, p, r = split_model(nnx.eval_shape(lambda: dsjax.Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, g, p, r), donate_argnums=0)
    state = init_state(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ones = jnp.ones((8, 32), jnp.int32)
    for _ in range(cfg.steps):
        toks = (rng.integers(0, 40, size=(8, 1)) + np.arange(32)[None]) % 40 + 3
        batch = {"tokens": jnp.asarray(toks, jnp.int32), "segment_ids": ones, "loss_mask": ones,
                 "positions": jnp.broadcast_to(jnp.arange(32, dtype=jnp.int32), (8, 32))}
        state, m = step(state, batch)
    assert float(m["mtp_loss_1"]) < 0.1
    params, rest = nnx.State(p), nnx.State(r)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.replace_by_pure_dict(rest, state.rest)
    return nnx.merge(g, params, rest)


def test_speculative_equals_greedy_and_accepts_drafts(trained):
    # rows of one batch with different prompt lengths; the last one is off-pattern, so rows accept differently
    prompts = [[5, 6, 7, 8], [20, 21], [30, 31, 32, 33, 34, 35], [100, 7, 250, 3]]
    cfg = dsjax.SamplingConfig(max_new_tokens=12, temperature=0.0, use_eos=False)
    plain = dsjax.generate(trained, prompts, sampling=cfg)
    spec = speculative_generate(trained, prompts, sampling=cfg)
    assert spec.output.to_lists() == plain.to_lists()
    np.testing.assert_array_equal(spec.output.lengths, plain.lengths)
    acc = np.asarray(spec.accepted) / np.maximum(np.asarray(spec.drafts), 1)
    assert acc[:3].min() > 0.8, acc
    assert int(spec.main_forwards) < 12  # fewer main forwards than tokens


def test_speculative_respects_stops(trained):
    prompts = [[5, 6, 7, 8], [20, 21]]
    cfg = dsjax.SamplingConfig(max_new_tokens=12, temperature=0.0, use_eos=False, stop_ids=(14,))
    plain = dsjax.generate(trained, prompts, sampling=cfg)
    spec = speculative_generate(trained, prompts, sampling=cfg)
    assert spec.output.to_lists() == plain.to_lists()
    assert spec.output.to_lists()[0][-1] == 14 and int(spec.output.lengths[0]) == 6
    np.testing.assert_array_equal(spec.output.tokens, plain.tokens)  # padded after the stop, too


def test_speculative_needs_an_mtp_module():
    model = dsjax.Transformer(dsjax.configs.tiny(num_nextn_predict_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no MTP module"):
        speculative_generate(model, [[1, 2]], sampling=dsjax.SamplingConfig(temperature=0.0, max_new_tokens=2))
