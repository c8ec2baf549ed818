"""Writes notebooks/grpo.ipynb (the source of truth for its cells; run it after editing them)."""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("""# GRPO on your own task with dsjax

The public RL API in one page: a **dataset** of prompts (dicts with whatever your reward needs), **reward
functions** `fn(completion_text, example) -> float | None`, a **model**, and `dsjax.rl.GRPOTrainer`. Then held-out
greedy evaluation and rejection sampling into SFT data. Runs on a CPU in about a minute with the `tiny` model.

For a real task, start from a model that can already produce the format (pretrain + SFT, e.g.
`python -m experiments.r1`, then `load_params_from_workdir(...)`); here a freshly initialised `tiny` model learns a
toy preference from scratch so the effect is visible in a few steps."""),
    new_code_cell("""import itertools

import jax
import numpy as np
from flax import nnx

import dsjax
from dsjax.data import DataConfig, make_tokenizer
from dsjax.rl import GRPOTrainer, greedy_accuracy, rejection_sample
from dsjax.rl.grpo import GRPOConfig
from dsjax.rl.rewards import Reward, make_rewards
from dsjax.train import OptimConfig

tok = make_tokenizer(DataConfig())  # the built-in byte tokenizer (pass a tokenizer.json path for a HF one)
cfg = dsjax.configs.tiny(vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
print(jax.devices()[0].platform, cfg.num_hidden_layers, "layers,", cfg.n_routed_experts, "experts")"""),
    new_markdown_cell("""## The task and its rewards

A toy task: after `"Number: "` the model should write digits. `digits` scores the share of digit characters
(None for an empty completion: *not applicable*, logged as NaN and counted as 0 in the total). Rewards run on the
host in a thread pool with a per-call timeout; built-in ones (`accuracy`, `format`, `language_consistency`,
`overlong`, `countdown`) come from the registry by name and can be mixed with yours."""),
    new_code_cell("""def digits(text, example):
    text = text.strip()
    return sum(c.isdigit() for c in text) / len(text) if text else None

rewards = make_rewards([Reward("digits", digits, weight=1.0)])  # e.g. + ["accuracy", ("format", 0.5)]
train_prompts = ({"prompt": f"Number {i % 50}: "} for i in itertools.count())
held_out = [{"prompt": f"Number {i}: "} for i in range(50, 58)]
[r.name for r in rewards]"""),
    new_markdown_cell("""## GRPO

`GRPOConfig` carries the loss (clipping `eps_low`/`eps_high`, KL estimator and `beta`, loss aggregation),
advantage scaling, `mu` inner updates over `minibatches`, dynamic sampling and truncation masking; presets
`deepseekmath()` and `r1_zero()` exist. Each step samples G completions per prompt with `dsjax.generate`, scores
them, and runs the jitted update; the metrics dict has rewards per function, KL, clip fractions, entropy, lengths
and the time split."""),
    new_code_cell("""gcfg = GRPOConfig(num_generations=8, beta=0.0, eps_low=0.2, eps_high=0.28, temperature=1.0, max_new_tokens=16,
                  loss_agg="token_mean", mu=1)
trainer = GRPOTrainer(model, tok, rewards, gcfg, steps=16, prompts_per_step=4, log_samples_every=8,
                      optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0))
before = greedy_accuracy(trainer.model(), tok, held_out, rewards, max_new_tokens=16)
history = trainer.train(train_prompts, 16)
after = greedy_accuracy(trainer.model(), tok, held_out, rewards, max_new_tokens=16)
print(f"held-out greedy 'digits' reward: {before['digits']:.3f} -> {after['digits']:.3f}")
assert after["digits"] > before["digits"] + 0.3, "GRPO did not learn the toy preference"
print({k: round(v, 4) for k, v in history[-1].items() if k in ("reward_mean", "kl", "entropy", "clip_frac_high",
                                                                "completion_len_mean", "time_rollout_s")})"""),
    new_code_cell("""import matplotlib.pyplot as plt

steps = [h["step"] for h in history if "reward_mean" in h]
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot(steps, [h["reward_mean"] for h in history if "reward_mean" in h]); ax[0].set_title("mean reward")
ax[1].plot(steps, [h["entropy"] for h in history if "reward_mean" in h]); ax[1].set_title("policy entropy")
for a in ax:
    a.set_xlabel("GRPO step")
fig.tight_layout()"""),
    new_markdown_cell("""## Rejection sampling into SFT data

Sample N completions per prompt from the trained policy, keep the ones the rewards accept (here: `digits >= 0.9`
and a finished completion), dedupe, keep the shortest, and write JSONL that `DataConfig(source="sft", ...)` reads
for the next SFT round."""),
    new_code_cell("""import tempfile, pathlib

out = pathlib.Path(tempfile.mkdtemp()) / "rs.jsonl"
rows, stats = rejection_sample(trainer.model(), tok, held_out, rewards, num_samples=8, temperature=1.0,
                               max_new_tokens=16, required={"digits": 0.9}, drop_truncated=False, out_path=out)
print(f"accepted {stats.accepted}/{stats.generated} ({stats.acceptance_rate:.0%}), wrote {stats.written} rows to {out.name}")
rows[:2]"""),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"display_name": "Python 3", "language": "python",
                                                        "name": "python3"}})
path = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "grpo.ipynb"
nbformat.write(nb, path)
print("wrote", path)
