"""The R1 recipe in miniature: pretrain on task text, cold-start SFT on formatted reasoning, GRPO with rule-based
rewards, and held-out greedy accuracy after each stage.

    python -m experiments.r1 --preset=cpu --workdir=workdirs/r1-cpu      # tiny model, 10 minutes on 2 CPU cores
    python -m experiments.r1 --preset=gpu --workdir=workdirs/r1-gpu      # small model, one GPU, 27 minutes
    python -m experiments.r1 --preset=gpu --workdir=workdirs/r1-gpu --grpo_time_limit_min=8  # in parts (see below)

The presets run in one process within a wall-clock budget (``--time_budget_min``: 10 and 27 minutes; GRPO stops
early enough for the final evaluation, the report says how many of the planned steps ran; ``inf`` lifts it).
With ``--grpo_time_limit_min`` instead, GRPO is checkpointed and split over jobs: repeat the command until it
prints the report; every stage resumes from its checkpoints and GRPO continues on the same trajectory. (Under a
hard per-job limit always pass the time limit -- a job killed from outside saves no GRPO checkpoint and no
metrics -- and leave time for start-up: ~2 minutes to restore and compile on an H100, plus ~4.5 minutes of
pretraining and SFT in the first job. On a resumed `gpu` run
set ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``: with JAX's default 75% the GRPO update failed to allocate 33 GiB after
the restore. ``--grpo_checkpoint_every=1000`` keeps the ~16 GB GRPO checkpoints to the forced ones at the limit.)

Task: arithmetic with a scratchpad (dsjax.data.synthetic): prompts ``"Q: 47+85=?\\nA: "``, completions
``"<think>...</think> <answer>132</answer>"``. Stage 1 pretrains on the task text, stage 2 fine-tunes on
prompt/completion pairs (completion-only loss), stage 3 runs GRPO (accuracy + format rewards) on new prompts.
Held-out prompts use another seed. Writes ``<workdir>/r1_report.md`` (table) and ``r1_curves.png``.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["cpu", "gpu"], "Model size and step counts.")
flags.DEFINE_string("workdir", "workdirs/r1", "Run directory (one sub-folder per stage).")
flags.DEFINE_integer("eval_examples", None, "Override the preset's held-out prompts for greedy accuracy.")
flags.DEFINE_integer("pre_steps", None, "Override the preset's pretraining steps.")
flags.DEFINE_integer("sft_steps", None, "Override the preset's SFT steps.")
flags.DEFINE_integer("grpo_steps", None, "Override the preset's GRPO steps.")
flags.DEFINE_float("grpo_lr", None, "Override the preset's GRPO learning rate.")
flags.DEFINE_float("sft_lr", None, "Override the preset's SFT learning rate.")
flags.DEFINE_integer("prompts", None, "Override the preset's prompts per GRPO step.")
flags.DEFINE_integer("G", None, "Override the preset's completions per prompt.")
flags.DEFINE_integer("mu", None, "Override the preset's GRPO inner updates per rollout batch (PPO-style epochs).")
flags.DEFINE_integer("minibatches", None, "Override the preset's GRPO optimizer steps per inner update.")
flags.DEFINE_bool("dynamic_sampling", None, "Override the preset's GRPO dynamic sampling (drop groups whose rewards "
                  "all agree and refill with new prompts: costs extra rollouts).")
flags.DEFINE_integer("rollout_multiplier", None, "Override the preset's prompts sampled per rollout, as a multiple "
                     "of --prompts (with dynamic sampling).")
flags.DEFINE_integer("min_prompts", None, "Override the preset's least disagreeing groups a step trains on before "
                     "dynamic sampling refills (default: --prompts; lower skips refills, the update keeps its shape).")
flags.DEFINE_float("temperature", None, "Override the preset's GRPO sampling temperature (the policy trained is the "
                   "tempered one; > 1 keeps more groups disagreeing when the policy's entropy is low).")
flags.DEFINE_bool("speculative_rollouts", False, "GRPO rollouts by MTP speculative sampling (same distribution as "
                  "plain sampling; the policy's MTP module drafts).")
flags.DEFINE_string("ops", None, "Override the preset's operators (subset of '+-*').")
flags.DEFINE_integer("digits", None, "Override the preset's most digits per operand (1..5).")
flags.DEFINE_integer("rejection_prompts", 64, "After GRPO: rejection-sample this many prompts (0: skip).")
flags.DEFINE_float("grpo_time_limit_min", None, "Stop GRPO after this many minutes of this process (checkpointed); "
                   "running the same command again resumes every stage where it stopped, so a long run can be split "
                   "over several jobs (e.g. sessions with a per-command time limit).")
flags.DEFINE_integer("grpo_checkpoint_every", 20, "GRPO checkpoint interval in steps (<workdir>/grpo).")
flags.DEFINE_float("time_budget_min", None, "Wall-clock budget of the whole run in this process, in minutes "
                   "(default: the preset's, unless --grpo_time_limit_min is given; 'inf': none): GRPO runs until the "
                   "planned steps or until what is left of the budget drops to --eval_reserve_s, then the run "
                   "evaluates and reports as usual (the report names the GRPO steps that ran). No GRPO checkpoints "
                   "in this mode (one process runs every stage).")
flags.DEFINE_float("eval_reserve_s", 90.0, "With --time_budget_min: seconds kept for the final held-out evaluation.")

PRESETS = {
    # cpu: 10 minutes of wall clock on 2 cores (pretraining + SFT ~2 minutes, GRPO ~100 steps of ~3.7 s)
    "cpu": dict(model="tiny", ops="+", digits=2, pre_steps=600, sft_steps=150, grpo_steps=300, seq_len=128, batch=16,
                G=8, prompts=32, lr=2e-3, sft_lr=2e-4, grpo_lr=5e-5, max_new=96, mu=1, minibatches=1,
                dynamic_sampling=True, rollout_multiplier=1, eval_examples=128, time_budget_min=10.0, temperature=1.0,
                min_prompts=None),
    # gpu: sized for the budget of 30 minutes on one GPU (~3.3 s per GRPO step on an H200 measured at
    # 16 x G16); earlier runs: 50 steps at lr 1e-5 and 80 at 5e-5 both gave +9.3 points with the sampled accuracy
    # still rising, 160 at 3e-5 +11.7, 313 at 3e-5 (27-minute budget) +15.4; 262 at 5e-5 only +10.1: entropy fell
    # faster and more groups agreed (docs/r1.md); with min_prompts=8 (refill only below 8 disagreeing groups) steps
    # took ~2.4 s instead of 3.5-4 s: 436 and 409 steps, +22.7 and +22.1 on two H100s (session 7). Two thirds of the
    # groups agree, so each rollout samples 3 x 16 prompts (one decode batch of 768) instead of refilling 16 at a time
    # (4 x 16 was not faster)
    "gpu": dict(model="small", ops="+-*", digits=3, pre_steps=200, sft_steps=100, grpo_steps=600, seq_len=256,
                batch=32, G=16, prompts=16, lr=1e-3, sft_lr=3e-4, grpo_lr=3e-5, max_new=160, mu=1, minibatches=1,
                dynamic_sampling=True, rollout_multiplier=3, eval_examples=512, time_budget_min=27.0, temperature=1.0,
                min_prompts=8),
}


def plot_curves(history: list[dict], path) -> None:
    """Mean reward, sampled accuracy and completion length over GRPO steps (raw and EMA) to a PNG."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "reward_mean" in h]
    steps = [h["step"] for h in rows]

    def smooth(v, a=0.9):
        out, m = [], None
        for x in v:
            m = x if m is None else a * m + (1 - a) * x
            out.append(m)
        return out

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
    for a, key, title in ((ax[0], "reward_mean", "mean reward"),
                          (ax[1], "reward/accuracy", "accuracy reward (all sampled completions)"),
                          (ax[2], "completion_len_mean", "completion length (tokens)")):
        v = [h.get(key, float("nan")) for h in rows]
        a.plot(steps, v, alpha=0.35, color="C0")
        a.plot(steps, smooth(v), color="C0", label="EMA 0.9")
        a.set_title(title)
        a.set_xlabel("GRPO step")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reward_trend(history: list[dict]) -> str:
    """Mean sampled reward and accuracy over the first and the last fifth of the GRPO steps (steps whose every
    group agreed carry no reward metrics and are left out)."""
    rows = [h for h in history if "reward_mean" in h]
    if len(rows) < 2:
        return "Reward trend: too few GRPO steps with rewards."
    n = max(1, len(rows) // 5)

    def mean(part, key):
        vals = [h[key] for h in part if key in h]
        return sum(vals) / max(len(vals), 1)

    first, last = rows[:n], rows[-n:]
    return (f"Sampled reward (mean over the first / last {n} GRPO steps with rewards): "
            f"{mean(first, 'reward_mean'):.3f} -> {mean(last, 'reward_mean'):.3f}; sampled accuracy "
            f"{mean(first, 'reward/accuracy'):.3f} -> {mean(last, 'reward/accuracy'):.3f}.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from dsjax.data import make_tokenizer
    from dsjax.data.synthetic import arithmetic_example, write_arithmetic_jsonl
    from dsjax.rl.grpo import GRPOConfig
    from dsjax.rl.rewards import make_rewards
    from dsjax.rl.trainer import GRPOTrainer, greedy_accuracy
    from dsjax.train import OptimConfig
    from dsjax.train import config as tc
    from dsjax.train.loop import load_params_from_workdir, run

    p = dict(PRESETS[FLAGS.preset])
    for k in ("pre_steps", "sft_steps", "grpo_steps", "grpo_lr", "sft_lr", "prompts", "G", "ops", "digits", "mu",
              "minibatches", "dynamic_sampling", "rollout_multiplier", "eval_examples", "temperature",
              "min_prompts"):
        if getattr(FLAGS, k) is not None:
            p[k] = getattr(FLAGS, k)
    if FLAGS.min_prompts is None and p["min_prompts"] is not None:
        p["min_prompts"] = min(p["min_prompts"], p["prompts"])  # the preset's value under a smaller --prompts
    grpo_steps = p["grpo_steps"]
    task = dict(ops=p["ops"], max_digits=p["digits"])
    root = pathlib.Path(FLAGS.workdir)
    root.mkdir(parents=True, exist_ok=True)
    quiet = dict(log_fn=lambda s: print("   ", s, flush=True))
    base = [f"data.seq_len={p['seq_len']}", f"data.batch_size={p['batch']}", "tensorboard=false",
            "progress_bar=false", "log_every=50"]
    model_cfg = tc.get("tiny" if p["model"] == "tiny" else "small").model
    rewards = make_rewards(["accuracy", ("format", 0.5)])
    held_out = [arithmetic_example(10_000, i, **task) for i in range(p["eval_examples"])]
    report = []
    t0 = time.perf_counter()
    stages_file = root / "r1_stages.json"   # held-out scores of finished stages (a resumed run re-uses them)
    stages = json.loads(stages_file.read_text()) if stages_file.exists() else {}

    ops = list(p["ops"])

    def op_of(ex):   # prompts read "Q: 47+85=?\nA: "
        return next((c for c in ex["prompt"] if c in "+-*"), "?")

    def evaluate(stage, model, tok):
        if stage in stages:
            scores = stages[stage]
        else:
            scores = greedy_accuracy(model, tok, held_out, rewards, max_new_tokens=p["max_new"], group_fn=op_of)
            stages[stage] = {k: float(v) for k, v in scores.items()}
            stages_file.write_text(json.dumps(stages, indent=1))
        per_op = [scores.get(f"accuracy/{o}", float("nan")) for o in ops]
        report.append((stage, scores.get("accuracy", float("nan")), scores.get("format", float("nan")), per_op))
        print(f"== {stage}: held-out greedy accuracy {scores.get('accuracy', 0):.3f} ("
              + ", ".join(f"{o} {a:.3f}" for o, a in zip(ops, per_op)) + f"), format "
              f"{scores.get('format', 0):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    # 1. pretraining on task text
    pre = tc.apply_overrides(tc.get(p["model"] if p["model"] == "tiny" else "small"), base + [
        "data.source=arithmetic", f"data.arithmetic_ops={p['ops']}", f"data.arithmetic_max_digits={p['digits']}",
        f"steps={p['pre_steps']}", f"optim.learning_rate={p['lr']}",
        "optim.warmup_steps=30", f"checkpoint.every={p['pre_steps']}"])
    # a resumed run whose SFT stage finished skips stage 1 entirely (its checkpoints may then be deleted to free
    # disk: the `gpu` preset's pretraining, SFT and GRPO checkpoints take ~16 GB each)
    sft_done = "SFT" in stages and (root / "sft" / "checkpoints").is_dir()
    if sft_done:
        print("== stage 1: pretraining finished earlier (skipped: the SFT stage is done)", flush=True)
        report.append(("pretrained", stages["pretrained"].get("accuracy", float("nan")),
                       stages["pretrained"].get("format", float("nan")),
                       [stages["pretrained"].get(f"accuracy/{o}", float("nan")) for o in ops]))
    else:
        print(f"== stage 1: pretraining {p['model']} for {p['pre_steps']} steps", flush=True)
        run(pre, root / "pretrain", **quiet)
        cfg, model = load_params_from_workdir(root / "pretrain")
        tok = make_tokenizer(cfg.data)
        evaluate("pretrained", model, tok)

    # 2. cold-start SFT on formatted reasoning (completion-only loss)
    sft_data = root / "sft.jsonl"
    write_arithmetic_jsonl(sft_data, 20_000, seed=1, **task)
    sft = tc.apply_overrides(tc.sft_tiny(model=model_cfg), base + [
        "data.source=sft", f"data.paths={sft_data}", f"steps={p['sft_steps']}", f"optim.learning_rate={p['sft_lr']}",
        f"init_from={root / 'pretrain'}", f"checkpoint.every={p['sft_steps']}"])
    print(f"== stage 2: SFT for {p['sft_steps']} steps", flush=True)
    run(sft, root / "sft", **quiet)
    sft_cfg, model = load_params_from_workdir(root / "sft")
    tok = make_tokenizer(sft_cfg.data)
    evaluate("SFT", model, tok)

    # 3. GRPO with accuracy + format rewards on fresh prompts
    gcfg = GRPOConfig(num_generations=p["G"], beta=0.001, eps_low=0.2, eps_high=0.28, temperature=p["temperature"],
                      max_new_tokens=p["max_new"], loss_agg="token_mean", dynamic_sampling=p["dynamic_sampling"],
                      mu=p["mu"], minibatches=p["minibatches"], speculative_rollouts=FLAGS.speculative_rollouts)
    trainer = GRPOTrainer(model, tok, rewards, gcfg, steps=grpo_steps, prompts_per_step=p["prompts"],
                          rollout_multiplier=p["rollout_multiplier"], min_prompts_per_step=p["min_prompts"],
                          optim=OptimConfig(learning_rate=p["grpo_lr"], warmup_steps=0, schedule="constant",
                                            weight_decay=0.0, clip_norm=1.0))
    stream = (arithmetic_example(2, i, **task) for i in itertools.count())
    print(f"== stage 3: GRPO for {grpo_steps} steps (G={p['G']}, {p['prompts']} prompts/step)", flush=True)
    limit = None if FLAGS.grpo_time_limit_min is None else 60 * FLAGS.grpo_time_limit_min
    budget = FLAGS.time_budget_min
    if budget is None and FLAGS.grpo_time_limit_min is None:
        budget = p["time_budget_min"]
    budgeted = budget is not None and math.isfinite(budget)
    if budgeted:
        left = 60 * budget - (time.perf_counter() - t0) - FLAGS.eval_reserve_s
        limit = left if limit is None else min(limit, left)
        print(f"== time budget: {left:.0f}s left for GRPO", flush=True)
    t_grpo = time.perf_counter()
    history = trainer.train(stream, grpo_steps, log_fn=lambda s: print("   ", s, flush=True),
                            checkpoint_dir=None if budgeted else root / "grpo",
                            checkpoint_every=FLAGS.grpo_checkpoint_every, time_limit_s=limit)
    grpo_s = time.perf_counter() - t_grpo
    if budgeted:   # this GRPO ran from the SFT checkpoint again: a score cached by an earlier run is stale
        stages.pop("GRPO", None)
    (root / "grpo_metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    if not trainer.finished and not budgeted:
        plot_curves(history, root / "r1_curves.png")
        print(f"== GRPO stopped at step {len(history)} of {grpo_steps} (time limit); run the same command again "
              f"to resume from {root / 'grpo'}", flush=True)
        return
    evaluate("GRPO", trainer.model(), tok)

    # 4. rejection sampling from the GRPO policy: SFT data for a next round (R1's stage 3)
    rs_line = ""
    if FLAGS.rejection_prompts:
        from dsjax.rl import rejection_sample

        prompts = [arithmetic_example(3, i, **task) for i in range(FLAGS.rejection_prompts)]
        _, st = rejection_sample(trainer.model(), tok, prompts, rewards, num_samples=p["G"], temperature=1.0,
                                 max_new_tokens=p["max_new"], out_path=root / "rejection_sampled.jsonl")
        rs_line = (f"Rejection sampling ({p['G']} samples x {st.prompts} new prompts, accuracy = 1 and format = 1): "
                   f"{st.accepted}/{st.generated} accepted ({st.acceptance_rate:.1%}), {st.prompts_kept} prompts "
                   f"kept, {st.written} rows -> rejection_sampled.jsonl\n")
        print("== stage 4:", rs_line, flush=True)

    lines = ["| stage | held-out greedy accuracy | " + " | ".join(f"accuracy {o}" for o in ops) + " | format rate |",
             "|---|---|" + "---|" * len(ops) + "---|"]
    lines += [f"| {s} | {a:.3f} | " + " | ".join(f"{x:.3f}" for x in per_op) + f" | {f:.3f} |"
              for s, a, f, per_op in report]
    table = "\n".join(lines)
    dev = jax.devices()[0]
    text = (f"# R1 in miniature ({FLAGS.preset} preset, {dev.device_kind}, {time.perf_counter() - t0:.0f}s)\n\n"
            f"{table}\n\nGRPO: {len(history)} of {grpo_steps} steps ({grpo_s / 60:.1f} minutes in this process"
            f"{', stopped by the time budget' if not trainer.finished else ''}), G={p['G']}, {p['prompts']} "
            f"prompts/step, lr {p['grpo_lr']:g}, temperature {p['temperature']:g}, mu={p['mu']}, {p['minibatches']} "
            f"minibatch(es), dynamic sampling {p['dynamic_sampling']} (rollouts of "
            f"{p['rollout_multiplier']} x {p['prompts']} prompts, refilled below "
            f"{p['min_prompts'] or p['prompts']} disagreeing groups); rewards "
            f"accuracy + 0.5 format; {len(held_out)} held-out prompts (seed 10000). Task: ops {p['ops']!r}, up to "
            f"{p['digits']} digits.\n\n{reward_trend(history)}\n\n{rs_line}")
    (root / "r1_report.md").write_text(text)
    print(text)
    plot_curves(history, root / "r1_curves.png")


if __name__ == "__main__":
    app.run(main)
