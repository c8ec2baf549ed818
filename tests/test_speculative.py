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


@pytest.mark.parametrize("draft_tokens", [1, 3])    # (2: the sampling test below)
def test_speculative_equals_greedy_and_accepts_drafts(trained, draft_tokens):
    # rows of one batch with different prompt lengths; the last one is off-pattern, so rows accept differently
    prompts = [[5, 6, 7, 8], [20, 21], [30, 31, 32, 33, 34, 35], [100, 7, 250, 3]]
    cfg = dsjax.SamplingConfig(max_new_tokens=12, temperature=0.0, use_eos=False)
    plain = dsjax.generate(trained, prompts, sampling=cfg)
    spec = speculative_generate(trained, prompts, sampling=cfg, draft_tokens=draft_tokens)
    assert spec.output.to_lists() == plain.to_lists()
    np.testing.assert_array_equal(spec.output.lengths, plain.lengths)
    valid = np.arange(12)[None] < np.asarray(plain.lengths)[:, None]          # log-probs as generate reports them
    np.testing.assert_allclose(np.where(valid, spec.output.logprobs, 0), np.where(valid, plain.logprobs, 0),
                               atol=2e-4)
    acc = np.asarray(spec.accepted) / np.maximum(np.asarray(spec.drafts), 1)
    assert acc[:3].min() > 0.8, acc
    np.testing.assert_array_equal(np.sum(spec.accepted_by_depth, axis=1), spec.accepted)
    assert spec.accepted_by_depth.shape == (4, draft_tokens)
    # fewer main forwards than tokens: ~12 / (k + 1) on the counting rows (the off-pattern row needs more)
    assert int(spec.main_forwards) <= {1: 11, 3: 7}[draft_tokens], int(spec.main_forwards)


@pytest.mark.parametrize("draft_tokens", [1, 3])
def test_speculative_respects_stops(trained, draft_tokens):
    prompts = [[5, 6, 7, 8], [20, 21]]
    cfg = dsjax.SamplingConfig(max_new_tokens=12, temperature=0.0, use_eos=False, stop_ids=(14,))
    plain = dsjax.generate(trained, prompts, sampling=cfg)
    spec = speculative_generate(trained, prompts, sampling=cfg, draft_tokens=draft_tokens)
    assert spec.output.to_lists() == plain.to_lists()
    assert spec.output.to_lists()[0][-1] == 14 and int(spec.output.lengths[0]) == 6
    np.testing.assert_array_equal(spec.output.tokens, plain.tokens)  # padded after the stop, too


def test_speculative_needs_an_mtp_module():
    model = dsjax.Transformer(dsjax.configs.tiny(num_nextn_predict_layers=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no MTP module"):
        speculative_generate(model, [[1, 2]], sampling=dsjax.SamplingConfig(temperature=0.0, max_new_tokens=2))


def _exact_marginals(model, prompt, cfg, depth):
    """Exact distributions of generated tokens 1..depth under plain sampling with ``cfg`` (temperature, top-k),
    by enumerating the (truncated) supports of the earlier tokens: ``[{token: probability}] * depth``."""
    from dsjax.inference.sampling import _log_probs

    graphdef, state = nnx.split(model)
    last = jax.jit(lambda st, ids: _log_probs(nnx.merge(graphdef, st)(ids).logits[:, -1].astype(jnp.float32),
                                              cfg)[1])
    prefixes = {(): 1.0}
    out = []
    for _ in range(depth):
        seqs = list(prefixes)
        ids = jnp.asarray([list(prompt) + list(s) for s in seqs], jnp.int32)
        probs = np.exp(np.asarray(last(state, ids), np.float64))
        marg, nxt = {}, {}
        for s, row in zip(seqs, probs):
            for v in np.flatnonzero(row > 0):
                pv = prefixes[s] * row[v]
                marg[int(v)] = marg.get(int(v), 0.0) + pv
                nxt[s + (int(v),)] = pv
        out.append(marg)
        prefixes = nxt
    return out


def _chi2(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic over bins with >= 5 expected counts (the rest pooled), and its degrees of freedom."""
    big = [v for v in expected if expected[v] * n >= 5]
    obs = [counts.get(v, 0) for v in big] + [n - sum(counts.get(v, 0) for v in big)]
    exp = [expected[v] * n for v in big] + [n * (1 - sum(expected[v] for v in big))]
    pairs = [(o, e) for o, e in zip(obs, exp) if e > 1e-9]
    return sum((o - e) ** 2 / e for o, e in pairs), len(pairs) - 1


# (0, 0.7): no top-k at a low temperature runs with --runslow (CI time); the same two branches run in the others
@pytest.mark.parametrize("top_k,temperature,draft_tokens,which", [
    (4, 1.0, 1, "untrained"), pytest.param(0, 0.7, 1, "untrained", marks=pytest.mark.slow), (4, 8.0, 2, "trained")])
def test_speculative_sampling_preserves_the_sampling_distribution(trained, top_k, temperature, draft_tokens, which):
    """temperature > 0: speculative sampling (accept d with min(1, p/q), else resample from norm(max(0, p - q)),
    bonus token after an accepted draft). An untrained model's MTP drafts are far from the main model, so both the
    accept and the residual branch run. The marginals of generated tokens 1-3 over 4,000 rows match the exact
    ones of plain sampling (chi-square within 5 sigma of its degrees of freedom), and the reported log-probs are
    log softmax(logits / temperature) of the full forward at the sampled tokens. Two drafts per forward: the model
    trained on counting, at a temperature (8) where its drafts are kept mostly but rejected often enough, at both
    depths, to test both branches of each."""
    model = trained if which == "trained" else dsjax.Transformer(
        dsjax.configs.tiny(num_hidden_layers=2, vocab_size=48), rngs=nnx.Rngs(7))
    prompt, n = [5, 6, 7], 4000
    cfg = dsjax.SamplingConfig(max_new_tokens=3, temperature=temperature, top_k=top_k, use_eos=False,
                               length_bucket=8)
    spec = speculative_generate(model, [prompt] * n, sampling=cfg, key=jax.random.key(11), draft_tokens=draft_tokens)
    toks = np.asarray(spec.output.tokens)
    assert np.all(np.asarray(spec.output.lengths) == 3)
    acc, drafts = int(np.sum(spec.accepted)), int(np.sum(spec.drafts))
    assert acc >= 50 and drafts - acc >= 50, (acc, drafts)               # both branches exercised
    kept_last = int(np.sum(spec.accepted_by_depth[:, -1]))
    assert draft_tokens == 1 or kept_last >= 50, kept_last                # k = 2: the chained draft kept, too
    for depth, exact in enumerate(_exact_marginals(model, prompt, cfg, 3)):
        vals, cnt = np.unique(toks[:, depth], return_counts=True)
        stat, df = _chi2(dict(zip(vals.tolist(), cnt.tolist())), exact, n)
        assert stat < df + 5 * np.sqrt(2 * df), (depth, stat, df)
        assert set(vals.tolist()) <= set(exact)                         # never outside the truncated support
    # log-probs: the main model's log softmax(logits / T) at each sampled token (rows 0..7)
    seqs = jnp.asarray([prompt + toks[r].tolist() for r in range(8)], jnp.int32)
    lp = jax.nn.log_softmax(model(seqs).logits[:, 2:-1].astype(jnp.float32) / temperature, axis=-1)
    want = np.take_along_axis(np.asarray(lp), toks[:8, :, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(spec.output.logprobs[:8]), want, atol=1e-4)


def test_always_accepting_the_draft_would_fail_that_test():
    """The chi-square check has power: the draft distribution alone (what a sampler that always kept the MTP
    draft would emit for token 2) is far from the exact marginal."""
    from dsjax.inference.sampling import _log_probs
    from dsjax.model import init_cache, mtp_draft_step

    model = dsjax.Transformer(dsjax.configs.tiny(num_hidden_layers=2, vocab_size=48), rngs=nnx.Rngs(7))
    prompt, n = [5, 6, 7], 4000
    cfg = dsjax.SamplingConfig(max_new_tokens=3, temperature=1.0, top_k=4, use_eos=False)
    exact = _exact_marginals(model, prompt, cfg, 2)
    # the MTP draft for token 2 given token 1 = a, mixed over a ~ p(token 1)
    out = model(jnp.asarray([prompt], jnp.int32), return_hidden=True, compute_logits=False)
    draft = {}
    for a, pa in exact[0].items():
        nxt = jnp.asarray([prompt[1:] + [a]], jnp.int32)
        pos = jnp.arange(3, dtype=jnp.int32)[None]
        h, _ = mtp_draft_step(model, 0, out.hidden, nxt, pos, init_cache(model.cfg.replace(num_hidden_layers=1), 1, 8),
                              0)
        q = np.exp(np.asarray(_log_probs(model.logits_f32(h[:, -1]), cfg)[1][0], np.float64))
        for v in np.flatnonzero(q > 0):
            draft[int(v)] = draft.get(int(v), 0.0) + pa * q[v]
    counts = {v: int(round(p * n)) for v, p in draft.items()}
    stat, df = _chi2(counts, exact[1], n)
    assert stat > df + 5 * np.sqrt(2 * df), (stat, df)
