"""Default job: builds a preset, prints its parameter table and runs a jitted forward pass.

    python -m experiments.main --config=tiny
    python -m experiments.main --config=deepseek-v3        # table only: too big to allocate here

(Replaced by the training job once training lands.)
"""

from __future__ import annotations

import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset name (dsjax.configs.names()).")
flags.DEFINE_integer("batch_size", 2, "Batch size of the forward pass.")
flags.DEFINE_integer("seq_len", 64, "Sequence length of the forward pass.")
flags.DEFINE_integer("seed", 0, "Initialisation seed.")
flags.DEFINE_float("max_params_for_forward", 2e9, "Skip the forward pass above this many parameters.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import dsjax

    cfg = dsjax.configs.get(FLAGS.config)
    logging.info("jax %s, devices %s", jax.__version__, jax.devices())
    print(f"dsjax {dsjax.__version__} | jax {jax.__version__} | {jax.devices()[0].platform} x{jax.device_count()}")
    print(f"\nconfig {FLAGS.config!r}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense), "
          f"hidden {cfg.hidden_size}, {cfg.n_routed_experts} routed experts (top-{cfg.num_experts_per_tok}, "
          f"{cfg.scoring_func}/{cfg.topk_method}), {cfg.num_nextn_predict_layers} MTP module(s)\n")
    print(dsjax.format_param_table(cfg))
    counts = dsjax.count_params(cfg)
    if counts["total_with_mtp"] > FLAGS.max_params_for_forward:
        print(f"\n{counts['total_with_mtp']:,} parameters: skipping the forward pass on this machine "
              f"(--max_params_for_forward={FLAGS.max_params_for_forward:g}).")
        return
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(FLAGS.seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        out = nnx.merge(graphdef, state)(ids, return_mtp=True)
        return out.logits, out.mtp_logits, out.moe["counts"]

    ids = jax.random.randint(jax.random.key(FLAGS.seed), (FLAGS.batch_size, FLAGS.seq_len), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    logits, mtp_logits, counts_per_layer = jax.block_until_ready(forward(state, ids))
    t1 = time.perf_counter()
    jax.block_until_ready(forward(state, ids))
    t2 = time.perf_counter()
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
    entropy = float(-(probs * jnp.log(probs + 1e-30)).sum(-1).mean())
    print(f"\nforward {tuple(ids.shape)} -> logits {tuple(logits.shape)} {logits.dtype}, "
          f"{len(mtp_logits or ())} MTP head(s); compile+run {t1 - t0:.2f}s, run {1e3 * (t2 - t1):.1f} ms")
    print(f"mean next-token entropy {entropy:.3f} nats (uniform: {float(jnp.log(cfg.vocab_size)):.3f})")
    load = counts_per_layer / counts_per_layer.mean(-1, keepdims=True)
    print(f"expert load per MoE layer (max/mean): {[round(float(x), 2) for x in load.max(-1)]}")


if __name__ == "__main__":
    app.run(main)
