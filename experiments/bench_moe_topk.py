"""The routers' expert selection (``pallas_kernels.moe_topk``): its Pallas Triton kernel against the XLA reference
(``lax.top_k`` on group scores and on the masked scores), in device time, with a check that both pick the same
experts.

    python -m experiments.bench_moe_topk --record

Rows: `small`'s router (64 experts in 8 groups, keep 4, top 6) at decode batch 1 and 32, a batch-32 speculative
verification of 4 tokens, and a training step of 8 x 2048 tokens; DeepSeek-V3's (256 in 8, keep 4, top 8) at
batch 1 and 32 and over 16k tokens; DeepSeek-V2's (160 in 8, keep 3, top 6, max group scores; padded to 8 x 32)
at batch 32. Columns: the XLA reference and the kernel in kernel time (CUPTI durations,
``experiments.timing.kernel_us_per_call``), and both with ``--repeats`` calls in one jitted ``fori_loop``
(``loop_us_per_call``: loop and launch overhead included, ~11 us per iteration for XLA's kernels, ~20 us with the
Triton custom call in the loop). The input is float32 scores rounded to 1/64 so that ties occur. The last columns
time ``moe_topk_weights`` (selection plus the combine weights: the XLA reference's gather and renormalisation after
the selection, against the kernel doing both) in kernel time.
"""

from __future__ import annotations

from absl import app, flags

from experiments.records import finish_table, stream_rows
from experiments.timing import kernel_us_per_call, loop_us_per_call

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 100, "Calls inside one jitted loop per timing.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

# (name, T, E, n_group, topk_group, K, group score)
SHAPES = [("small, decode batch 1", 1, 64, 8, 4, 6, "top2_sum"),
          ("small, decode batch 32", 32, 64, 8, 4, 6, "top2_sum"),
          ("small, verify 32 x 4", 128, 64, 8, 4, 6, "top2_sum"),
          ("small, train 8 x 2048", 16384, 64, 8, 4, 6, "top2_sum"),
          ("V3, decode batch 1", 1, 256, 8, 4, 8, "top2_sum"),
          ("V3, decode batch 32", 32, 256, 8, 4, 8, "top2_sum"),
          ("V3, 16k tokens", 16384, 256, 8, 4, 8, "top2_sum"),
          ("V2 (groups padded 20 -> 32), decode batch 32", 32, 160, 8, 3, 6, "max")]


def _rows():
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import hardware
    from pallas_kernels.moe_topk import default_block_rows, moe_topk, moe_topk_weights

    for name, t, e, g, tg, k, score in SHAPES:
        x = jnp.round(jax.random.normal(jax.random.key(t + e), (t, e), jnp.float32) * 64) / 64
        if score == "max":                     # V2: softmax scores, positive
            x = jax.nn.softmax(x, axis=-1)
        fns = {impl: functools.partial(moe_topk, k=k, n_group=g, topk_group=tg, group_score=score,
                                       implementation=impl) for impl in ("xla", "pallas")}
        same = bool(np.array_equal(np.asarray(jax.jit(fns["xla"])(x)), np.asarray(jax.jit(fns["pallas"])(x))))
        kern = {n: kernel_us_per_call(jax.jit(f), x) for n, f in fns.items()}
        loop = {n: loop_us_per_call(f, x, repeats=FLAGS.repeats) for n, f in fns.items()}
        scores = jax.nn.sigmoid(x)
        wfns = {impl: jax.jit(functools.partial(moe_topk_weights, k=k, n_group=g, topk_group=tg, group_score=score,
                                                norm=True, scale=2.5, implementation=impl))
                for impl in ("xla", "pallas")}
        (wx, ix), (wp, ip) = (wfns[n](x, scores) for n in ("xla", "pallas"))
        same_w = bool(np.array_equal(np.asarray(ix), np.asarray(ip))) and bool(
            np.allclose(np.asarray(wx), np.asarray(wp), rtol=1e-6))
        wkern = {n: kernel_us_per_call(f, x, scores) for n, f in wfns.items()}
        yield (name, f"{t} x {e} ({g} / {tg} / {k})", f"{kern['xla']:.1f}", f"{kern['pallas']:.1f}",
               f"{kern['xla'] / kern['pallas']:.2f}x", f"{loop['xla']:.1f} / {loop['pallas']:.1f}",
               str(default_block_rows(t, e, hardware.num_sms())), "yes" if same else "**NO**",
               f"{wkern['xla']:.1f} / {wkern['pallas']:.1f}", "yes" if same_w else "**NO**")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    if jax.default_backend() != "gpu":
        raise app.UsageError("bench_moe_topk times the Triton kernel: run it on a GPU")
    lines = ["Kernel time per call (CUPTI durations of the kernels one call launches, summed; "
             "experiments.timing.kernel_us_per_call), us; and the time per call with "
             f"{FLAGS.repeats} calls in one jitted loop (loop_us_per_call: launch and loop overhead included):", "",
             "| selection | T x E (groups / kept / K) | xla | kernel | kernel vs xla | in a loop: xla / kernel | "
             "tokens per program | same indices | with weights: xla / kernel | same (weights to 1e-6) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    stream_rows(lines, _rows())
    finish_table(lines, "MoE expert selection", "bench_moe_topk", FLAGS.record)


if __name__ == "__main__":
    app.run(main)
