"""FP8 training convergence check (DeepSeek-V3 App. B.1): the same model trained in BF16 and with ``model.fp8=True``
from the same seed on the same data; reports the relative gap of the smoothed loss (DeepSeek: < 0.25%), the step
time ratio FP8/BF16, and writes the curves to a PNG.

    python -m experiments.fp8_convergence --config=small --steps=1000 --record
    # runs in separate processes (e.g. several sharing one GPU, --shared_gpu), then one report:
    python -m experiments.fp8_convergence --runs=bf16 --save_losses=bf16.json --eval_batches=16 &
    python -m experiments.fp8_convergence --runs=fp8 --save_losses=fp8.json --eval_batches=16 &
    python -m experiments.fp8_convergence --runs=fp8 --fp8_set model.fp8_bf16_layers=1 --save_losses=v1.json &
    wait; python -m experiments.fp8_convergence --runs= --load=bf16.json --load=fp8.json --load=v1.json --record

Every run uses the preset's data pipeline (``data.*``; the default corpus unless overridden with ``--set``), its
optimiser and schedule, and identical initial parameters (``init_state`` with the preset's ``seed``; another seed:
``--set seed=1 --set data.seed=1``). The loss is the training
loss per step; smoothing is an exponential moving average (``--ema``). Step time is the median wall time of the
steps after ``--warmup`` (each run compiles separately; with ``--shared_gpu`` it is not reported).

``--eval_batches=N`` separates *training* quality from the FP8 forward pass's own noise: after training, the final
weights of each run are evaluated (next-token cross-entropy) on the next N batches of the stream, which no run
trained on, with a BF16 forward and with an FP8 forward. An FP8-trained model whose BF16-forward loss matches the
BF16-trained model's trained as well; the FP8-forward column minus the BF16-forward column is what quantising the
forward pass adds to the same weights' loss.
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
flags.DEFINE_multi_string("set", [], "Extra overrides for every run, e.g. --set data.batch_size=8.")
flags.DEFINE_list("runs", ["bf16", "fp8"], "Runs to train in this process: bf16, fp8, floor (the noise-floor run, "
                  "see --noise_floor). Empty: only report on --load files.")
flags.DEFINE_float("ema", 0.98, "EMA factor of the smoothed loss.")
flags.DEFINE_integer("warmup", 5, "Steps excluded from the step-time median.")
flags.DEFINE_integer("log_every", 50, "Print (and save, with --save_losses) every this many steps.")
flags.DEFINE_string("png", "docs/fp8_convergence.png", "Plot path (relative to the repo root); written with "
                    "--record or when given.")
flags.DEFINE_float("noise_floor", 0.0, "If > 0, also the 'floor' run: BF16 again with the initial master "
                   "weights perturbed by this relative Gaussian noise (e.g. 0.002, about one BF16 rounding). Its "
                   "gap to the BF16 run is the divergence any perturbation of the trajectory causes at this scale, "
                   "the floor against which the FP8 gap is read.")
flags.DEFINE_bool("record", False, "Append the summary to docs/benchmarks.md (and write the PNG).")
flags.DEFINE_multi_string("fp8_set", [], "Overrides for the FP8 run only, e.g. --fp8_set model.fp8_bf16_layers=1.")
flags.DEFINE_string("save_losses", None, "Write this process's runs (per-step losses, step time, evaluation) to this "
                    "JSON file, updated every --log_every steps.")
flags.DEFINE_multi_string("load", [], "JSON files written by --save_losses of earlier runs with the same config and "
                          "data: their runs join the report (a bf16 run is the baseline; each fp8 run is a row).")
flags.DEFINE_integer("eval_batches", 0, "After training, the cross-entropy of the final weights on this many "
                     "unseen batches, with a BF16 and with an FP8 forward pass.")
flags.DEFINE_bool("shared_gpu", False, "Several runs share the GPU (concurrent processes): step times are recorded "
                  "but not reported.")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _expert_gemm(run: dict) -> str:
    """How an FP8 run's routed experts multiplied: "fp8" (the m-grouped FP8 GEMM) or "bf16" (quantised operands
    through the BF16 grouped matmul). Files saved before runs recorded it ran "bf16" unless their overrides say so."""
    if "expert_gemm" in run:
        return run["expert_gemm"]
    sets = [s.split("=", 1)[1] for s in run.get("fp8_set", []) if s.startswith("model.fp8_grouped_gemm=")]
    return sets[-1] if sets else "bf16"


def _label(run: dict) -> str:
    if run["name"] != "fp8":
        return run["name"]
    sets = [s for s in run.get("fp8_set", []) if not s.startswith("model.fp8_grouped_gemm=")]
    return "fp8" + (" " + ", ".join(sets) if sets else "") + f" [experts: {_expert_gemm(run)} GEMM]"


def _save(saved: dict) -> None:
    if FLAGS.save_losses:
        pathlib.Path(FLAGS.save_losses).write_text(json.dumps(saved))


def run(name: str, saved: dict) -> dict:
    """Trains one run (``name``: bf16, fp8 or floor); ``saved[name]`` is kept up to date (and saved) as it goes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dsjax.data import make_dataset, make_tokenizer
    from dsjax.model import Transformer
    from dsjax.train import config as tc
    from dsjax.train.step import init_state, make_train_step, split_model

    fp8 = name == "fp8"
    fp8_set = list(FLAGS.fp8_set) if fp8 else []
    cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"steps={FLAGS.steps}", *FLAGS.set,
                                                    f"model.fp8={'true' if fp8 else 'false'}", *fp8_set])
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, graphdef, p, r), donate_argnums=0)
    state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(cfg.seed))   # --set seed=..., data.seed=...
    if name == "floor":   # the noise-floor run: same everything, master weights nudged by ~one BF16 rounding
        leaves, treedef = jax.tree.flatten(state.params)
        keys = jax.random.split(jax.random.key(1234), len(leaves))
        leaves = [p * (1 + FLAGS.noise_floor * jax.random.normal(k, p.shape, p.dtype))
                  if jnp.issubdtype(p.dtype, jnp.floating) else p for p, k in zip(leaves, keys)]
        state = dataclasses.replace(state, params=jax.tree.unflatten(treedef, leaves))
    it = iter(make_dataset(cfg.data, make_tokenizer(cfg.data), process_index=0, process_count=1))
    out = saved[name] = {"name": name, "fp8_set": fp8_set, "losses": [], "batch": cfg.data.batch_size,
                         "seq": cfg.data.seq_len, "shared_gpu": FLAGS.shared_gpu,
                         "device": jax.devices()[0].device_kind,
                         "perturb": FLAGS.noise_floor if name == "floor" else 0.0}
    if fp8:   # what fp8_grouped_gemm="auto" resolved to on this device (the experts' x [M, hidden], w [G, hidden, F])
        from pallas_kernels import grouped_fp8_gemm_on_mosaic_gpu

        mode, mc = cfg.model.fp8_grouped_gemm, cfg.model
        out["expert_gemm"] = mode if mode != "auto" else (
            "fp8" if grouped_fp8_gemm_on_mosaic_gpu(mc.hidden_size, mc.moe_intermediate_size,
                                                    mc.grouped_matmul_impl) else "bf16")
    times = []
    t_compile = time.perf_counter()
    for i in range(FLAGS.steps):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        t = time.perf_counter()
        state, m = step(state, batch)
        loss = float(m["loss"])                         # syncs: the wall time covers the whole step
        times.append(time.perf_counter() - t)
        if i == 0:
            out["compile_s"] = time.perf_counter() - t_compile
        if not np.isfinite(loss):
            print(f"{name}: non-finite loss at step {i}", flush=True)
        out["losses"].append(loss)
        if i % FLAGS.log_every == 0 or i == FLAGS.steps - 1:
            out["step_s"] = statistics.median(times[FLAGS.warmup:] or times)
            print(f"{name} step {i:5d} loss {loss:.4f} ({times[-1] * 1e3:.0f} ms)", flush=True)
            _save(saved)
    if FLAGS.eval_batches:
        out["eval"] = evaluate(cfg, state, it, FLAGS.eval_batches)
        print(f"{name} eval (cross-entropy on {FLAGS.eval_batches} unseen batches): {out['eval']}", flush=True)
        _save(saved)
    return out


def evaluate(cfg, state, it, n: int) -> dict:
    """Cross-entropy of ``state``'s weights on the next ``n`` batches with a BF16 and an FP8 forward pass."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsjax.model import Transformer
    from dsjax.train.losses import chunked_cross_entropy, shifted_targets
    from dsjax.train.step import split_model

    batches = [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(n)]
    result = {}
    for fwd, fp8 in (("bf16_forward", False), ("fp8_forward", True)):
        mcfg = dataclasses.replace(cfg.model, fp8=fp8, fp8_bf16_layers=0, fp8_bf16_projections=())
        graphdef, p_t, r_t = split_model(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))

        @jax.jit
        def ce(params, rest, b, graphdef=graphdef, p_t=p_t, r_t=r_t):
            p, r = nnx.State(p_t), nnx.State(r_t)
            nnx.replace_by_pure_dict(p, params)
            nnx.replace_by_pure_dict(r, rest)
            model = nnx.merge(graphdef, p, r)
            o = model(b["tokens"], b.get("segment_ids"), b["positions"], return_hidden=True, compute_logits=False)
            seg = b.get("segment_ids", jnp.ones_like(b["tokens"]))
            tg, w = shifted_targets(b["tokens"], seg, b["loss_mask"], 1)
            s, _ = chunked_cross_entropy(o.hidden, model.logits_f32, tg, w, cfg.loss.ce_chunk_tokens)
            return s, jnp.sum(w)

        sums = [ce(state.params, state.rest, b) for b in batches]
        result[fwd] = float(sum(s for s, _ in sums) / sum(w for _, w in sums))
    return result


def ema(xs, a):
    out, v = [], None
    for x in xs:
        v = x if v is None else a * v + (1 - a) * x
        out.append(v)
    return out


def _gaps(base: list[float], other: list[float]) -> dict:
    sb, so = ema(base, FLAGS.ema), ema(other, FLAGS.ema)
    g = [(o - b) / b for b, o in zip(sb, so)]
    tail = g[len(g) // 2:]
    return {"smoothed": so, "gaps": g, "final": g[-1], "max_abs_2nd_half": max(abs(x) for x in tail),
            "mean_2nd_half": sum(tail) / len(tail)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}", flush=True)
    unknown = set(FLAGS.runs) - {"bf16", "fp8", "floor"}
    if unknown:
        raise app.UsageError(f"--runs: unknown {sorted(unknown)}; use bf16, fp8, floor")
    runs = list(FLAGS.runs) + (["floor"] if FLAGS.noise_floor > 0 and "floor" not in FLAGS.runs else [])
    if "floor" in runs and FLAGS.noise_floor <= 0:
        raise app.UsageError("--runs=floor needs --noise_floor > 0")
    loaded: list[dict] = []
    for f in FLAGS.load:
        for name, r in json.loads(pathlib.Path(f).read_text()).items():
            r.setdefault("name", name)
            if len(r["losses"]) != FLAGS.steps:
                raise app.UsageError(f"--load={f}: run {name} has {len(r['losses'])} steps, --steps={FLAGS.steps}")
            loaded.append(r)
    saved: dict = {}
    for name in runs:
        run(name, saved)
    every = loaded + list(saved.values())
    bf16 = next((r for r in every if r["name"] == "bf16"), None)
    floor_run = next((r for r in every if r["name"] == "floor"), None)
    fp8_runs = [r for r in every if r["name"] == "fp8"]
    if bf16 is None or not fp8_runs:
        print("no bf16 + fp8 pair to compare (runs saved)" if FLAGS.save_losses else "nothing to compare")
        return
    sb = ema(bf16["losses"], FLAGS.ema)
    rows = [(r, _gaps(bf16["losses"], r["losses"])) for r in fp8_runs]
    floor = _gaps(bf16["losses"], floor_run["losses"]) if floor_run else None
    shared = any(r.get("shared_gpu") for r in [bf16, *fp8_runs])
    summary = {
        "steps": FLAGS.steps, "final_smoothed_bf16": sb[-1], "step_ms_bf16": bf16["step_s"] * 1e3,
        "fp8_runs": [{"label": _label(r), "final_smoothed": g["smoothed"][-1], "final_rel_gap": g["final"],
                      "max_abs_rel_gap_second_half": g["max_abs_2nd_half"], "mean_rel_gap_second_half":
                      g["mean_2nd_half"], "step_ms": r["step_s"] * 1e3,
                      "step_time_ratio_over_bf16": r["step_s"] / bf16["step_s"], "eval": r.get("eval")}
                     for r, g in rows],
        "bf16_eval": bf16.get("eval"),
    }
    if floor:
        summary.update({"noise_floor_perturbation": floor_run["perturb"], "floor_final_rel_gap": floor["final"],
                        "floor_max_abs_rel_gap_second_half": floor["max_abs_2nd_half"],
                        "floor_mean_rel_gap_second_half": floor["mean_2nd_half"]})
    print(json.dumps(summary, indent=1))
    _save(saved)
    if FLAGS.record or FLAGS["png"].present:
        _plot(bf16, sb, rows, floor, floor_run)
    if FLAGS.record:
        _record(dev, bf16, sb, rows, floor, floor_run, shared)


def _plot(bf16, sb, rows, floor, floor_run) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    a0.plot(bf16["losses"], alpha=0.25, color="C0")
    a0.plot(sb, color="C0", label="bf16 (EMA)")
    for i, (r, g) in enumerate(rows):
        a0.plot(r["losses"], alpha=0.25, color=f"C{i + 1}")
        a0.plot(g["smoothed"], color=f"C{i + 1}", label=f"{_label(r)} (EMA)")
        a1.plot([100 * x for x in g["gaps"]], color=f"C{i + 1}", label=f"{_label(r)} vs BF16")
    a0.set_ylabel("training loss")
    a0.legend()
    a0.set_title(f"{FLAGS.config}: BF16 vs FP8 (E4M3, 1x128 / 128x128), same seed and data")
    if floor is not None:
        a1.plot([100 * x for x in floor["gaps"]], color="C7",
                label=f"BF16 perturbed by {floor_run['perturb']:g} vs BF16")
    a1.legend()
    a1.axhline(0.25, ls="--", color="grey")
    a1.axhline(-0.25, ls="--", color="grey")
    a1.set_ylabel("smoothed loss gap vs BF16 (%)")
    a1.set_xlabel("step")
    fig.tight_layout()
    png = ROOT / FLAGS.png
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def _record(dev, bf16, sb, rows, floor, floor_run, shared: bool) -> None:
    import jax

    ms = (lambda r: "n/a") if shared else (lambda r: f"{r['step_s'] * 1e3:.1f}")
    ratio = (lambda r: "n/a") if shared else (lambda r: f"{r['step_s'] / bf16['step_s']:.2f}x")
    text = (f"\n## FP8 vs BF16 training convergence, `{FLAGS.config}` ({datetime.date.today().isoformat()}, "
            f"{bf16.get('device', dev.device_kind)}, jax {jax.__version__})\n\n"
            f"Command: `python -m experiments.fp8_convergence {' '.join(sys.argv[1:])}`\n\n"
            f"| FP8 run | steps | batch x seq | smoothed loss BF16 | smoothed loss FP8 | final gap "
            f"| mean gap (2nd half) | max abs gap (2nd half) | step ms BF16 | step ms FP8 | FP8/BF16 time |\n"
            f"|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r, g in rows:
        text += (f"| {_label(r)} | {FLAGS.steps} | {bf16['batch']} x {bf16['seq']} | {sb[-1]:.4f} | "
                 f"{g['smoothed'][-1]:.4f} | {100 * g['final']:+.3f}% | {100 * g['mean_2nd_half']:+.3f}% | "
                 f"{100 * g['max_abs_2nd_half']:.3f}% | {ms(bf16)} | {ms(r)} | {ratio(r)} |\n")
    if floor is not None:
        text += (f"\nNoise floor: BF16 again with the initial master weights perturbed by {floor_run['perturb']:g} "
                 f"(relative, Gaussian): final gap {100 * floor['final']:+.3f}%, mean gap (2nd half) "
                 f"{100 * floor['mean_2nd_half']:+.3f}%, max abs gap (2nd half) "
                 f"{100 * floor['max_abs_2nd_half']:.3f}%.\n")
    evals = [(r, r["eval"]) for r in [bf16, *[r for r, _ in rows]] if r.get("eval")]
    if evals:
        base = bf16.get("eval")
        text += (f"\nFinal weights evaluated on {FLAGS.eval_batches} unseen batches (next-token cross-entropy; "
                 f"in brackets: relative to the BF16-trained weights with a BF16 forward):\n\n"
                 f"| trained as | BF16 forward | FP8 forward | FP8 forward / BF16 forward |\n|---|---|---|---|\n")
        for r, e in evals:
            rel = (lambda v: f" ({100 * (v / base['bf16_forward'] - 1):+.3f}%)") if base else (lambda v: "")
            text += (f"| {_label(r)} | {e['bf16_forward']:.4f}{rel(e['bf16_forward'])} | "
                     f"{e['fp8_forward']:.4f}{rel(e['fp8_forward'])} | "
                     f"{100 * (e['fp8_forward'] / e['bf16_forward'] - 1):+.3f}% |\n")
    text += (f"\n(EMA {FLAGS.ema}; DeepSeek-V3's bar is a relative gap below 0.25%. Plot: `{FLAGS.png}`. "
             + ("The runs shared one GPU (concurrent processes), so no step times are reported. " if shared else "")
             + "Experts (fp8_grouped_linear, ModelConfig.fp8_grouped_gemm): 'bf16 GEMM' = FP8-quantised operands "
               "through the BF16 grouped matmul, 'fp8 GEMM' = the m-grouped FP8 GEMM for the forward and the "
               "activation gradient.)\n")
    with open(ROOT / "docs" / "benchmarks.md", "a") as f:
        f.write(text)


if __name__ == "__main__":
    app.run(main)
