"""Seconds per GRPO step of dsjax's GRPOTrainer vs TRL's GRPOTrainer on the same model shape, same GPU.

    python -m experiments.bench_grpo --config=small --G=16 --prompts=16 --max_new_tokens=128 --trl --record

One step = ``prompts x G`` completions of ``max_new_tokens`` tokens sampled at temperature 1 (stop tokens
disabled on both sides so every completion has the same length: random weights), rewards on the host, old-policy
and reference log-probs (beta > 0), and one optimizer update on the whole rollout (mu = 1, one minibatch).
The rollout is timed separately from the rest ("update": rewards + log-probs + forward/backward + optimizer).
Medians over the timed steps after ``--warmup`` steps (compilation). TRL runs in a subprocess
(experiments/bench_grpo_trl.py) on the HF transformers DeepseekV3 model of the same config: bf16, sdpa attention,
``grouped_mm`` experts, HF ``generate`` (static cache if it works, else the default), ``loss_type="grpo"``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import statistics
import subprocess
import sys

from absl import app, flags

from experiments.records import append_record

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Model preset.")
flags.DEFINE_integer("G", 16, "Completions per prompt.")
flags.DEFINE_integer("prompts", 16, "Prompts per step.")
flags.DEFINE_integer("max_new_tokens", 128, "Completion length (every completion runs to it).")
flags.DEFINE_float("beta", 0.04, "KL coefficient (> 0: reference log-probs every step).")
flags.DEFINE_integer("steps", 6, "Steps per framework (including warm-up).")
flags.DEFINE_integer("warmup", 2, "Untimed first steps.")
flags.DEFINE_bool("trl", False, "Also run TRL's GRPOTrainer in a subprocess.")
flags.DEFINE_string("trl_cache", "static", "TRL/HF generate cache_implementation to try first.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def prompt_texts(n: int) -> list[str]:
    from dsjax.data.synthetic import arithmetic_example

    return [arithmetic_example(7, i)["prompt"] for i in range(n)]


def bench_dsjax() -> dict:
    import jax
    from flax import nnx

    import dsjax
    from dsjax.data import DataConfig, make_tokenizer
    from dsjax.rl.grpo import GRPOConfig
    from dsjax.rl.rewards import Reward, make_rewards
    from dsjax.rl.trainer import GRPOTrainer
    from dsjax.train import OptimConfig

    cfg = dsjax.configs.get(FLAGS.config)
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
    tok = make_tokenizer(DataConfig())
    digits = Reward("digits", lambda t, ex: sum(c.isdigit() for c in t) / max(len(t), 1))
    gcfg = GRPOConfig(num_generations=FLAGS.G, beta=FLAGS.beta, eps_low=0.2, eps_high=0.2, temperature=1.0,
                      max_new_tokens=FLAGS.max_new_tokens, mu=1, minibatches=1, dynamic_sampling=False)
    trainer = GRPOTrainer(model, tok, make_rewards([digits]), gcfg, steps=FLAGS.steps,
                          prompts_per_step=FLAGS.prompts, log_samples_every=10**9,
                          optim=OptimConfig(learning_rate=1e-6, warmup_steps=0, schedule="constant"))
    trainer.sampling = dataclasses.replace(trainer.sampling, use_eos=False)  # same lengths as the TRL run
    texts = prompt_texts(FLAGS.prompts)
    stream = iter([{"prompt": t} for _ in range(FLAGS.steps + 2) for t in texts])
    hist = trainer.train(stream, FLAGS.steps, log_fn=lambda s: print("  dsjax", s, flush=True))
    timed = hist[FLAGS.warmup:]
    med = lambda k: statistics.median(h[k] for h in timed)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": med("step_time_s"), "rollout_s": med("time_rollout_s"),
            "update_s": med("step_time_s") - med("time_rollout_s"), "steps_timed": len(timed),
            "completion_len": med("completion_len_mean"), "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
            "device": jax.devices()[0].device_kind}


def bench_trl() -> dict:
    import dsjax

    cfg = dsjax.configs.get(FLAGS.config)
    settings = {"prompts": FLAGS.prompts, "G": FLAGS.G, "max_new_tokens": FLAGS.max_new_tokens, "beta": FLAGS.beta,
                "steps": FLAGS.steps, "warmup": FLAGS.warmup, "prompt_texts": prompt_texts(FLAGS.prompts),
                "cache_implementation": FLAGS.trl_cache or None}
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_grpo_trl.py"), json.dumps(cfg.to_hf_config()),
           json.dumps(settings)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    for line in res.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            return json.loads(line[len("TRL_RESULT "):])
    raise RuntimeError(f"TRL run failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    n = FLAGS.prompts * FLAGS.G
    rows = {"dsjax": bench_dsjax()}
    if FLAGS.trl:
        try:
            rows["TRL"] = bench_trl()
        except Exception as e:  # noqa: BLE001 - report the failure with the dsjax numbers
            print(f"TRL baseline failed: {e}", flush=True)
    dev = rows["dsjax"]["device"]
    lines = [f"GRPO step, `{FLAGS.config}`, {FLAGS.prompts} prompts x G={FLAGS.G} = {n} completions of "
             f"{FLAGS.max_new_tokens} tokens, beta={FLAGS.beta}, mu=1, one minibatch; {dev}; medians of "
             f"{FLAGS.steps - FLAGS.warmup} steps after {FLAGS.warmup} warm-up", "",
             "| framework | s/step | rollout s | update s | completion tokens/s (whole step) | peak GiB |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | "
                     f"{n * FLAGS.max_new_tokens / r['step_s']:,.0f} | {r['peak_mem_gib']:.1f} |")
    if "TRL" in rows:
        t, d = rows["TRL"], rows["dsjax"]
        lines += ["", f"dsjax / TRL step throughput: {t['step_s'] / d['step_s']:.2f}x (rollout "
                      f"{t['rollout_s'] / d['rollout_s']:.2f}x, update {t['update_s'] / d['update_s']:.2f}x); TRL "
                      f"experts={t.get('experts_implementation')}, cache={t.get('cache_implementation')}"
                      + (f", fallbacks: {t['errors']}" if t.get("errors") else "")]
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"GRPO step vs TRL ({datetime.date.today()}, {dev})", table, "bench_grpo")


if __name__ == "__main__":
    app.run(main)
