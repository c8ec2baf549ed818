"""MoE expert GEMMs in FP8 training: forward + backward time of one expert projection, three ways, same inputs.

    python -m experiments.bench_fp8_experts --record

For each shape (``M`` routed rows = tokens x top-k, ``K`` in, ``N`` out, ``G`` experts, rows spread over the
experts with a skewed random routing) it times ``jax.value_and_grad`` of ``sum(y * c)`` for:

* ``bf16``: ``pallas_kernels.grouped_matmul`` on BF16 operands (the BF16 training path);
* ``fp8 (dequantised)``: ``fp8_grouped_linear(gemm="bf16")``, FP8-quantised operands through the BF16 grouped
  kernel (``ModelConfig.fp8_grouped_gemm="bf16"``; what ``"auto"`` runs off Hopper);
* ``fp8 (grouped FP8 GEMM)``: ``fp8_grouped_linear(gemm="fp8")``, forward and dgrad through the m-grouped FP8 GEMM
  (``ModelConfig.fp8_grouped_gemm="fp8"``; what the default ``"auto"`` runs on Hopper).

``--profile`` also traces each variant (CUDA command buffers off, so every kernel names its HLO op) and prints its
device time split by the named scopes of ``fp8_grouped_linear`` (weight quantisation, row layout, activation
quantisation, the grouped FP8 GEMM, the weight gradient's quantisation and GEMM).

It checks the two FP8 paths against each other (relative difference of y, dx, dw; the same quantised operands, so
only summation order and the BF16 rounding of dequantised operands differ) and prints a table (median of
``--iters`` timed calls after a warm-up, wall clock with ``block_until_ready``).
"""

from __future__ import annotations

import datetime
import os
import tempfile

from absl import app, flags

from experiments.records import append_record
from experiments.timing import median_seconds

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["98304x1024x512x64", "98304x512x1024x64", "32768x7168x2048x32"],
                  "MxKxNxG: routed rows, in features, out features, experts (defaults: `small`'s gate/up and down "
                  "projections at 16k tokens x top-6, and a DeepSeek-V3 expert shape).")
flags.DEFINE_integer("iters", 20, "Timed calls per variant.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")
flags.DEFINE_bool("profile", False, "Also print each variant's device time by fp8_grouped_linear's named scopes.")

FP8_SCOPES = ("fp8_weight_quant", "fp8_layout", "fp8_act_quant", "fp8_grouped_gemm", "fp8_wgrad_quant", "fp8_wgrad")


def _profile(f, x, w, title: str, calls: int = 3) -> None:
    import jax

    from experiments.traces import summarize_trace

    hlo = f.lower(x, w).compile().as_text()
    tmp = tempfile.mkdtemp()
    jax.profiler.start_trace(tmp)
    for _ in range(calls):
        out = f(x, w)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    print(f"--- profile: {title}", flush=True)
    try:
        summarize_trace(tmp, calls, top=12, hlo_text=hlo, scopes=FP8_SCOPES)
    except IndexError:   # no device plane (CPU)
        print("  (no GPU trace)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.profile:   # before jax starts: one kernel per HLO op in the trace (else command_buffer_N)
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import fp8_grouped_linear, grouped_matmul

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    rows = []
    for spec in FLAGS.shapes:
        m, k, n, g = (int(v) for v in spec.split("x"))
        kx, kw, kc, kr = jax.random.split(jax.random.key(0), 4)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)
        w = (jax.random.normal(kw, (g, k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        c = jax.random.normal(kc, (m, n), jnp.bfloat16)
        p = jax.random.dirichlet(kr, jnp.ones((g,)))              # skewed routing: uneven group sizes
        sizes = jnp.floor(p * m).astype(jnp.int32)
        sizes = sizes.at[0].add(m - jnp.sum(sizes))

        def loss(f):
            return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * c), argnums=(0, 1)))

        variants = {
            "bf16": loss(lambda x, w: grouped_matmul(x, w, sizes)),
            "fp8 (dequantised)": loss(lambda x, w: fp8_grouped_linear(x, w, sizes, gemm="bf16")),
            "fp8 (grouped FP8 GEMM)": loss(lambda x, w: fp8_grouped_linear(x, w, sizes, gemm="fp8")),
        }
        outs = {}
        for name, f in variants.items():
            try:
                outs[name] = f(x, w)
                ms = 1e3 * median_seconds(f, x, w, iters=FLAGS.iters)
                rows.append({"shape": spec, "variant": name, "ms": ms, "tflops": 3 * 2 * m * k * n / ms / 1e9})
                if FLAGS.profile:
                    _profile(f, x, w, f"{spec} {name}")
            except Exception as e:  # noqa: BLE001 - report a failing variant and go on
                rows.append({"shape": spec, "variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
        a, b = outs.get("fp8 (grouped FP8 GEMM)"), outs.get("fp8 (dequantised)")
        if a is not None and b is not None:
            ya, yb = (jax.jit(lambda x, w, g=g_: fp8_grouped_linear(x, w, sizes, gemm=g))(x, w)
                      for g_ in ("fp8", "bf16"))
            diffs = [ya, yb, a[1][0], b[1][0], a[1][1], b[1][1]]
            rel = [float(np.linalg.norm(np.asarray(diffs[i], np.float32) - np.asarray(diffs[i + 1], np.float32))
                         / np.linalg.norm(np.asarray(diffs[i + 1], np.float32))) for i in (0, 2, 4)]
            rows[-1]["check"] = "y {:.1e}, dx {:.1e}, dw {:.1e}".format(*rel)
            print(f"{spec}: FP8 GEMM vs dequantised path, relative difference {rows[-1]['check']}", flush=True)
    lines = ["| M x K x N x G | variant | fwd+bwd ms | TFLOPS | vs bf16 | check vs dequantised |",
             "|---|---|---|---|---|---|"]
    base = {r["shape"]: r["ms"] for r in rows if r["variant"] == "bf16" and "ms" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['variant']} | error: {r['error'][:100]} | | | |")
            continue
        ratio = f"{base[r['shape']] / r['ms']:.2f}x" if r["shape"] in base else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {r['ms']:.3f} | {r['tflops']:.0f} | {ratio} | "
                     f"{r.get('check', '')} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"FP8 expert GEMMs, forward + backward ({datetime.date.today().isoformat()}, "
                      f"{dev.device_kind}, jax {jax.__version__})", table + "\n\n(TFLOPS: 3 GEMMs of 2MKN each; "
                      "'vs bf16': speed relative to the BF16 grouped matmul.)\n", "bench_fp8_experts")


if __name__ == "__main__":
    app.run(main)
