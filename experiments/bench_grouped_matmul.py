"""BF16 grouped (MoE expert) GEMMs of the train step: the library path against the dense-GEMM ceiling, and a sweep of
the Mosaic GPU kernels' tilings.

    python -m experiments.bench_grouped_matmul --record
    python -m experiments.bench_grouped_matmul --sweep          # also time each kernel under several tilings

Shapes are `small`'s routed experts at ``--tokens`` tokens x top-``K`` (``M = tokens * K`` routed rows, hidden
``D``, expert width ``F``, ``G`` experts), rows spread over the experts by a skewed random routing (uneven group
sizes, as training sees). Each row times ``jax.value_and_grad`` of ``sum(y * c)`` (forward + both gradients):

* ``gate, up: two GEMMs``: ``x [M, D] @ w [G, D, F]`` twice, as two calls (``RoutedExperts`` before fusing);
* ``gate+up fused``: one call on the concatenated ``[G, D, 2F]`` weights (same FLOPs);
* ``down``: ``h [M, F] @ w [G, F, D]``;
* ``dense ceiling``: a plain ``[M, D] @ [D, 2F]`` matmul (cuBLAS) of the fused projection's FLOPs: what the grouped
  kernels could reach if grouping cost nothing.

``--sweep`` times the three Mosaic GPU kernels the grouped matmul runs (forward ``ragged_dot``, its activation
gradient ``ragged_dot(transpose_rhs=True)``, the weight gradient ``transposed_ragged_dot``) alone on the fused
shape, under each tiling ``bm x bn x bk / stages / grid_block_n`` in ``--tilings``, with the library's current
tiling first. Times: median of ``--iters`` calls after a warm-up (wall clock, ``block_until_ready``); each
kernel's output is checked against the first tiling's.
"""

from __future__ import annotations

from absl import app, flags

from experiments.records import finish_table
from experiments.timing import median_seconds

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 16384, "Tokens per step (small's 8 x 2048).")
flags.DEFINE_integer("topk", 6, "Experts per token.")
flags.DEFINE_integer("hidden", 1024, "D.")
flags.DEFINE_integer("expert_width", 512, "F (moe_intermediate_size).")
flags.DEFINE_integer("experts", 64, "G.")
flags.DEFINE_integer("iters", 20, "Timed calls per row.")
flags.DEFINE_bool("sweep", False, "Also sweep the Mosaic GPU kernels' tilings.")
flags.DEFINE_list("tilings", ["128x128x64/4/4", "128x128x64/4/1", "128x128x64/4/8", "128x128x64/6/4",
                              "128x128x128/3/4", "128x64x128/4/4", "64x256x64/4/4", "64x256x64/6/4",
                              "64x256x128/3/4", "128x256x64/3/4"],
                  "bm x bn x bk / stages / grid_block_n tilings for --sweep (the first is the library's).")
flags.DEFINE_bool("record", False, "Append the tables to docs/benchmarks.md.")


def _inputs(m, d, f, g):
    import jax
    import jax.numpy as jnp

    kx, kw, kr = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, d), jnp.bfloat16)
    w = (jax.random.normal(kw, (g, d, 2 * f), jnp.float32) * 0.02).astype(jnp.bfloat16)
    p = jax.random.dirichlet(kr, jnp.ones((g,)) * 4.0)          # skewed routing: uneven group sizes
    sizes = jnp.floor(p * m).astype(jnp.int32)
    return x, w, sizes.at[0].add(m - jnp.sum(sizes))


def _library_rows(m, d, f, g):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import grouped_matmul

    x, w, sizes = _inputs(m, d, f, g)
    wg, wu = w[..., :f], w[..., f:]
    wd = (jax.random.normal(jax.random.key(4), (g, f, d), jnp.float32) * 0.02).astype(jnp.bfloat16)
    h = jax.random.normal(jax.random.key(5), (m, f), jnp.bfloat16)
    c2 = jax.random.normal(jax.random.key(1), (m, 2 * f), jnp.bfloat16)
    cd = jax.random.normal(jax.random.key(2), (m, d), jnp.bfloat16)
    dense_w = w[0]

    def vg(fn, c):
        return jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(fn(a, b).astype(jnp.float32) * c), argnums=(0, 1)))

    two = vg(lambda a, b: jnp.concatenate([grouped_matmul(a, b[0], sizes), grouped_matmul(a, b[1], sizes)], -1), c2)
    fused = vg(lambda a, b: grouped_matmul(a, b, sizes), c2)
    down = vg(lambda a, b: grouped_matmul(a, b, sizes), cd)
    dense = vg(lambda a, b: a @ b, c2)
    flops_up, flops_down = 3 * 2 * m * d * 2 * f, 3 * 2 * m * f * d
    cases = [("gate, up: two GEMMs", two, (x, (wg, wu)), flops_up),
             ("gate+up fused", fused, (x, w), flops_up),
             ("down", down, (h, wd), flops_down),
             ("dense ceiling (cuBLAS, fused FLOPs)", dense, (x, dense_w), flops_up)]
    rows = []
    for name, fn, args, flops in cases:
        try:
            ms = 1e3 * median_seconds(fn, *args, iters=FLAGS.iters)
            rows.append((name, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}"))
        except Exception as e:  # noqa: BLE001 - report the failing row and go on
            rows.append((name, f"error: {type(e).__name__}: {str(e)[:120]}", ""))
        print(rows[-1], flush=True)
    return rows


def _sweep_rows(m, d, f, g):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    x, w, sizes = _inputs(m, d, f, g)
    n = 2 * f
    dy = jax.random.normal(jax.random.key(3), (m, n), jnp.bfloat16)
    kernels = {
        "forward x @ w": (lambda t: jax.jit(lambda a, b: ragged_dot_mgpu.ragged_dot(
            a, b, group_sizes=sizes, block_m=t[0], block_n=t[1], block_k=t[2], max_concurrent_steps=t[3],
            grid_block_n=t[4])), (x, w), 2 * m * d * n),
        "dgrad dy @ w^T": (lambda t: jax.jit(lambda a, b: ragged_dot_mgpu.ragged_dot(
            a, b, group_sizes=sizes, block_m=t[0], block_n=t[1], block_k=t[2], max_concurrent_steps=t[3],
            grid_block_n=t[4], transpose_rhs=True)), (dy, w), 2 * m * d * n),
        "wgrad x_g^T dy_g": (lambda t: jax.jit(lambda a, b: transposed_ragged_dot_mgpu.transposed_ragged_dot(
            a, b, group_sizes=sizes, block_m=t[0], block_n=t[1], block_k=t[2], max_concurrent_steps=t[3],
            grid_block_n=t[4])), (x, dy), 2 * m * d * n),
    }
    rows = []
    for name, (make, args, flops) in kernels.items():
        ref = None
        for spec in FLAGS.tilings:
            blocks, stages, gbn = spec.split("/")
            t = tuple(int(v) for v in blocks.split("x")) + (int(stages), int(gbn))
            try:
                fn = make(t)
                out = np.asarray(fn(*args), np.float32)
                if ref is None:
                    ref = out
                err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
                ms = 1e3 * median_seconds(fn, *args, iters=FLAGS.iters)
                rows.append((name, spec, f"{ms:.3f}", f"{flops / ms / 1e9:.0f}", f"{err:.1e}"))
            except Exception as e:  # noqa: BLE001 - a tiling the kernel rejects (SMEM, registers, divisibility)
                rows.append((name, spec, f"error: {type(e).__name__}: {str(e)[:100]}", "", ""))
            print(rows[-1], flush=True)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}, jax {jax.__version__}", flush=True)
    m, d, f, g = FLAGS.tokens * FLAGS.topk, FLAGS.hidden, FLAGS.expert_width, FLAGS.experts
    shape = f"M={m} (={FLAGS.tokens} tokens x top-{FLAGS.topk}), D={d}, F={f}, G={g}"
    lines = [f"Forward + backward (value_and_grad), {shape}:", "",
             "| GEMMs | ms | TFLOPS |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _library_rows(m, d, f, g)]
    if FLAGS.sweep:
        lines += ["", f"Kernels alone on the fused shape (x [M, D] x w [G, D, 2F]), {shape}; tiling "
                      "bm x bn x bk / stages / grid_block_n, max rel. diff vs the first tiling:", "",
                  "| kernel | tiling | ms | TFLOPS | diff |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d_} | {e} |" for a, b, c, d_, e in _sweep_rows(m, d, f, g)]
    finish_table(lines, "BF16 grouped expert GEMMs, `small` shapes", "bench_grouped_matmul", FLAGS.record)


if __name__ == "__main__":
    app.run(main)
