"""Multi-device scaling of the train step: tokens/s of data parallelism (weak scaling) and expert parallelism.

    python -m experiments.bench_scaling --config=small --devices=1,2,4 --record
    python -m experiments.bench_scaling --config=small --devices=1,2,4,8 --modes=dp,ep,ep:1.25,fsdp --steps=10
    python -m experiments.bench_scaling --config=tiny --devices=1,2 --batch_per_device=2 --seq_len=128   # CPU smoke

Weak scaling: every device gets ``--batch_per_device`` sequences of ``--seq_len`` tokens, so the global batch grows
with the device count; efficiency = tokens/s on n devices / (n x tokens/s of the single-device path). Modes (each on
the first n devices, skipped for counts larger than the machine):

* ``dp``       -- ``MeshConfig(data=n)``: replicated weights, gradients all-reduced (``grad_sync=auto``: once, after
  the backward; ``dp+gspmd``: per layer inside it) (n=1: the plain single-device code path, the baseline);
* ``fsdp``     -- ``MeshConfig(fsdp=n)``: weights and optimizer state split along D, gathered per layer;
* ``ep``       -- ``MeshConfig(expert=n)``: routed experts split over the devices, tokens sent to them by
  all-to-all (``ragged_all_to_all`` on GPU), dropless (receive buffers sized for the worst case);
* ``ep:CF``    -- the same with ``capacity_factor=CF`` (buffers of CF x the average load; dropped pairs are
  reported in the ``dropped`` column as a fraction of all routed pairs);
* ``.../D``    -- any ``ep`` mode with ``MeshConfig.ep_dispatch=D`` (``ep/capacity``, ``ep:1.25/ragged_emulated``);
* ``...+V``    -- a variant from ``VARIANTS`` (XLA flags for the row's process and/or overrides), e.g.
  ``dp+split_ar``, ``dp+unrolled``: ``--modes=dp,dp+split_ar,dp+pipelined`` compares them in one call.

Batches are synthetic packed sequences (experiments/batches.py). ``--record`` appends the table with the date, the
card and the command to docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import pathlib
import sys
import time

from absl import app, flags

from experiments.records import append_record

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset.")
flags.DEFINE_list("devices", ["1", "2", "4"], "Device counts (the first n devices are used).")
flags.DEFINE_list("modes", ["dp", "ep", "ep:1.25"], "Layouts: dp, fsdp, ep, ep:<capacity_factor>.")
flags.DEFINE_integer("batch_per_device", 8, "Sequences per device (weak scaling).")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("steps", 10, "Timed steps per row (after 2 warm-up steps).")
flags.DEFINE_multi_string("set", [], "Extra --set style overrides for the training preset.")
flags.DEFINE_bool("record", False, "Append the results to docs/benchmarks.md.")
flags.DEFINE_bool("isolate", True, "Run every row in its own process: a crash (OOM, a native abort) becomes an error "
                  "row with the end of its log instead of ending the benchmark.")
flags.DEFINE_bool("baseline", True, "Also run the single-device row (the efficiency column's baseline).")
flags.DEFINE_bool("profile", False, "Trace 3 steps of every row and print its device time by scope and kernel "
                  "(first device).")
flags.DEFINE_string("row", None, "Internal: run one row 'mode@devices' and print it as 'ROW <json>'.")

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ``mode+NAME`` variants of a row (A/B tests of communication overlap in one call): XLA flags set for that row's
# process (needs --isolate) and/or extra overrides. The gradient all-reduces of a scanned model sit in the backward
# loop body, one combined all-reduce per layer at the end of its backward: split_ar keeps them apart so each can
# overlap the rest of the layer's backward.
VARIANTS = {
    "lhs": dict(xla="--xla_gpu_enable_latency_hiding_scheduler=true"),
    "split_ar": dict(xla="--xla_gpu_enable_latency_hiding_scheduler=true "
                         "--xla_gpu_all_reduce_combine_threshold_bytes=1048576"),
    "pipelined": dict(xla="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_pipelined_all_reduce=true "
                          "--xla_gpu_enable_while_loop_double_buffering=true"),
    "no_cmd_buffer": dict(xla="--xla_gpu_enable_command_buffer="),
    "unrolled": dict(set=["model.scan_layers=false"]),
    # one all-reduce of all gradients after a per-device backward (MeshConfig.grad_sync), float32 or bf16
    "gspmd": dict(set=["mesh.grad_sync=gspmd"]),   # XLA's per-layer all-reduces (the default before grad_sync=auto)
    "ar_after": dict(set=["mesh.grad_sync=after_backward"]),
    "ar_after_bf16": dict(set=["mesh.grad_sync=after_backward", "mesh.grad_sync_dtype=bfloat16"]),
    "bf16_master": dict(set=["model.param_dtype=bfloat16"]),
}


def _variant(mode: str) -> tuple[str, dict]:
    base, _, name = mode.partition("+")
    if name and name not in VARIANTS:
        raise app.UsageError(f"--modes: unknown variant +{name} in {mode!r}; known: {sorted(VARIANTS)}")
    return base, VARIANTS.get(name, {})

from experiments.batches import synthetic_batch  # noqa: E402


def _mesh_for(mode: str, n: int) -> dict:
    """The ``MeshConfig`` fields a mode sets (its layout); other mesh fields come from ``--set mesh.*`` / ``+V``."""
    mode = _variant(mode)[0]
    mode, _, disp = mode.partition("/")
    name, _, cf = mode.partition(":")
    layout = dict(data=1, fsdp=1, expert=1, tensor=1)
    if name == "dp":
        return {**layout, "data": n}
    if name == "fsdp":
        return {**layout, "fsdp": n}
    if name == "ep":
        return {**layout, "expert": n, "capacity_factor": float(cf) if cf else None, "ep_dispatch": disp or "auto"}
    raise app.UsageError(f"--modes: unknown mode {mode!r}; use dp, fsdp, ep, ep:<capacity_factor> (optionally "
                         f"/<dispatch>: ep/capacity, ep:1.25/ragged_emulated)")


def bench(mode: str, n: int) -> dict:
    import jax
    import jax.numpy as jnp

    from dsjax.model.moe_ep import dispatch_mode
    from dsjax.train import config as tc
    from dsjax.train import parallel
    from dsjax.train.step import init_state, make_train_step

    b = FLAGS.batch_per_device * n
    cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"data.batch_size={b}", f"data.seq_len={FLAGS.seq_len}",
                                                    "optim.warmup_steps=2", *FLAGS.set,
                                                    *_variant(mode)[1].get("set", [])])
    # n=1: all axis sizes 1 -> no plan -> the plain single-device path
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **_mesh_for(mode, n)))
    devices = jax.devices()[:n]
    plan = parallel.plan_for(cfg, devices)
    graphdef, p, r = parallel.split_abstract(cfg)
    batch_np = synthetic_batch(b, FLAGS.seq_len, cfg.model.vocab_size)
    if plan is None:
        step = jax.jit(make_train_step(cfg, graphdef, p, r), donate_argnums=0)
        state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(0))
        batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    else:
        step = parallel.jit_train_step(cfg, plan, graphdef, p, r)
        state = parallel.init_state_sharded(cfg, jax.random.key(0), plan)
        batch = parallel.put_batch(batch_np, plan)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, m = compiled(state, batch)
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = compiled(state, batch)
    m = jax.device_get(m)  # host sync
    dt = (time.perf_counter() - t0) / FLAGS.steps
    if FLAGS.profile:
        import tempfile

        from experiments.traces import summarize_trace

        tmp = tempfile.mkdtemp()
        jax.profiler.start_trace(tmp)
        for _ in range(3):
            state, m2 = compiled(state, batch)
        jax.block_until_ready(m2)
        jax.profiler.stop_trace()
        print(f"--- profile of {mode}@{n}", flush=True)
        summarize_trace(tmp, 3, device=f"/device:{devices[0].platform.upper()}:0")
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices) / 2**30
    pairs = b * FLAGS.seq_len * cfg.model.num_experts_per_tok * (
        cfg.model.num_hidden_layers - cfg.model.first_k_dense_replace + cfg.model.num_nextn_predict_layers)
    row = {"mode": mode, "devices": n, "mesh": "single device" if plan is None else
           "x".join(str(v) for v in plan.mesh.shape.values()),
           "dispatch": dispatch_mode(plan) if plan is not None and plan.mesh.shape["expert"] > 1 else "-",
           "global_batch": b, "step_ms": 1e3 * dt, "tokens_per_s": b * FLAGS.seq_len / dt, "compile_s": compile_s,
           "peak_gib": peak, "loss": float(m["loss"]), "dropped": float(m.get("moe_dropped", 0.0)) / pairs}
    del state, compiled, step, batch
    gc.collect()
    return row


def _run_isolated(mode: str, n: int) -> dict:
    """One row in a child process (same flags); its failure, whatever the kind, is reported as an error row."""
    import subprocess

    args = [sys.executable, "-m", "experiments.bench_scaling", f"--row={mode}@{n}", f"--config={FLAGS.config}",
            f"--batch_per_device={FLAGS.batch_per_device}", f"--seq_len={FLAGS.seq_len}", f"--steps={FLAGS.steps}",
            f"--profile={FLAGS.profile}",
            *[f"--set={x}" for x in FLAGS.set]]
    env = dict(os.environ)
    extra = _variant(mode)[1].get("xla")
    if extra:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra}".strip()
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines():
        if FLAGS.profile and not line.startswith("ROW "):
            print(line)
        if line.startswith("ROW "):
            return json.loads(line[4:])
    log = (res.stderr or res.stdout).strip().splitlines()
    print(f"--- row {mode}@{n} failed (exit {res.returncode}); end of its log:", *log[-40:], "---", sep="\n",
          flush=True)
    tail = " ".join(log[-6:])
    return {"mode": mode, "devices": n, "error": f"exit {res.returncode}: {tail[-280:]}"}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    if FLAGS.row:
        mode, _, n = FLAGS.row.partition("@")
        try:
            row = bench(mode, int(n))
        except Exception as e:  # noqa: BLE001 - reported as an error row by the parent
            row = {"mode": mode, "devices": int(n), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("ROW " + json.dumps(row), flush=True)
        return

    dev = jax.devices()[0]
    counts = [int(x) for x in FLAGS.devices]
    print(f"device: {dev.device_kind} x{jax.device_count()} ({dev.platform}), jax {jax.__version__}", flush=True)
    skipped = [c for c in counts if c > jax.device_count()]
    if skipped:
        print(f"skipping device counts {skipped}: only {jax.device_count()} device(s) here", flush=True)
    if not FLAGS.isolate and any(_variant(m)[1].get("xla") for m in FLAGS.modes):
        raise app.UsageError("variants with XLA flags need --isolate (flags are read when a process starts)")
    rows = []
    jobs = [(m, n) for m in FLAGS.modes for n in counts
            if n <= jax.device_count() and (n > 1 or m == "dp")]  # n=1 of every mode is the single-device path
    if ("dp", 1) not in jobs and FLAGS.baseline:
        jobs.insert(0, ("dp", 1))                                  # the baseline of the efficiency column
    for mode, n in jobs:
        if FLAGS.isolate:
            rows.append(_run_isolated(mode, n))
        else:
            try:
                rows.append(bench(mode, n))
            except Exception as e:  # noqa: BLE001 - report OOM / unsupported layouts and go on
                rows.append({"mode": mode, "devices": n, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if r.get("mode") == "dp" and r["devices"] == 1
                 and "tokens_per_s" in r), None)
    lines = ["| mode | devices | mesh (d x f x e x t) | dispatch | global batch | step ms | tokens/s | "
             "tokens/s per device | weak-scaling efficiency | dropped pairs | peak GiB/device | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            err = " ".join(r["error"].split())[:150].replace("|", "/")   # one table row: no newlines or pipes
            lines.append(f"| {r['mode']} | {r['devices']} | error: {err} | | | | | | | | | |")
            continue
        eff = f"{100 * r['tokens_per_s'] / (r['devices'] * base):.1f}%" if base else "n/a"
        lines.append(f"| {r['mode']} | {r['devices']} | {r['mesh']} | {r['dispatch']} | {r['global_batch']} x "
                     f"{FLAGS.seq_len} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / r['devices']:,.0f} | {eff} | {100 * r['dropped']:.2f}% | "
                     f"{r['peak_gib']:.1f} | {r['compile_s']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"Scaling, `{FLAGS.config}`, {FLAGS.batch_per_device} x {FLAGS.seq_len} tokens per device "
                      f"({datetime.date.today().isoformat()}, {jax.device_count()} x {dev.device_kind}, "
                      f"jax {jax.__version__})",
                      "Weak-scaling efficiency = tokens/s / (devices x single-device tokens/s); dropped pairs as a "
                      f"fraction of all routed (token, expert) pairs.\n\n{table}", "bench_scaling")


if __name__ == "__main__":
    app.run(main)
