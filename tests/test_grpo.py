"""GRPO on hand-computed cases: advantages, clipping, KL estimators, aggregation, one update on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax.configs import ConfigError
from dsjax.rl.grpo import (GRPOConfig, completion_arrays, deepseekmath, grpo_token_loss, group_advantages,
                           make_grpo_step, r1_zero)
from dsjax.train import OptimConfig, split_model


def test_advantages():
    r = jnp.array([0.0, 1.0, 1.0, 1.0, 0.5, 0.5])
    a = group_advantages(r, 2)
    np.testing.assert_allclose(a, [-1, 1, 0, 0, 0, 0], atol=1e-3)  # population std: G=2, {0,1} -> +-1
    for kw in (dict(), dict(scale="batch"), dict(scale="none"), dict(rloo=True)):
        a = group_advantages(jnp.array([0.0, 1, 3, 2, 2, 2]), 3, **kw)
        np.testing.assert_allclose(a.reshape(2, 3).sum(1), 0.0, atol=1e-5)
        np.testing.assert_allclose(a[3:], 0.0, atol=1e-6)  # equal rewards -> zero advantage
    np.testing.assert_allclose(group_advantages(jnp.array([0.0, 1, 2]), 3, rloo=True, scale="none"),
                               [-1.5, 0.0, 1.5])
    np.testing.assert_allclose(group_advantages(jnp.array([0.0, 1, 2]), 3, scale="none"), [-1, 0, 1])


def test_clipping_and_kl():
    cfg = GRPOConfig(beta=0.0, eps_low=0.2, eps_high=0.28)
    old = jnp.zeros((1, 4))
    adv = jnp.array([1.0])

    def grads(logp, adv):
        return jax.grad(lambda lp: grpo_token_loss(lp, old, None, adv, cfg)[0].sum())(logp)

    lp = jnp.log(jnp.array([[0.5, 1.0, 1.2, 1.5]]))  # ratios 0.5, 1, 1.2, 1.5
    g = grads(lp, adv)
    assert np.all(np.asarray(g[0, :3]) != 0) and float(g[0, 3]) == 0.0  # A > 0: clipped above 1.28 only
    g = grads(lp, -adv)
    assert float(g[0, 0]) == 0.0 and np.all(np.asarray(g[0, 1:]) != 0)  # A < 0: clipped below 0.8 only
    # KL estimators on a large drift stay finite (log-ratios clamped before exp)
    logp = jnp.array([[0.0, -1000.0]])
    ref = jnp.array([[-1000.0, 0.0]])
    for est in ("k1", "k2", "k3"):
        c = GRPOConfig(beta=0.1, kl_estimator=est)
        loss, diag = grpo_token_loss(logp, logp, ref, jnp.array([0.0]), c)
        assert bool(jnp.all(jnp.isfinite(loss))) and bool(jnp.all(diag["kl"] >= 0)) or est == "k1"
        assert bool(jnp.all(jnp.isfinite(jax.grad(lambda l: grpo_token_loss(l, l, ref, jnp.array([0.0]), c)[0].sum())(
            logp))))
    # k3 value by hand: d = ref - lp = -0.5 -> exp(-0.5) + 0.5 - 1
    _, diag = grpo_token_loss(jnp.array([[0.0]]), jnp.array([[0.0]]), jnp.array([[-0.5]]), jnp.array([0.0]),
                              GRPOConfig(beta=1.0))
    np.testing.assert_allclose(diag["kl"], [[np.exp(-0.5) - 0.5]], rtol=1e-6)


def test_config_validation_and_presets():
    with pytest.raises(ConfigError, match="num_generations=1"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="loss_agg='mean'"):
        GRPOConfig(loss_agg="mean")
    assert deepseekmath().beta == 0.04 and deepseekmath().eps_low == 0.2
    assert r1_zero().beta == 0.001 and r1_zero().num_generations == 16 and r1_zero().ref_update_every == 400


def test_completion_layout():
    arr = completion_arrays(np.array([[0, 5, 6], [7, 8, 9]]), np.array([2, 3]), np.array([[10, 11, 0], [12, 0, 0]]),
                            np.array([2, 1]))
    np.testing.assert_array_equal(arr["tokens"][0], [0, 5, 6, 10, 11, 0])
    np.testing.assert_array_equal(arr["segment_ids"][0], [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(arr["positions"][0], [0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(arr["completion_mask"][0], [0, 0, 1, 1, 0, 0])  # predicts 10 and 11
    np.testing.assert_array_equal(arr["completion_mask"][1], [0, 0, 1, 0, 0, 0])
    masked = completion_arrays(np.array([[0, 5, 6]]), np.array([2]), np.array([[10, 11, 12]]), np.array([3]),
                               truncated_mask=np.array([True]))
    assert masked["completion_mask"].sum() == 0


@pytest.fixture(scope="module")
def tiny_grpo():
    cfg = dsjax.configs.tiny(num_hidden_layers=2)
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
    g, p, r = split_model(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, 500, size=(4, 6))
    comps = rng.integers(3, 500, size=(4, 5))
    batch = completion_arrays(prompts, np.full(4, 6), comps, np.array([5, 3, 4, 5]))
    return g, p, r, {k: jnp.asarray(v) for k, v in batch.items()}


def test_loss_aggregations_on_hand_made_arrays():
    """The three aggregation rules on a 2-row batch with 3 and 1 valid tokens (max length 4)."""
    from dsjax.rl.grpo import _aggregate

    x = jnp.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    got = {agg: float(_aggregate(x, mask, GRPOConfig(loss_agg=agg), jnp.float32(2), jnp.float32(4), 4))
           for agg in ("seq_mean_token_mean", "token_mean", "dr_grpo")}
    assert got == pytest.approx({"seq_mean_token_mean": (2.0 + 4.0) / 2, "token_mean": 10.0 / 4,
                                 "dr_grpo": 10.0 / (2 * 4)})


# the other aggregations' analytic values on a model run with --runslow (their rules: the test above)
@pytest.mark.parametrize("agg", ["seq_mean_token_mean", pytest.param("token_mean", marks=pytest.mark.slow),
                                 pytest.param("dr_grpo", marks=pytest.mark.slow)])
def test_first_inner_update_has_ratio_one_and_analytic_loss(tiny_grpo, agg):
    g, p, r, batch = tiny_grpo
    gcfg = GRPOConfig(num_generations=2, beta=0.0, loss_agg=agg, max_new_tokens=5)
    init, log_probs, update = make_grpo_step(gcfg, OptimConfig(learning_rate=1e-3, warmup_steps=0), 10, g, p, r)
    params, rest = nnx.to_pure_dict(p), nnx.to_pure_dict(r)
    state = init(params, rest)
    old = log_probs(params, rest, batch)
    adv = jnp.array([1.0, -1.0, 0.5, -0.5])
    b = {**batch, "old_logp": old, "ref_logp": old, "advantages": adv}
    new, m = jax.jit(update)(state, b)
    np.testing.assert_allclose(m["ratio_mean"], 1.0, atol=1e-5)
    lens = np.asarray(batch["completion_mask"]).sum(1)
    if agg == "seq_mean_token_mean":
        expected = float(np.mean(-np.asarray(adv)))  # every row's token mean is -A_i
    elif agg == "token_mean":
        expected = float(np.sum(-np.asarray(adv) * lens) / lens.sum())
    else:
        expected = float(np.sum(-np.asarray(adv) * lens) / (4 * 5))
    np.testing.assert_allclose(m["loss"], expected, atol=1e-5)
    assert float(m["grad_norm"]) > 0 and int(m["skipped"]) == 0
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0
    # an all-equal reward batch (zero advantages) gives a zero policy gradient
    zero = {**b, "advantages": jnp.zeros(4)}
    _, m0 = jax.jit(update)(state, zero)
    assert float(m0["grad_norm"]) == 0.0
    # without old_logp (one update per rollout) the old policy is the current one: same loss and gradient
    no_old = {k: v for k, v in b.items() if k != "old_logp"}
    new2, m2 = jax.jit(update)(state, no_old)
    np.testing.assert_allclose(m2["loss"], m["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m["grad_norm"], rtol=1e-4)
    np.testing.assert_allclose(m2["ratio_mean"], 1.0, atol=1e-7)


def test_reference_refresh(tiny_grpo):
    g, p, r, batch = tiny_grpo
    gcfg = GRPOConfig(num_generations=2, beta=0.04, ref_update_every=2, max_new_tokens=5)
    init, log_probs, update = make_grpo_step(gcfg, OptimConfig(learning_rate=1e-2, warmup_steps=0), 10, g, p, r)
    params, rest = nnx.to_pure_dict(p), nnx.to_pure_dict(r)
    state = init(params, rest)
    old = log_probs(params, rest, batch)
    b = {**batch, "old_logp": old, "ref_logp": old, "advantages": jnp.array([1.0, -1.0, 0.5, -0.5])}
    step = jax.jit(update)
    state, m = step(state, b)
    assert "kl" in m and float(m["kl"]) >= 0
    diff = lambda s: max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s.params,
                                                        s.ref_params)))
    assert diff(state) > 0           # reference frozen after step 1
    state, _ = step(state, b)
    assert diff(state) == 0.0        # refreshed at step 2


def test_trainer_runs_end_to_end_on_cpu():
    """Two GRPO steps of the host loop on a tiny random model: rollouts, rewards, advantages, updates, metrics."""
    import itertools

    from dsjax.data import DataConfig, make_tokenizer
    from dsjax.data.synthetic import arithmetic_example
    from dsjax.rl.rewards import make_rewards
    from dsjax.rl.trainer import GRPOTrainer, greedy_accuracy

    tok = make_tokenizer(DataConfig())
    model = dsjax.Transformer(dsjax.configs.tiny(num_hidden_layers=2), rngs=nnx.Rngs(0))
    rewards = make_rewards(["accuracy", ("format", 0.5)])
    cfg = GRPOConfig(num_generations=2, beta=0.01, max_new_tokens=8, mu=2, minibatches=2)
    trainer = GRPOTrainer(model, tok, rewards, cfg, steps=2, prompts_per_step=2, log_samples_every=1)
    stream = (arithmetic_example(0, i) for i in itertools.count())
    logs = []
    history = trainer.train(stream, 2, log_fn=logs.append)
    assert len(history) == 2 and any("sample (reward" in line for line in logs)
    for k in ("reward_mean", "reward/accuracy", "reward/format", "frac_reward_zero_std", "completion_len_mean",
              "truncated_ratio", "kl", "clip_frac_low", "ratio_mean", "policy_loss", "grad_norm", "lr",
              "rollout_tokens_per_s", "time_train_s", "entropy"):
        assert k in history[-1], k
    assert int(trainer.state.step) == 2 * cfg.mu * cfg.minibatches
    assert 0.0 < history[-1]["entropy"] <= np.log(model.cfg.vocab_size) + 1e-4
    acc = greedy_accuracy(trainer.model(), tok, [arithmetic_example(9, i) for i in range(3)], rewards,
                          max_new_tokens=8)
    assert 0.0 <= acc["accuracy"] <= 1.0


def test_trainer_resumes_from_checkpoints_along_the_same_trajectory(tmp_path):
    """A GRPO run cut by a time limit after every step and resumed from its checkpoint in a fresh trainer (as a run
    split over several processes) ends with the same state and metrics as one uninterrupted run."""
    import itertools

    from dsjax.data import DataConfig, make_tokenizer
    from dsjax.data.synthetic import arithmetic_example
    from dsjax.rl.rewards import Reward, make_rewards
    from dsjax.rl.trainer import GRPOTrainer

    tok = make_tokenizer(DataConfig())
    cfg_m = dsjax.configs.tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    rewards = make_rewards([Reward("even", lambda text, ex: float(len(text) % 2 == 0))])   # varies at random init
    cfg = GRPOConfig(num_generations=4, beta=0.01, max_new_tokens=6, temperature=1.5, dynamic_sampling=True)

    def fresh():
        model = dsjax.Transformer(cfg_m, rngs=nnx.Rngs(0))
        # 4 prompts sampled per rollout, at most 2 groups trained, a refill only when no group disagrees
        return GRPOTrainer(model, tok, rewards, cfg, steps=2, prompts_per_step=2, log_samples_every=100,
                           rollout_multiplier=2, min_prompts_per_step=1)

    def stream():
        return (arithmetic_example(0, i) for i in itertools.count())

    straight = fresh()
    ref = straight.train(stream(), log_fn=lambda s: None)
    runs, logs = 0, []
    while True:
        t = fresh()
        hist = t.train(stream(), log_fn=logs.append, checkpoint_dir=tmp_path / "grpo", checkpoint_every=10,
                       time_limit_s=0.0)
        runs += 1
        if t.finished:
            break
        assert runs < 5
    assert runs == 2 and sum("resumed GRPO" in line for line in logs) == 1
    assert [d.name for d in (tmp_path / "grpo").iterdir() if d.name.isdigit()] == ["2"]   # keep 1
    assert [h["step"] for h in hist] == [1, 2]
    timing = lambda d: {k: v for k, v in d.items() if "time" not in k and "per_s" not in k}  # noqa: E731
    assert [timing(a) for a in hist] == [timing(b) for b in ref]
    assert any("reward_mean" in h for h in hist)
    assert all(h.get("prompts", 0) <= 2 for h in hist)
    assert all(h["rollout_batches"] == 1 for h in hist if "reward_mean" in h)   # no refills
    for x, y in zip(jax.tree.leaves(t.state), jax.tree.leaves(straight.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # a trainer of another model refuses the checkpoint with the mismatched paths, and keeps its own state
    from dsjax.checkpoint import CheckpointMismatchError

    cfg_other = dsjax.configs.tiny(num_hidden_layers=1, num_nextn_predict_layers=0)
    other = GRPOTrainer(dsjax.Transformer(cfg_other, rngs=nnx.Rngs(0)), tok, rewards, cfg, steps=4, prompts_per_step=2)
    with pytest.raises(CheckpointMismatchError, match="does not match the current configuration"):
        other.train(stream(), log_fn=lambda s: None, checkpoint_dir=tmp_path / "grpo")
    assert other.state is not None and jax.tree.leaves(other.state)


def test_token_entropy_matches_direct_computation():
    from dsjax.train.losses import token_log_probs

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 5)))
    lp, ent = token_log_probs(hidden, lambda h: h @ w, targets, 0.7, chunk_tokens=3, with_entropy=True)
    logits = np.asarray(hidden @ w, np.float64) / 0.7
    logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(ent, -(np.exp(logq) * logq).sum(-1), rtol=1e-5, atol=1e-5)  # float32 sums
    np.testing.assert_allclose(lp, np.take_along_axis(logq, np.asarray(targets)[..., None], -1)[..., 0], rtol=1e-5)
    np.testing.assert_allclose(token_log_probs(hidden, lambda h: h @ w, targets, 0.7, chunk_tokens=3), lp, rtol=1e-6)


def test_rejection_sampling_keeps_accepted_unique_completions_and_writes_sft_jsonl(tmp_path):
    import json

    from dsjax.data import DataConfig, make_dataset, make_tokenizer
    from dsjax.rl import rejection_sample
    from dsjax.rl.rewards import Reward, make_rewards

    tok = make_tokenizer(DataConfig(source="arithmetic"))
    model = dsjax.Transformer(dsjax.configs.tiny(vocab_size=tok.vocab_size, num_nextn_predict_layers=0),
                              rngs=nnx.Rngs(0))
    even = Reward("even", lambda text, ex: float(len(text) % 2 == 0))
    rewards = make_rewards([even])
    examples = [{"prompt": f"Q: {i}+1=?\nA: ", "answer": str(i + 1)} for i in range(3)]
    out = tmp_path / "rs" / "sft.jsonl"
    rows, stats = rejection_sample(model, tok, examples, rewards, num_samples=6, temperature=1.5,
                                   max_new_tokens=6, required={"even": 1.0}, keep_per_prompt=2, out_path=out,
                                   prompts_per_batch=2, drop_truncated=False)
    assert stats.prompts == 3 and stats.generated == 18 and 0 < stats.accepted < 18, stats
    assert stats.written == len(rows) <= 6 and stats.prompts_kept == len({r["prompt"] for r in rows})
    for p in {r["prompt"] for r in rows}:
        kept = [r["completion"] for r in rows if r["prompt"] == p]
        assert len(kept) == len(set(kept)) <= 2
    assert all(len(r["completion"]) % 2 == 0 and r["reward"] == 1.0 for r in rows)
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert abs(stats.reward_means["even"] - stats.accepted / stats.generated) < 1e-6
    if rows:  # the file is SFT data as it stands
        batch = next(iter(make_dataset(DataConfig(source="sft", paths=(str(out),), seq_len=32, batch_size=1), tok)))
        assert batch["loss_mask"].sum() > 0
    # a random model never finishes in 6 tokens: with truncation dropped, nothing is accepted; unknown names fail
    rows, stats = rejection_sample(model, tok, examples, rewards, num_samples=2, max_new_tokens=6,
                                   required={"even": 0.0}, prompts_per_batch=4)
    assert stats.accepted == 0 and rows == []
    with pytest.raises(ValueError, match="no reward named"):
        rejection_sample(model, tok, examples, rewards, required={"accuracy": 1.0})


def test_trainer_log_probs_equal_the_samplers():
    """The update's log-probs of a rollout (completion_arrays layout: left-padded prompts, positions restarting at
    each prompt) equal the per-token log-probs the sampler returned, so the ratio starts at 1 on-policy."""
    from dsjax.inference import generate_tokens

    model = dsjax.Transformer(dsjax.configs.tiny(num_nextn_predict_layers=0), rngs=nnx.Rngs(3))
    _check_rollout_log_probs(model, generate_tokens)


def _check_rollout_log_probs(model, sampler):
    """Rolls out three prompts with ``sampler(graphdef, state, tokens, lengths, keys, cfg=...) -> GenerateOutput``
    at temperature 0.8 and checks its per-token log-probs against the update's (``sequence_log_probs`` over the
    ``completion_arrays`` layout)."""
    from dsjax.inference import SamplingConfig, pad_prompts
    from dsjax.rl.grpo import sequence_log_probs

    prompts = [[1, 5, 9, 13], [1, 7], [1, 20, 30, 40, 50, 60]]
    tokens, lengths = pad_prompts(prompts, 8)
    s = SamplingConfig(max_new_tokens=10, temperature=0.8, length_bucket=8)
    g, st = nnx.split(model)
    out = sampler(g, st, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.split(jax.random.key(0), 3), cfg=s)
    comp, clen = np.asarray(out.tokens), np.asarray(out.lengths)
    arr = completion_arrays(tokens, lengths, comp, clen)
    lp = np.asarray(sequence_log_probs(model, *(jnp.asarray(arr[k]) for k in ("tokens", "segment_ids", "positions")),
                                       0.8))
    mask = arr["completion_mask"].astype(bool)
    for i in range(3):
        assert mask[i].sum() == clen[i] > 0
        np.testing.assert_allclose(lp[i][mask[i]], np.asarray(out.logprobs)[i, :clen[i]], rtol=1e-4, atol=1e-4)


def test_speculative_rollouts_log_probs_equal_the_updates_and_train():
    """GRPOConfig(speculative_rollouts=True): MTP speculative sampling's per-token log-probs are the update's
    (the ratio starts at 1 on-policy), a trainer step runs and reports the draft acceptance, and a model without
    an MTP module is refused."""
    import itertools

    from dsjax.data import DataConfig, make_tokenizer
    from dsjax.data.synthetic import arithmetic_example
    from dsjax.inference import speculative_generate_tokens
    from dsjax.rl.rewards import make_rewards
    from dsjax.rl.trainer import GRPOTrainer

    model = dsjax.Transformer(dsjax.configs.tiny(num_hidden_layers=2), rngs=nnx.Rngs(3))
    _check_rollout_log_probs(model, lambda *a, **k: speculative_generate_tokens(*a, **k).output)

    tok = make_tokenizer(DataConfig())
    rewards = make_rewards(["accuracy"])
    cfg = GRPOConfig(num_generations=2, beta=0.01, max_new_tokens=8, speculative_rollouts=True)
    trainer = GRPOTrainer(model, tok, rewards, cfg, steps=1, prompts_per_step=2, log_samples_every=100)
    history = trainer.train((arithmetic_example(0, i) for i in itertools.count()), 1, log_fn=lambda x: None)
    assert 0.0 <= history[-1]["rollout_draft_acceptance"] <= 1.0 and np.isfinite(history[-1]["policy_loss"])
    with pytest.raises(ValueError, match="speculative_rollouts"):
        GRPOTrainer(dsjax.Transformer(dsjax.configs.tiny(num_nextn_predict_layers=0), rngs=nnx.Rngs(0)), tok,
                    rewards, cfg, steps=1, prompts_per_step=2)


def test_reward_metrics_cover_every_sampled_completion_under_dynamic_sampling():
    """Dynamic sampling trains only on groups whose rewards differ; the step's reward metrics are over every
    sampled completion (else a policy that gets better shows a flat reward: all-correct groups leave the batch)."""
    import itertools

    from dsjax.data import DataConfig, make_tokenizer
    from dsjax.rl.rewards import Reward
    from dsjax.rl.trainer import GRPOTrainer

    tok = make_tokenizer(DataConfig())
    model = dsjax.Transformer(dsjax.configs.tiny(num_hidden_layers=2), rngs=nnx.Rngs(0))
    # half the prompts always score 1 (their groups agree and are dropped), the others 0/1 by completion length
    reward = Reward("r", lambda c, ex: 1.0 if ex["answer"] == "const" else float(len(c) % 2))
    cfg = GRPOConfig(num_generations=4, beta=0.0, max_new_tokens=8, dynamic_sampling=True)
    trainer = GRPOTrainer(model, tok, [reward], cfg, steps=2, prompts_per_step=4)
    stream = ({"prompt": f"Q{i}: ", "answer": "const" if i % 2 == 0 else "var"} for i in itertools.count())
    history = trainer.train(stream, 2, log_fn=lambda s: None)
    for m in history:
        assert m["frac_reward_zero_std"] >= 0.5 and m["rollout_batches"] >= 1
        assert 0.5 <= m["reward_mean"] <= 1.0 and m["reward/r"] == pytest.approx(m["reward_mean"])
        if "reward_mean_trained" in m:        # the trained groups: only "var" prompts, with mixed rewards
            assert m["reward_mean_trained"] < 1.0 and m["reward_mean"] >= m["reward_mean_trained"]
