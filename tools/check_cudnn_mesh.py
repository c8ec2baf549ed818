"""GPU check: cuDNN attention gradients with the batch sharded over 2 GPUs vs one GPU (bf16, causal)."""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((1, 1, 2, 1), ("data", "fsdp", "expert", "tensor"))
ks = jax.random.split(jax.random.key(0), 4)
q, k, v = [jax.random.normal(kk, (4, 256, 4, 96), jnp.bfloat16) for kk in ks[:3]]
c = jax.random.normal(ks[3], (4, 256, 4, 96), jnp.float32)
def loss(q, k, v):
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jnp.sum(o.astype(jnp.float32) * c)
f = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
v0, g0 = f(q, k, v)
for spec in [P(("data", "fsdp", "expert")), P("expert")]:
    sh = NamedSharding(mesh, spec)
    v1, g1 = f(*jax.device_put((q, k, v), sh))
    r = [float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel()) / jnp.linalg.norm(b.astype(jnp.float32).ravel())) for a, b in zip(g1, g0)]
    print(spec, f"val {float(v1):.2f} vs {float(v0):.2f}; grad rel errs q/k/v", ["%.2e" % x for x in r], flush=True)
