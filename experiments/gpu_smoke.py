"""GPU smoke check: the fused attention paths equal the einsum path on one MLA layer (packed documents).

    python -m experiments.gpu_smoke

(Whole-model logits are not compared: in bf16 a tiny difference can flip an expert choice.)
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import configs
from dsjax.model import make_attention_mask, rope_cos_sin
from dsjax.model.mla import MLA


def main():
    print(jax.devices())
    cfg = configs.small(dtype="bfloat16")
    b, t = 4, 1024
    h = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.bfloat16)
    seg = jnp.concatenate([jnp.ones((b, 300), jnp.int32), 2 * jnp.ones((b, 500), jnp.int32),
                           3 * jnp.ones((b, 224), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(300), jnp.arange(500), jnp.arange(224)])[None].repeat(b, 0)
    cos, sin = rope_cos_sin(cfg, pos, jnp.bfloat16)
    mask = make_attention_mask(seg, seg)
    outs, grads = {}, {}
    for impl in ("einsum", "cudnn", "cudnn_mla"):
        mla = MLA(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        g, s = nnx.split(mla)
        f = lambda s, h: nnx.merge(g, s)(h, cos, sin, mask)[0].astype(jnp.float32)
        try:
            outs[impl] = jax.jit(f)(s, h)
            grads[impl] = jax.jit(jax.grad(lambda s, h: (f(s, h) ** 2).mean(), argnums=1))(s, h)
        except Exception as e:  # noqa: BLE001
            print(f"{impl}: {type(e).__name__}: {str(e)[:300]}")
    ref, gref = outs["einsum"], grads["einsum"].astype(jnp.float32)
    for impl in outs:
        err = float(jnp.abs(outs[impl] - ref).max() / jnp.abs(ref).max())
        gerr = float(jnp.abs(grads[impl].astype(jnp.float32) - gref).max() / jnp.abs(gref).max())
        print(f"{impl}: max rel diff vs einsum: output {err:.2e}, input grad {gerr:.2e}")


if __name__ == "__main__":
    main()
