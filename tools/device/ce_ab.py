"""A/B of the cross-entropy backward in one process (next session's device call 3): the `small` train step with
the pre-session-13 chunked cross-entropy (autodiff of the rematerialised chunk: max and exp-sum recomputed, the
target gradient scattered), then with the library's (the forward's logsumexp reused). Same flags as bench_train.

    python3 tools/device/ce_ab.py --steps=10
"""

import jax
import jax.numpy as jnp
from absl import app

from experiments import bench_train
from dsjax.train import losses, step


def autodiff_chunked_cross_entropy(hidden, head, targets, weights, chunk_tokens=4096):
    """dsjax.train.losses.chunked_cross_entropy as it was before session 13."""
    (h, tg, w), n_chunks, _, _ = losses._chunk(chunk_tokens, hidden.reshape(-1, hidden.shape[-1]),
                                               targets.reshape(-1), weights.reshape(-1).astype(jnp.float32))

    @jax.checkpoint
    def chunk(hc, tc, wc):
        logits = head(hc).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[:, None], axis=-1)[:, 0]
        return jnp.sum(wc * (lse - tgt)), jnp.sum(wc * lse * lse)

    if n_chunks == 1:
        return chunk(h[0], tg[0], w[0])
    def body(carry, xs):
        ce, z = chunk(*xs)
        return (carry[0] + ce, carry[1] + z), None

    init = jax.tree.map(jnp.zeros_like, jax.eval_shape(chunk, h[0], tg[0], w[0]))
    (ce, z), _ = jax.lax.scan(body, init, (h, tg, w))
    return ce, z


def main(argv):
    del argv
    rows = []
    for label, fn in [("autodiff CE backward (before)", autodiff_chunked_cross_entropy),
                      ("lse-reusing CE backward (library)", losses.chunked_cross_entropy)]:
        step.chunked_cross_entropy = fn
        r = bench_train.bench_variant([])
        r["variant"] = label
        rows.append(r)
        print(r, flush=True)
    print(f"device {jax.devices()[0].device_kind}: step {rows[0]['step_ms']:.1f} -> {rows[1]['step_ms']:.1f} ms "
          f"({rows[0]['step_ms'] / rows[1]['step_ms']:.3f}x)")


if __name__ == "__main__":
    app.run(main)
