"""Prefill and decode throughput of dsjax.generate vs HF transformers' generate (static cache), same model shape.

    python -m experiments.bench_decode --config=small --batch_sizes=1,32,256 --prompt_len=128 --new_tokens=128 \
        --hf --record
    python -m experiments.bench_decode --batch_sizes=1,32 --variant=sampling.unstack_layers=False \
        --variant=moe_dense_decode_tokens=0 --hf   # variants against the defaults, same run

Random weights (throughput does not depend on them; stop tokens are disabled so every sample decodes
``new_tokens``). Prefill tokens/s = B x P / time of a prefill; decode tokens/s = B x (N - 1) / (time of a full
generate - time of the prefill). Memory per sequence is the latent cache: (P + N) x L x (kv_lora_rank +
qk_rope_head_dim) x 2 bytes. HF runs in a subprocess (experiments/bench_decode_hf.py) with bf16 weights, sdpa,
``grouped_mm`` experts and ``cache_implementation="static"``.

Roofline: ``roof tok/s = B x BW / bytes`` where ``bytes`` is :func:`dsjax.decode_bytes_per_step` (every weight a
decode step touches read once, routed experts hit by at least one of the B tokens under balanced routing, the latent
cache at the mean context ``P + N/2``) and ``BW`` is the device's copy bandwidth measured in the same run (``x * 2``
on a 1 GiB bf16 array, bytes read + written over time). No decoder of these weights can beat it on this device;
the table also states which multiple of HF's decode rate the roof allows.
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
flags.DEFINE_string("config", "small", "Model preset.")
flags.DEFINE_string("batch_sizes", "1,32,256", "Comma-separated batch sizes.")
flags.DEFINE_integer("prompt_len", 128, "Prompt length (tokens).")
flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sample.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is kept).")
flags.DEFINE_integer("decode_unroll", 1, "SamplingConfig.decode_unroll (decode steps per while-loop iteration).")
flags.DEFINE_multi_string("variant", [], "Also time every batch size with these comma-separated overrides of the "
                          "ModelConfig fields (e.g. moe_dense_decode_tokens=0, scan_layers=False) and of "
                          "SamplingConfig fields prefixed 'sampling.' (e.g. sampling.unstack_layers=False).")
flags.DEFINE_bool("fp8_weights", False, "Also time the same model with its MLA, MLP and expert weights stored in "
                  "FP8 (E4M3, 128x128 block scales, as DeepSeek-V3's checkpoints ship; dequantised on the fly): "
                  "saved as a hub folder and loaded with load_hf(keep_fp8=True). Its roof counts those weights at "
                  "1 byte + scales.")
flags.DEFINE_multi_integer("fp8_kernel_min_rows", [], "With --fp8_weights: time the FP8 model once per value of "
                           "ModelConfig.fp8_weight_kernel_min_rows (products with fewer rows per group take XLA's "
                           "dequantise + einsum instead of the weight-only kernel; 1 = the kernel always) instead of "
                           "once at the library's value.")
flags.DEFINE_multi_string("fp8_variant", [], "With --fp8_weights: also time the FP8 model with these "
                          "comma-separated SamplingConfig overrides, prefixed 'sampling.' as in --variant (e.g. "
                          "sampling.fold_shared_experts=False).")
flags.DEFINE_string("mesh", "", "Also time generation on a device mesh, e.g. 'data=2' or 'expert=2' (MeshConfig "
                    "fields, comma-separated; dsjax.generate's plan= path, jit_generate). Its prefill column is a "
                    "generate of one new token; its decode rate the difference to the full generate.")
flags.DEFINE_bool("hf", False, "Also time HF transformers generate in a subprocess.")
flags.DEFINE_integer("hf_timeout_s", 1200, "Give up on an HF subprocess after this many seconds: its row reads "
                     "'timed out' and the table (and --record) still come out. Set it inside the time the whole run "
                     "has (a device call's limit): a run killed from outside writes nothing.")
flags.DEFINE_bool("profile", False, "Trace one generate call per batch size and print its device time by scope and "
                  "kernel (per decoded token: divide by new_tokens).")
flags.DEFINE_integer("profile_top", 40, "With --profile: how many of the costliest kernels to list.")
flags.DEFINE_float("stop_s", 1e9, "Skip the rows not started once this many seconds have passed since start-up, and "
                   "give HF's subprocess at most the time left: the table (and --record) still gets written when a "
                   "device call's limit is near.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

ROOT = pathlib.Path(__file__).resolve().parent.parent
T0 = time.time()


def _left() -> float:
    """Seconds left before ``--stop_s``."""
    return FLAGS.stop_s - (time.time() - T0)


def split_variant(text: str) -> tuple[list[str], list[str]]:
    """``"a=1,sampling.b=False"`` -> (ModelConfig overrides, SamplingConfig overrides) as ``key=value`` strings for
    ``dsjax.train.config.apply_overrides`` (typed by the dataclass fields; unknown keys are errors)."""
    from dsjax.train.config import split_overrides

    items = split_overrides(text)
    return ([x for x in items if not x.startswith("sampling.")],
            [x.removeprefix("sampling.") for x in items if x.startswith("sampling.")])


def _inputs(cfg, b: int):
    """Random ``[b, prompt_len]`` prompts (all full length), their lengths and one PRNG key per row."""
    import jax
    import jax.numpy as jnp

    p = FLAGS.prompt_len
    prompts = jax.random.randint(jax.random.key(b), (b, p), 3, cfg.vocab_size, jnp.int32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(b))
    return prompts, jnp.full((b,), p, jnp.int32), keys


def _best(fn) -> float:
    """Best wall-clock seconds of ``fn()`` over ``--repeats`` calls after a compile + warm-up call."""
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return min(times)


def _row(impl: str, cfg, b: int, t_pre: float, t_all: float, **extra) -> dict:
    """A table row: prefill and decode rates from the prefill-only and full generate times, cache and memory."""
    import jax

    from dsjax.model import cache_bytes_per_token

    p, n = FLAGS.prompt_len, FLAGS.new_tokens
    mem = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0)
    return {"impl": impl, "batch": b, "prefill_tok_s": b * p / t_pre,
            # a generate no longer than its own prefill (timing noise at toy sizes) gives no decode rate
            "decode_tok_s": b * (n - 1) / (t_all - t_pre) if t_all > t_pre else float("nan"), "total_s": t_all,
            "cache_bytes_per_seq": (p + n) * cache_bytes_per_token(cfg, "bfloat16"), "peak_gib": mem / 2**30,
            **extra}


def bench_dsjax(model, b: int, label: str = "dsjax", sampling_overrides: list[str] = ()) -> dict:
    """One row: ``model`` generating at batch ``b`` (``sampling_overrides``: ``key=value`` SamplingConfig fields)."""
    import jax
    from flax import nnx

    from dsjax.inference import SamplingConfig, generate_tokens, prefill
    from dsjax.model import init_cache
    from dsjax.train.config import apply_overrides

    cfg = model.cfg
    p, n = FLAGS.prompt_len, FLAGS.new_tokens
    prompts, lengths, keys = _inputs(cfg, b)
    graphdef, state = nnx.split(model)
    sampling = apply_overrides(SamplingConfig(max_new_tokens=n, temperature=0.0, use_eos=False, length_bucket=p,
                                              decode_unroll=FLAGS.decode_unroll), list(sampling_overrides))

    @jax.jit
    def only_prefill(state, prompts):
        m = nnx.merge(graphdef, state)
        return prefill(m, prompts, lengths, init_cache(cfg, b, p + n), chunk=sampling.prefill_chunk)[0]

    t_pre = _best(lambda: only_prefill(state, prompts))
    t_all = _best(lambda: generate_tokens(graphdef, state, prompts, lengths, keys, cfg=sampling).tokens)
    if FLAGS.profile:
        import tempfile

        from experiments.traces import DECODE_PHASES, DECODE_SCOPES, summarize_trace

        # compiled once here: its HLO names XLA's kernels (inside command buffers too) for the scope attribution
        compiled = generate_tokens.lower(graphdef, state, prompts, lengths, keys, cfg=sampling).compile()
        jax.block_until_ready(compiled(state, prompts, lengths, keys).tokens)   # static args baked in
        tmp = tempfile.mkdtemp()
        jax.profiler.start_trace(tmp)
        jax.block_until_ready(compiled(state, prompts, lengths, keys).tokens)   # static args baked in
        jax.profiler.stop_trace()
        print(f"--- profile of one generate call, batch {b} ({p} prompt + {n} new tokens; per decode step: divide "
              f"the decode scopes by {n - 1})", flush=True)
        summarize_trace(tmp, 1, top=FLAGS.profile_top, hlo_text=compiled.as_text(), scopes=DECODE_SCOPES,
                        phases=DECODE_PHASES)
    impl = label + (f" (unroll {FLAGS.decode_unroll})" if FLAGS.decode_unroll > 1 else "")
    return _row(impl, cfg, b, t_pre, t_all)


def bench_mesh(model, b: int, mesh: str) -> dict:
    """``bench_dsjax`` on a device mesh: greedy generation through ``jit_generate`` with the model state laid out by
    the rules table and the rows split over the batch axes."""
    import dataclasses

    from flax import nnx

    from dsjax.inference import SamplingConfig, jit_generate
    from dsjax.inference.sharded import put_rows
    from dsjax.sharding import MeshConfig, make_plan, shard_params
    from dsjax.train.config import apply_overrides, split_overrides

    plan = make_plan(apply_overrides(MeshConfig(), split_overrides(mesh)))
    graphdef, state = nnx.split(model)
    state = shard_params(state, plan)
    sampling = SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=0.0, use_eos=False,
                              length_bucket=FLAGS.prompt_len)
    gen_all = jit_generate(plan, graphdef, state, sampling=sampling)
    gen_one = jit_generate(plan, graphdef, state, sampling=dataclasses.replace(sampling, max_new_tokens=1))
    inputs = put_rows(plan, *_inputs(model.cfg, b))
    t_pre = _best(lambda: gen_one(state, *inputs).tokens)
    t_all = _best(lambda: gen_all(state, *inputs).tokens)
    return _row(f"dsjax, mesh {mesh}", model.cfg, b, t_pre, t_all, devices=plan.mesh.size)


def copy_bandwidth() -> float:
    """Bytes per second of ``x * 2`` on a 1 GiB bf16 array (read + write), best of 10 after a warm-up (64 MiB on a
    CPU, where the roof is not the point and 1 GiB takes seconds per pass)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2**29 if jax.default_backend() != "cpu" else 2**25,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)
    jax.block_until_ready(f(x))
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        best = min(best, time.perf_counter() - t0)
    return 2 * x.nbytes / best


def bench_hf(b: int) -> dict:
    from dsjax import configs

    cfg = configs.get(FLAGS.config)
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_decode_hf.py"), json.dumps(cfg.to_hf_config()),
           str(b), str(FLAGS.prompt_len), str(FLAGS.new_tokens), str(FLAGS.repeats)]
    limit = min(FLAGS.hf_timeout_s, max(_left(), 0.0))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"impl": "HF transformers", "batch": b, "error": f"timed out after {limit:.0f} s"}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"impl": "HF transformers", "batch": b, "error": (res.stderr or res.stdout)[-800:]}
    return json.loads(lines[-1])


FP8_LABEL = "dsjax, FP8 weights"


def fp8_weights_model(model, **config_overrides):
    """``model`` with its MLA, MLP and expert weights in FP8 (128x128 blocks), by a hub-folder round trip;
    ``config_overrides``: other ModelConfig fields of the loaded model (``fp8_weight_kernel_min_rows=1``)."""
    import tempfile

    import jax.numpy as jnp

    import dsjax

    with tempfile.TemporaryDirectory() as d:
        dsjax.save_hf(model, None, d)
        return dsjax.load_hf(d, dtype=jnp.dtype(model.cfg.dtype), keep_fp8=True, mtp=False,
                             scan_layers=model.cfg.scan_layers, config_overrides=config_overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    from flax import nnx

    import dsjax
    from dsjax.train.config import apply_overrides

    cfg = dsjax.configs.get(FLAGS.config, dtype="bfloat16", param_dtype="bfloat16")
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
    variants = []
    for text in FLAGS.variant:
        model_over, sampling_over = split_variant(text)
        variants.append((f"dsjax, {text}", dsjax.Transformer(apply_overrides(cfg, model_over), rngs=nnx.Rngs(0))
                         if model_over else model, sampling_over))
    if FLAGS.fp8_weights:
        for rows in FLAGS.fp8_kernel_min_rows or [None]:
            over = {} if rows is None else {"fp8_weight_kernel_min_rows": rows}
            fp8_model = fp8_weights_model(model, **over)
            label = FP8_LABEL + ("" if rows is None else f", kernel from {rows} rows")
            variants.append((label, fp8_model, []))
            for text in FLAGS.fp8_variant:
                model_over, sampling_over = split_variant(text)
                if model_over:
                    raise app.UsageError(f"--fp8_variant={text!r}: only 'sampling.' overrides apply to the FP8 model")
                variants.append((f"{label}, {text}", fp8_model, sampling_over))
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    bw = copy_bandwidth()   # first, so the table follows the last row at once (a limit once struck in between)
    rows = []

    def run(impl: str, b: int, fn) -> None:
        """One row: ``fn()``'s, an error row, or a skipped row once ``--stop_s`` has passed."""
        if _left() <= 0:
            rows.append({"impl": impl, "batch": b, "error": f"skipped: --stop_s={FLAGS.stop_s:g} reached"})
        else:
            try:
                rows.append(fn())
            except Exception as e:  # noqa: BLE001
                rows.append({"impl": impl, "batch": b, "error": f"{type(e).__name__}: {e}"[:300]})
        print(json.dumps(rows[-1]), flush=True)

    for b in [int(x) for x in FLAGS.batch_sizes.split(",")]:
        run("dsjax", b, lambda: bench_dsjax(model, b))
        for label, variant, sampling_over in variants:
            run(label, b, lambda: bench_dsjax(variant, b, label, sampling_over))
        if FLAGS.mesh:
            run(f"dsjax, mesh {FLAGS.mesh}", b, lambda: bench_mesh(model, b, FLAGS.mesh))
        if FLAGS.hf:
            run("HF transformers", b, lambda: bench_hf(b))
    context = FLAGS.prompt_len + FLAGS.new_tokens / 2
    hf = {r["batch"]: r for r in rows if r["impl"] == "HF transformers" and "error" not in r}
    lines = ["| impl | batch | prefill tok/s | decode tok/s | decode vs HF | roof tok/s | % of roof | roof vs HF | "
             "cache MiB/seq | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['batch']} | error: {r['error'][:100]} | | | | | | | |")
            continue
        if "devices" in r:                  # a mesh: no one-device roof (per-device bytes and bandwidth differ)
            lines.append(f"| {r['impl']} ({r['devices']} devices) | {r['batch']} | {r['prefill_tok_s']:,.0f} | "
                         f"{r['decode_tok_s']:,.1f} | | | | | {r['cache_bytes_per_seq'] / 2**20:.2f} | "
                         f"{r['peak_gib']:.1f} (device 0) |")
            continue
        roof = r["batch"] * bw / dsjax.decode_bytes_per_step(cfg, r["batch"], context,
                                                            fp8_weights=r["impl"].startswith(FP8_LABEL))["total"]
        ours = r["impl"].startswith("dsjax") and r["batch"] in hf
        ratio = f"{r['decode_tok_s'] / hf[r['batch']]['decode_tok_s']:.1f}x" if ours else ""
        roof_hf = f"{roof / hf[r['batch']]['decode_tok_s']:.1f}x" if ours else ""
        lines.append(f"| {r['impl']} | {r['batch']} | {r['prefill_tok_s']:,.0f} | {r['decode_tok_s']:,.1f} | "
                     f"{ratio} | {roof:,.0f} | {100 * r['decode_tok_s'] / roof:.0f}% | {roof_hf} | "
                     f"{r.get('cache_bytes_per_seq', 0) / 2**20:.2f} | {r.get('peak_gib', 0):.1f} |")
    lines.append("")
    lines.append(f"(Roof: B x {bw / 1e9:,.0f} GB/s, this device's measured copy bandwidth, / the bytes a decode step "
                 f"must read, `dsjax.decode_bytes_per_step` at a mean context of {context:g} tokens with "
                 f"{cfg.param_dtype} weights (the FP8-weights row: its MLA, MLP and expert weights at 1 byte + "
                 f"128x128 block scales); 'roof vs HF' is the most any decoder of these weights can reach as a "
                 f"multiple of HF's rate on this device.)")
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"Decoding, `{FLAGS.config}`, prompt {FLAGS.prompt_len} + {FLAGS.new_tokens} new tokens "
                      f"({datetime.date.today().isoformat()}, {dev.device_kind}, jax {jax.__version__})", table,
                      "bench_decode")


if __name__ == "__main__":
    app.run(main)
