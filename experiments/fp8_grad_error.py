"""Where does FP8 training lose accuracy? Gradient error of one batch, FP8 against FP32, per group of layers.

    python -m experiments.fp8_grad_error --layers=3 --batch_size=2 --seq_len=512      # CPU: ~3 minutes

Builds the ``--config`` model preset with ``--layers`` layers (no MTP, unscanned), takes one batch of the default
training data and computes the gradient of the next-token loss for the same initial parameters with:

* FP32 compute (the reference), BF16 compute (the preset's), FP8 everywhere (``fp8=True``), FP8 with the first
  layer in BF16 (``fp8_bf16_layers=1``), FP8 with the shared latent key/value projections in BF16
  (``fp8_bf16_projections=("kv_a_proj_with_mqa", "kv_b_proj")``);
* FP8 in one kind of GEMM of the dense projections only -- forward, dgrad or wgrad (``fp8_linear(quantize=(g,))``;
  the experts stay FP8);
* FP8 in the experts only (dense ``fp8_linear`` calls run unquantised), FP8 in the dense projections only (the
  experts run the BF16 grouped matmul), and FP8 in one dense projection at a time (``--one_at_a_time``),
  selected by the (K, N) of its weight.

For each run it prints the median and maximum over parameters of ``|g - g_fp32| / |g_fp32|`` and the worst
parameter. Every ``fp8_linear`` / ``fp8_grouped_linear`` call has the same per-op error (~3.7% for Gaussian
operands): differences between the rows are the model's sensitivity to where the quantisation noise enters.
"""

from __future__ import annotations

import functools
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Model preset (dsjax.configs).")
flags.DEFINE_integer("layers", 3, "num_hidden_layers of the model.")
flags.DEFINE_integer("batch_size", 2, "Sequences in the batch.")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence.")
flags.DEFINE_bool("one_at_a_time", True, "Also quantise each dense projection alone.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsjax.model.layers as layers
    import dsjax.model.moe as moe
    from dsjax import configs
    from dsjax.data import make_dataset, make_tokenizer
    from dsjax.model import Transformer
    from dsjax.train import config as tc
    from pallas_kernels import grouped_matmul

    tcfg = tc.apply_overrides(tc.get("small"), [f"data.batch_size={FLAGS.batch_size}",
                                                f"data.seq_len={FLAGS.seq_len}"])
    batch = {k: jnp.asarray(v) for k, v in next(iter(make_dataset(
        tcfg.data, make_tokenizer(tcfg.data), process_index=0, process_count=1))).items()}

    def grads(**overrides):
        cfg = configs.get(FLAGS.config, num_hidden_layers=FLAGS.layers, num_nextn_predict_layers=0,
                          scan_layers=False, **overrides)
        gd, params, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss(params):
            m = nnx.merge(gd, params, rest)
            out = m(batch["tokens"], batch["segment_ids"], batch["positions"], return_hidden=True,
                    compute_logits=False)
            logp = jax.nn.log_softmax(m.logits_f32(out.hidden[:, :-1]), -1)
            return -jnp.mean(jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], -1))

        return {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                for k, v in jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))}

    t0 = time.time()
    ref = grads(dtype="float32")

    def report(name, g):
        errs = {k: np.linalg.norm(g[k] - ref[k]) / (np.linalg.norm(ref[k]) + 1e-30) for k in ref}
        worst = max(errs, key=errs.get)
        e = np.array(list(errs.values()))
        print(f"{name:40s} median {np.median(e):.4f}  max {e.max():.4f}  worst {worst}  ({time.time() - t0:.0f} s)",
              flush=True)

    report("bf16 compute", grads())
    report("fp8 everywhere", grads(fp8=True))
    report("fp8, layer 0 in bf16 (fp8_bf16_layers=1)", grads(fp8=True, fp8_bf16_layers=1))
    report("fp8, kv_a/kv_b in bf16 (fp8_bf16_projections)",
           grads(fp8=True, fp8_bf16_projections=("kv_a_proj_with_mqa", "kv_b_proj")))
    dense = layers.fp8_linear
    experts = moe.fp8_grouped_linear

    def bf16_experts(x, w, group_sizes, compute_dtype=jnp.bfloat16, implementation="auto"):
        return grouped_matmul(x.astype(compute_dtype), w.astype(compute_dtype), group_sizes,
                              implementation=implementation)

    try:
        for g in ("fwd", "dgrad", "wgrad"):
            layers.fp8_linear = functools.partial(dense, quantize=(g,))
            report(f"fp8 dense: {g} GEMMs only (+ experts)", grads(fp8=True))
        layers.fp8_linear = functools.partial(dense, quantize=False)
        report("fp8 experts only", grads(fp8=True))
        layers.fp8_linear = dense
        moe.fp8_grouped_linear = bf16_experts
        report("fp8 dense projections only", grads(fp8=True))
        if FLAGS.one_at_a_time:
            shapes: dict[tuple[int, int], set[str]] = {}      # the weight's (K, N) -> the projections with it
            m = nnx.eval_shape(lambda: Transformer(configs.get(
                FLAGS.config, num_hidden_layers=FLAGS.layers, num_nextn_predict_layers=0, scan_layers=False,
                fp8=True), rngs=nnx.Rngs(0)))
            for path, mod in nnx.iter_graph(m):
                if isinstance(mod, layers.Linear) and mod.fp8_compute:
                    k = int(np.prod(mod.in_features))
                    shapes.setdefault((k, int(np.prod(mod.out_features))), set()).add(str(path[-1]))
            for (k, n), names in sorted(shapes.items(), key=lambda s: sorted(s[1])):
                def only(x, w, keep=(k, n), **kw):
                    return dense(x, w, quantize=tuple(w.shape) == keep, **kw)
                layers.fp8_linear = only
                report(f"fp8 only in {'+'.join(sorted(names))} ({k}x{n})", grads(fp8=True))
    finally:
        layers.fp8_linear = dense
        moe.fp8_grouped_linear = experts


if __name__ == "__main__":
    app.run(main)
