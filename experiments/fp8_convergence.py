"""FP8 training convergence check (DeepSeek-V3 App. B.1): the same model trained in BF16 and with ``model.fp8=True``
from the same seed on the same data; reports the relative gap of the smoothed loss (DeepSeek: < 0.25%), the step
time ratio FP8/BF16, and writes the curves to a PNG.

    python -m experiments.fp8_convergence --config=small --steps=1000 --record
    # an FP8 variant against the BF16 run of an earlier call (same config, data and card):
    python -m experiments.fp8_convergence --config=small --steps=1000 --bf16_from=losses.json \
        --fp8_set model.fp8_bf16_layers=1 --save_losses=losses_variant.json

Both runs use the preset's data pipeline (``data.*``; the default corpus unless overridden with ``--set``), its
optimiser and schedule, and identical initial parameters (``init_state`` with one key). The loss is the training
loss per step; smoothing is an exponential moving average (``--ema``). Step time is the median wall time of the
steps after ``--warmup`` (each run compiles separately). With ``--record`` the summary is appended to
docs/benchmarks.md and the plot saved as ``docs/fp8_convergence.png``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset (dsjax.train.config.get).")
flags.DEFINE_integer("steps", 1000, "Training steps per run.")
flags.DEFINE_multi_string("set", [], "Extra overrides for both runs, e.g. --set data.batch_size=8.")
flags.DEFINE_float("ema", 0.98, "EMA factor of the smoothed loss.")
flags.DEFINE_integer("warmup", 5, "Steps excluded from the step-time median.")
flags.DEFINE_integer("log_every", 50, "Print every this many steps.")
flags.DEFINE_string("png", "docs/fp8_convergence.png", "Plot path (relative to the repo root).")
flags.DEFINE_float("noise_floor", 0.0, "If > 0, a third run: BF16 again with the initial master weights perturbed by "
                   "this relative Gaussian noise (e.g. 0.002, about one BF16 rounding). Its gap to the BF16 run is the "
                   "divergence any perturbation of the trajectory causes at this scale, the floor against which the "
                   "FP8 gap is read.")
flags.DEFINE_bool("record", False, "Append the summary to docs/benchmarks.md (and write the PNG).")
flags.DEFINE_multi_string("fp8_set", [], "Overrides for the FP8 run only, e.g. --fp8_set model.fp8_bf16_layers=1.")
flags.DEFINE_string("save_losses", None, "Write every run's per-step losses and step time to this JSON file.")
flags.DEFINE_string("bf16_from", None, "Reuse the BF16 run (losses, step time) from a --save_losses file of an "
                    "earlier run with the same config and data (the 10-minute device calls fit fewer runs); the "
                    "step-time ratio is then across two processes.")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(fp8: bool, perturb: float = 0.0) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsjax.data import make_dataset, make_tokenizer
    from dsjax.model import Transformer
    from dsjax.train import config as tc
    from dsjax.train.step import init_state, make_train_step, split_model

    cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"steps={FLAGS.steps}", *FLAGS.set,
                                                    f"model.fp8={'true' if fp8 else 'false'}",
                                                    *(FLAGS.fp8_set if fp8 else [])])
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, graphdef, p, r), donate_argnums=0)
    state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(0))
    name = "fp8 " if fp8 else ("bf16" if not perturb else "bf16'")
    if perturb:   # the noise-floor run: same everything, master weights nudged by ~one BF16 rounding
        leaves, treedef = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.key(1234), len(leaves))
        leaves = [p * (1 + perturb * jax.random.normal(k, p.shape, p.dtype)) if jnp.issubdtype(p.dtype, jnp.floating)
                  else p for p, k in zip(leaves, keys)]
        state = dataclasses.replace(state, params=jax.tree.unflatten(treedef, leaves))
    it = iter(make_dataset(cfg.data, make_tokenizer(cfg.data), process_index=0, process_count=1))
    losses, times = [], []
    t_compile = time.perf_counter()
    for i in range(FLAGS.steps):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        t = time.perf_counter()
        state, m = step(state, batch)
        loss = float(m["loss"])                         # syncs: the wall time covers the whole step
        times.append(time.perf_counter() - t)
        if i == 0:
            t_compile = time.perf_counter() - t_compile
        if not np.isfinite(loss):
            print(f"{name}: non-finite loss at step {i}", flush=True)
        losses.append(loss)
        if i % FLAGS.log_every == 0 or i == FLAGS.steps - 1:
            print(f"{name} step {i:5d} loss {loss:.4f} ({times[-1] * 1e3:.0f} ms)", flush=True)
    return {"losses": losses, "step_s": statistics.median(times[FLAGS.warmup:] or times), "compile_s": t_compile,
            "model": cfg.model, "batch": cfg.data.batch_size, "seq": cfg.data.seq_len}


def ema(xs, a):
    out, v = [], None
    for x in xs:
        v = x if v is None else a * v + (1 - a) * x
        out.append(v)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}", flush=True)
    if FLAGS.bf16_from:
        bf16 = json.loads(pathlib.Path(FLAGS.bf16_from).read_text())["bf16"]
        if len(bf16["losses"]) != FLAGS.steps:
            raise app.UsageError(f"--bf16_from has {len(bf16['losses'])} steps, --steps={FLAGS.steps}")
    else:
        bf16 = run(False)
    fp8 = run(True)
    saved = {"bf16": bf16, "fp8": fp8}
    sb, sf = ema(bf16["losses"], FLAGS.ema), ema(fp8["losses"], FLAGS.ema)
    gaps = [(f - b) / b for b, f in zip(sb, sf)]
    tail = gaps[len(gaps) // 2:]
    summary = {
        "steps": FLAGS.steps, "final_smoothed_bf16": sb[-1], "final_smoothed_fp8": sf[-1],
        "final_rel_gap": gaps[-1], "max_abs_rel_gap_second_half": max(abs(g) for g in tail),
        "mean_rel_gap_second_half": sum(tail) / len(tail),
        "step_ms_bf16": bf16["step_s"] * 1e3, "step_ms_fp8": fp8["step_s"] * 1e3,
        "step_time_ratio_fp8_over_bf16": fp8["step_s"] / bf16["step_s"],
    }
    floor = None
    if FLAGS.noise_floor > 0:
        saved["floor"] = run(False, FLAGS.noise_floor)
        sp = ema(saved["floor"]["losses"], FLAGS.ema)
        floor = [(p - b) / b for b, p in zip(sb, sp)]
        ftail = floor[len(floor) // 2:]
        summary.update({"noise_floor_perturbation": FLAGS.noise_floor, "floor_final_rel_gap": floor[-1],
                        "floor_max_abs_rel_gap_second_half": max(abs(g) for g in ftail),
                        "floor_mean_rel_gap_second_half": sum(ftail) / len(ftail)})
    print(json.dumps(summary, indent=1))
    if FLAGS.save_losses:
        keep = ("losses", "step_s", "compile_s", "batch", "seq")
        pathlib.Path(FLAGS.save_losses).write_text(json.dumps(
            {k: {f: v[f] for f in keep} for k, v in saved.items()}))
    png = ROOT / FLAGS.png
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a0, a1) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
        a0.plot(bf16["losses"], alpha=0.25, color="C0")
        a0.plot(fp8["losses"], alpha=0.25, color="C1")
        a0.plot(sb, color="C0", label="BF16 (EMA)")
        a0.plot(sf, color="C1", label="FP8 (EMA)")
        a0.set_ylabel("training loss")
        a0.legend()
        a0.set_title(f"{FLAGS.config}: BF16 vs FP8 (E4M3, 1x128 / 128x128), same seed and data")
        a1.plot([100 * g for g in gaps], color="C2", label="FP8 vs BF16")
        if floor is not None:
            a1.plot([100 * g for g in floor], color="C7", label=f"BF16 perturbed by {FLAGS.noise_floor:g} vs BF16")
            a1.legend()
        a1.axhline(0.25, ls="--", color="grey")
        a1.axhline(-0.25, ls="--", color="grey")
        a1.set_ylabel("smoothed loss gap vs BF16 (%)")
        a1.set_xlabel("step")
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        print(f"wrote {png}")
    except ImportError:
        print("matplotlib missing: no plot")
    if FLAGS.record:
        text = (f"\n## FP8 vs BF16 training convergence, `{FLAGS.config}` ({datetime.date.today().isoformat()}, "
                f"{dev.device_kind}, jax {jax.__version__})\n\n"
                f"Command: `python -m experiments.fp8_convergence {' '.join(sys.argv[1:])}`\n\n"
                f"| steps | batch x seq | smoothed loss BF16 | smoothed loss FP8 | final gap | max abs gap "
                f"(2nd half) | step ms BF16 | step ms FP8 | FP8/BF16 time |\n|---|---|---|---|---|---|---|---|---|\n"
                f"| {FLAGS.steps} | {bf16['batch']} x {bf16['seq']} | {sb[-1]:.4f} | {sf[-1]:.4f} | "
                f"{100 * gaps[-1]:+.3f}% | {100 * summary['max_abs_rel_gap_second_half']:.3f}% | "
                f"{summary['step_ms_bf16']:.1f} | {summary['step_ms_fp8']:.1f} | "
                f"{summary['step_time_ratio_fp8_over_bf16']:.2f}x |\n\n"
                + ("" if floor is None else
                   f"Noise floor: BF16 again with the initial master weights perturbed by {FLAGS.noise_floor:g} "
                   f"(relative, Gaussian): final gap {100 * floor[-1]:+.3f}%, max abs gap (2nd half) "
                   f"{100 * summary['floor_max_abs_rel_gap_second_half']:.3f}%.\n\n") +
                f"(EMA {FLAGS.ema}; DeepSeek-V3's bar is a relative gap below 0.25%. Plot: `{FLAGS.png}`. Experts use "
                f"fp8_grouped_linear: FP8-quantised operands through the bf16 grouped matmul, so only the dense "
                f"projections get the FP8 GEMM speed.)\n")
        with open(ROOT / "docs" / "benchmarks.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    app.run(main)
