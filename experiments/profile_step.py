"""Device-time breakdown of one train step (jax.profiler trace, aggregated by name scope and kernel).

    python -m experiments.profile_step --config=small --set model.attention_impl=cudnn

Prints the device time per step grouped by the dsjax name scopes (mla, moe/router, moe/routed_experts, ce_loss,
optimizer, ...) and the 25 most expensive kernels.
"""

import collections
import glob
import re
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset.")
flags.DEFINE_multi_string("set", [], "Overrides.")
flags.DEFINE_integer("batch_size", 8, "Batch.")
flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
flags.DEFINE_integer("steps", 3, "Profiled steps.")

SCOPES = ("ce_loss", "optimizer", "router", "routed_experts", "shared_experts", "routing_stats", "mla", "mlp", "moe")


def main(argv):
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
    for _ in range(3):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    tmp = tempfile.mkdtemp()
    jax.profiler.start_trace(tmp)
    for _ in range(FLAGS.steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    jax.profiler.stop_trace()
    path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    by_scope = collections.Counter()
    by_kernel = collections.Counter()
    total = 0.0
    seen_keys, lines_seen, samples = set(), set(), []
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            lines_seen.add(line.name)
            if "stream" not in line.name.lower() or "memcpy" in line.name.lower():
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                seen_keys.update(stats)
                dur = ev.duration_ns / 1e6 / FLAGS.steps
                total += dur
                long = str(stats.get("tf_op", "")) + " " + str(stats.get("name", "")) + " " + \
                    str(stats.get("hlo_op", ""))
                if len(samples) < 4 and dur > 0.5:
                    samples.append(long[:240])
                scope = next((s for s in SCOPES if re.search(rf"\b{s}\b", long)), "other")
                back = "bwd" if "transpose(" in long else "fwd"
                by_scope[f"{scope} ({back})"] += dur
                by_kernel[(ev.name[:60], scope)] += dur
    print(f"trace lines: {sorted(lines_seen)[:12]}; event stat keys: {sorted(seen_keys)}")
    print("sample op names:", *samples, sep="\n  ")
    print(f"device time per step: {total:.1f} ms (sum over streams)")
    for k, v in by_scope.most_common():
        print(f"  {k:32s} {v:8.2f} ms  {100 * v / total:5.1f}%")
    print("top kernels:")
    for (name, scope), v in by_kernel.most_common(30):
        print(f"  {v:7.2f} ms  {scope:16s} {name}")


if __name__ == "__main__":
    app.run(main)
