"""Device-time breakdown of one train step (jax.profiler trace, aggregated by name scope and kernel).

    python -m experiments.profile_step --config=small --set model.attention_impl=cudnn

Prints the device time per step grouped by the dsjax name scopes (mla, moe/router, moe/routed_experts, ce_loss,
optimizer, ...) and the 80 most expensive kernels. XLA's own kernels are attributed through the compiled HLO
(kernel name -> fusion -> its JAX name stack); library kernels (cuBLAS, cuDNN, Mosaic GPU) run inside CUDA command
buffers by default, where the trace only names the buffer: ``--nocommand_buffers`` attributes them too.
"""

import tempfile

from absl import app, flags

from experiments.traces import summarize_trace

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset.")
flags.DEFINE_multi_string("set", [], "Overrides.")
flags.DEFINE_integer("batch_size", 8, "Batch.")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("steps", 3, "Profiled steps.")
flags.DEFINE_bool("command_buffers", True, "Keep XLA's CUDA command buffers (the default, as training runs). Off: "
                  "every kernel event names its HLO op, so library kernels (cuBLAS, cuDNN, Mosaic GPU) are attributed "
                  "to name scopes too, at the cost of per-kernel launch overhead in the timings.")
flags.DEFINE_string("hlo_out", None, "Also write the compiled (optimised) HLO text of the step here (.gz: gzipped), "
                    "to read what each fusion in the kernel list computes.")


def main(argv):
    if not FLAGS.command_buffers:   # before jax starts
        import os

        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsjax.model import Transformer
    from dsjax.train import config as tc
    from dsjax.train.step import init_state, make_train_step, split_model
    from experiments.batches import synthetic_batch

    cfg = tc.apply_overrides(tc.get(FLAGS.config), [f"data.batch_size={FLAGS.batch_size}",
                                                    f"data.seq_len={FLAGS.seq_len}", *FLAGS.set])
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, graphdef, p, r), donate_argnums=0)
    state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in synthetic_batch(FLAGS.batch_size, FLAGS.seq_len,
                                                           cfg.model.vocab_size).items()}
    step = step.lower(state, batch).compile()  # compiled once: its HLO is what runs below
    hlo_text = step.as_text()                  # names XLA's kernels' scopes (inside command buffers too)
    if FLAGS.hlo_out:
        import gzip

        with (gzip.open if FLAGS.hlo_out.endswith(".gz") else open)(FLAGS.hlo_out, "wt") as f:
            f.write(hlo_text)
    for _ in range(3):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    tmp = tempfile.mkdtemp()
    jax.profiler.start_trace(tmp)
    for _ in range(FLAGS.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    summarize_trace(tmp, FLAGS.steps, top=80, hlo_text=hlo_text)


if __name__ == "__main__":
    app.run(main)
