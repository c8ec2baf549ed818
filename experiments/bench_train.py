"""Train-step throughput: tokens/s, MFU, compile time and peak memory of dsjax variants, plus HF transformers.

    python -m experiments.bench_train --config=small --batch_size=8 --seq_len=2048 \
        --variant="model.attention_impl=cudnn" --variant="model.attention_impl=cudnn,model.remat_policy=full" \
        --hf --record

Each ``--variant`` is a comma-separated list of ``--set``-style overrides applied to the training preset. Batches are
synthetic packed sequences (random tokens, documents of random length), so the data pipeline is not measured; the
item ``unpacked`` in a variant drops the segment ids instead (one document per row: causal attention without a
mask tensor, which is what the HF baseline trains; e.g. ``--variant=unpacked,model.num_nextn_predict_layers=0,
loss.mtp_lambda=0`` is the HF-equivalent workload).
``--hf`` times HF transformers' DeepseekV3 training step (torch, bf16, AdamW, ``grouped_mm`` experts, sdpa) for the
same model shape and batch in a subprocess (experiments/bench_train_hf.py). ``--record`` appends the table to
docs/benchmarks.md with the date, the card and the command.

MFU = flops_per_token x tokens/s / (peak bf16 FLOP/s x devices), flops_per_token from
dsjax.train.flops_per_token (6 x active non-embedding params + attention; MTP modules included when trained).
"""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import time

from absl import app, flags

from experiments.records import append_record

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset.")
flags.DEFINE_integer("batch_size", 8, "Global batch (sequences).")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("steps", 20, "Timed steps per variant (after 2 warm-up steps).")
flags.DEFINE_multi_string("variant", [""], "Comma-separated overrides per variant ('' = the preset).")
flags.DEFINE_bool("hf", False, "Also time HF transformers (torch) in a subprocess.")
flags.DEFINE_bool("record", False, "Append the results to docs/benchmarks.md.")
flags.DEFINE_float("peak_tflops", None, "Override the per-device peak bf16 TFLOP/s used for MFU.")

ROOT = pathlib.Path(__file__).resolve().parent.parent

from experiments.batches import synthetic_batch  # noqa: E402


def bench_variant(overrides: list[str]) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsjax.model import Transformer
    from dsjax.train import config as tc
    from dsjax.train.metrics import peak_flops_per_device
    from dsjax.train.step import flops_per_token, init_state, make_train_step, split_model

    label = ",".join(overrides) or "(preset)"
    unpacked = "unpacked" in overrides
    overrides = [o for o in overrides if o != "unpacked"]
    cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"data.batch_size={FLAGS.batch_size}",
                                                    f"data.seq_len={FLAGS.seq_len}", "optim.warmup_steps=2",
                                                    *overrides])
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, graphdef, p, r), donate_argnums=0)
    state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(FLAGS.batch_size, FLAGS.seq_len,
                                                           cfg.model.vocab_size).items()}
    if unpacked:  # one document per row, no segment ids: causal attention without a mask tensor (as HF trains)
        batch.pop("segment_ids")
        batch["positions"] = jnp.broadcast_to(jnp.arange(FLAGS.seq_len, dtype=jnp.int32), batch["tokens"].shape)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, batch)
    state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = compiled(state, batch)
    loss = float(m["loss"])  # host sync
    dt = (time.perf_counter() - t0) / FLAGS.steps
    dev = jax.devices()[0]
    tps = FLAGS.batch_size * FLAGS.seq_len / dt
    peak = peak_flops_per_device(dev.device_kind, FLAGS.peak_tflops)
    mfu = flops_per_token(cfg) * tps / (peak * jax.device_count()) if peak else None
    mem = dev.memory_stats() or {}
    return {"variant": label, "step_ms": 1e3 * dt, "tokens_per_s": tps, "mfu": mfu,
            "compile_s": compile_s, "peak_gib": mem.get("peak_bytes_in_use", 0) / 2**30, "loss": loss,
            "flops_per_token": flops_per_token(cfg), "mtp": cfg.model.num_nextn_predict_layers > 0
            and cfg.loss.mtp_lambda > 0}


def bench_hf() -> dict:
    from dsjax.train import config as tc

    cfg = tc.get(FLAGS.config).model
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_train_hf.py"), json.dumps(cfg.to_hf_config()),
           str(FLAGS.batch_size), str(FLAGS.seq_len), str(max(FLAGS.steps // 2, 5))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"variant": "HF transformers", "error": (res.stderr or res.stdout)[-1500:]}
    return json.loads(lines[-1])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    from dsjax.train import config as tc
    from dsjax.train.metrics import peak_flops_per_device
    from dsjax.train.step import flops_per_token

    # HF first, before JAX starts its backend and takes 75% of the GPU's memory (on an 80 GB card the torch run
    # then ran out of memory)
    hf = bench_hf() if FLAGS.hf else None
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()} ({dev.platform}), jax {jax.__version__}", flush=True)
    rows = []
    for v in FLAGS.variant:
        overrides = tc.split_overrides(v, bare=("unpacked",))
        try:
            rows.append(bench_variant(overrides))
        except Exception as e:  # noqa: BLE001 - report OOM / unsupported variants and go on
            rows.append({"variant": v or "(preset)", "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    if hf is not None:
        cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"data.seq_len={FLAGS.seq_len}", "loss.mtp_lambda=0",
                                                        "model.num_nextn_predict_layers=0"])
        peak = peak_flops_per_device(dev.device_kind, FLAGS.peak_tflops)
        if "tokens_per_s" in hf and peak:
            hf["mfu"] = flops_per_token(cfg) * hf["tokens_per_s"] / peak
        rows.append(hf)
        print(json.dumps(hf), flush=True)

    best_hf = next((r["tokens_per_s"] for r in rows if r.get("variant") == "HF transformers" and
                    "tokens_per_s" in r), None)
    header = "| variant | step ms | tokens/s | MFU | vs HF | compile s | peak GiB |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error'][:120]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        ratio = f"{r['tokens_per_s'] / best_hf:.2f}x" if best_hf else ""
        lines.append(f"| {r['variant']} | {r.get('step_ms', 0):.1f} | {r['tokens_per_s']:,.0f} | {mfu} | {ratio} | "
                     f"{r.get('compile_s', 0):.1f} | {r.get('peak_gib', 0):.1f} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"Train step, `{FLAGS.config}`, batch {FLAGS.batch_size} x {FLAGS.seq_len} "
                      f"({datetime.date.today().isoformat()}, {dev.device_kind}, jax {jax.__version__})", table,
                      "bench_train")


if __name__ == "__main__":
    app.run(main)
