"""GPU smoke check: cuDNN flash attention (MLA head sizes, packed-document mask) equals the einsum path.

    python -m experiments.gpu_smoke
"""

import jax
import jax.numpy as jnp
from flax import nnx

from dsjax import configs
from dsjax.model import Transformer


def main():
    print(jax.devices())
    cfg = configs.small(num_hidden_layers=3, dtype="bfloat16")
    ids = jax.random.randint(jax.random.key(0), (2, 512), 3, cfg.vocab_size)
    seg = jnp.concatenate([jnp.ones((2, 200), jnp.int32), 2 * jnp.ones((2, 312), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(200), jnp.arange(312)])[None].repeat(2, 0)
    out = {}
    for impl in ("einsum", "cudnn"):
        model = Transformer(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        g, s = nnx.split(model)
        out[impl] = jax.jit(lambda s, x: nnx.merge(g, s)(x, seg, pos).logits.astype(jnp.float32))(s, ids)
    err = jnp.abs(out["einsum"] - out["cudnn"]).max() / jnp.abs(out["einsum"]).max()
    print(f"cudnn vs einsum logits: max rel diff {float(err):.3e} (bf16)")
    assert err < 3e-2


if __name__ == "__main__":
    main()
