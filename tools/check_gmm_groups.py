"""GPU check: Mosaic GPU grouped matmul (fwd, dx, dw) vs lax.ragged_dot in bf16 with EP-like group sizes
(empty groups, a padded last group, sum < M)."""
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.grouped_matmul import grouped_matmul
k, n, g, m = 128, 128, 8, 1024
x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
w = (0.1 * jax.random.normal(jax.random.key(1), (g, k, n))).astype(jnp.bfloat16)
c = jax.random.normal(jax.random.key(2), (m, n), jnp.float32)
for name, gs in [("full", [128] * 8), ("empty groups", [0, 256, 0, 128, 384, 0, 128, 128]),
                 ("padded last", [100, 50, 0, 200, 10, 0, 64, 600]), ("odd", [3, 5, 7, 9, 11, 13, 15, 961])]:
    gs = jnp.array(gs, jnp.int32)
    def f(impl):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(grouped_matmul(x, w, gs, implementation=impl).astype(jnp.float32) * c), (0, 1)))(x, w)
    (va, (dxa, dwa)), (vb, (dxb, dwb)) = f("mosaic_gpu"), f("xla")
    r = lambda a, b: float(jnp.linalg.norm((a.astype(jnp.float32) - b.astype(jnp.float32)).ravel()) / jnp.linalg.norm(b.astype(jnp.float32).ravel()))
    print(f"{name:14s} val {float(va):.3f} vs {float(vb):.3f}  dx rel {r(dxa, dxb):.2e}  dw rel {r(dwa, dwb):.2e}", flush=True)
