"""GPU check: cuDNN attention gradients with the batch sharded over 2 GPUs vs one GPU (bf16), without and with a
boolean mask (packed documents: the model's call), causal."""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((1, 1, 2, 1), ("data", "fsdp", "expert", "tensor"))
ks = jax.random.split(jax.random.key(0), 4)
b, t = 4, 256
q, k, v = [jax.random.normal(kk, (b, t, 4, 96), jnp.bfloat16) for kk in ks[:3]]
c = jax.random.normal(ks[3], (b, t, 4, 96), jnp.float32)
seg = jnp.asarray(np.repeat(np.array([[1] * (t // 2) + [2] * (t // 2)]), b, 0)).at[0, -8:].set(0)
mask = (seg[:, :, None] == seg[:, None, :]) & jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] > 0)


def loss(q, k, v, mask):
    o = jax.nn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], is_causal=True,
                                     implementation="cudnn")
    return jnp.sum(o.astype(jnp.float32) * c)


f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
for m in (None, mask):
    v0, g0 = f(q, k, v, m)
    for spec in [P(("data", "fsdp", "expert")), P("expert")]:
        sh = NamedSharding(mesh, spec)
        args = jax.device_put((q, k, v), sh) + (None if m is None else jax.device_put(m, sh),)
        v1, g1 = f(*args)
        r = [float(jnp.linalg.norm((a.astype(jnp.float32) - b_.astype(jnp.float32)).ravel()) /
                   jnp.linalg.norm(b_.astype(jnp.float32).ravel())) for a, b_ in zip(g1, g0)]
        print("mask" if m is not None else "no mask", spec, f"val {float(v1):.3f} vs {float(v0):.3f}; "
              "grad rel errs q/k/v", ["%.2e" % x for x in r], flush=True)
