"""Times the parts of the `small` train step on the GPU (where does the time go?). Prints one line per part.

    python -m experiments.profile_parts
"""

import functools
import time

import jax
import jax.numpy as jnp
from flax import nnx


def bench(f, *args, n=10):
    r = f(*args)
    jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(n):
        r = f(*args)
    jax.block_until_ready(r)
    return 1e3 * (time.perf_counter() - t) / n


def check_kernels_and_attention():
    """Numerics on the GPU: Mosaic GPU grouped matmul vs lax.ragged_dot (values and gradients of a MoE layer),
    cuDNN attention vs einsum (one MLA layer, packed-document mask)."""
    from dsjax import configs
    from dsjax.model import make_attention_mask, rope_cos_sin
    from dsjax.model.mla import MLA
    from dsjax.model.moe import MoE

    cfg = configs.small(dtype="bfloat16")
    h = jax.random.normal(jax.random.key(1), (4, 1024, cfg.hidden_size), jnp.bfloat16)
    outs = {}
    for impl in ("xla", "mosaic_gpu"):
        moe = MoE(cfg.replace(grouped_matmul_impl=impl), rngs=nnx.Rngs(0))
        gd, st = nnx.split(moe)
        loss = lambda s, h: (nnx.merge(gd, s)(h)[0].astype(jnp.float32) ** 2).mean()
        outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(st, h)
        print(f"MoE fwd+bwd with {impl}: {bench(jax.jit(jax.grad(loss, argnums=(0, 1))), st, h):.2f} ms", flush=True)
    (la, (ga, gha)), (lb, (gb, ghb)) = outs["xla"], outs["mosaic_gpu"]
    rel = lambda a, b: float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max()
                             / (jnp.abs(a.astype(jnp.float32)).max() + 1e-30))
    print(f"grouped matmul mgpu vs xla: loss {float(la):.6f} vs {float(lb):.6f}; dh rel {rel(gha, ghb):.2e}; "
          f"dW_gate rel {rel(ga['experts']['gate_proj'][...], gb['experts']['gate_proj'][...]):.2e}; "
          f"dW_down rel {rel(ga['experts']['down_proj'][...], gb['experts']['down_proj'][...]):.2e}", flush=True)
    seg = jnp.concatenate([jnp.ones((4, 300), jnp.int32), 2 * jnp.ones((4, 724), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(300), jnp.arange(724)])[None].repeat(4, 0)
    cos, sin = rope_cos_sin(cfg, pos, jnp.bfloat16)
    mask = make_attention_mask(seg, seg)
    res = {}
    for impl in ("einsum", "cudnn"):
        mla = MLA(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        res[impl] = jax.jit(lambda m, h: m(h, cos, sin, mask)[0].astype(jnp.float32))(mla, h)
    print(f"MLA cudnn vs einsum: max rel {rel(res['einsum'], res['cudnn']):.2e}, mean abs diff "
          f"{float(jnp.abs(res['einsum'] - res['cudnn']).mean()):.2e} (mean abs {float(jnp.abs(res['einsum']).mean()):.2e})",
          flush=True)


def main():
    import sys

    if "--quick" in sys.argv:
        check_kernels_and_attention()
        return
    from dsjax import configs
    from dsjax.model import Transformer
    from dsjax.model.moe import MoE
    from dsjax.model.mla import MLA
    from dsjax.model import rope_cos_sin, make_attention_mask

    print(jax.devices(), flush=True)
    m_rows, d, f, e = 8 * 2048 * 6, 1024, 512, 64
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (m_rows, d), jnp.bfloat16)
    w = jax.random.normal(k2, (e, d, f), jnp.bfloat16)
    gs = jnp.full((e,), m_rows // e, jnp.int32)
    flops = 2 * m_rows * d * f
    t = bench(jax.jit(lambda x, w: jax.lax.ragged_dot(x, w, gs)), x, w)
    print(f"lax.ragged_dot fwd {t:.2f} ms = {flops / t / 1e9:.0f} TFLOP/s", flush=True)
    g = jax.jit(jax.grad(lambda x, w: jax.lax.ragged_dot(x, w, gs).astype(jnp.float32).sum(), argnums=(0, 1)))
    t = bench(g, x, w)
    print(f"lax.ragged_dot fwd+bwd {t:.2f} ms = {3 * flops / t / 1e9:.0f} TFLOP/s", flush=True)
    dense = jax.jit(lambda x, w: x @ w[0])
    t = bench(dense, x, w)
    print(f"plain dense matmul same flops {t:.2f} ms = {flops / t / 1e9:.0f} TFLOP/s", flush=True)
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

        for bm, bn, bk, st, gb in [(128, 128, 64, 4, 1), (128, 256, 64, 4, 1), (64, 128, 64, 4, 2),
                                   (128, 128, 64, 5, 4)]:
            try:
                fn = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=gs, block_m=bm, block_n=bn,
                                               block_k=bk, max_concurrent_steps=st, grid_block_n=gb))
                t = bench(fn, x, w)
                err = float(jnp.abs(fn(x, w).astype(jnp.float32) - jax.lax.ragged_dot(x, w, gs).astype(
                    jnp.float32)).max())
                print(f"mgpu ragged_dot {bm}x{bn}x{bk} s{st} g{gb}: {t:.2f} ms = {flops / t / 1e9:.0f} TFLOP/s "
                      f"(max err {err:.3g})", flush=True)
            except Exception as ex:  # noqa: BLE001
                print(f"mgpu ragged_dot {bm}x{bn}x{bk}: {type(ex).__name__} {str(ex)[:200]}", flush=True)
        dy = jax.random.normal(k3, (m_rows, f), jnp.bfloat16)
        for bm, bn, bk in [(128, 128, 64), (64, 128, 64)]:
            try:
                fn = jax.jit(functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=gs, block_m=bm, block_n=bn,
                                               block_k=bk, max_concurrent_steps=4, grid_block_n=1,
                                               transpose_rhs=True))
                t = bench(fn, dy, w)
                print(f"mgpu ragged_dot transpose_rhs (dx) {bm}x{bn}x{bk}: {t:.2f} ms", flush=True)
                fn = jax.jit(functools.partial(transposed_ragged_dot_mgpu.transposed_ragged_dot, group_sizes=gs,
                                               block_m=bm, block_n=bn, block_k=bk, max_concurrent_steps=4,
                                               grid_block_n=1))
                t = bench(fn, x, dy)
                ref = jax.grad(lambda w: (jax.lax.ragged_dot(x, w, gs).astype(jnp.float32)
                                          * dy.astype(jnp.float32)).sum())(w)
                err = float(jnp.abs(fn(x, dy).astype(jnp.float32) - ref.astype(jnp.float32)).max())
                print(f"mgpu transposed_ragged_dot (dw) {bm}x{bn}x{bk}: {t:.2f} ms (max err {err:.3g}, "
                      f"ref max {float(jnp.abs(ref).max()):.3g})", flush=True)
            except Exception as ex:  # noqa: BLE001
                print(f"mgpu bwd kernels {bm}x{bn}x{bk}: {type(ex).__name__} {str(ex)[:300]}", flush=True)
    except Exception as ex:  # noqa: BLE001
        print("mgpu import failed", ex, flush=True)

    cfg = configs.small(dtype="bfloat16", attention_impl="cudnn")
    h = jax.random.normal(k1, (8, 2048, d), jnp.bfloat16)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    gd, st = nnx.split(moe)
    fwd = jax.jit(lambda s, h: nnx.merge(gd, s)(h)[0])
    t = bench(fwd, st, h)
    print(f"MoE layer fwd {t:.2f} ms", flush=True)
    gr = jax.jit(jax.grad(lambda s, h: nnx.merge(gd, s)(h)[0].astype(jnp.float32).sum(), argnums=(0, 1)))
    print(f"MoE layer fwd+bwd {bench(gr, st, h):.2f} ms", flush=True)
    seg = jnp.ones((8, 2048), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(2048), (8, 2048))
    mask = make_attention_mask(seg, seg)
    cos, sin = rope_cos_sin(cfg, pos, jnp.bfloat16)
    for impl in ("einsum", "cudnn"):
        mla = MLA(cfg.replace(attention_impl=impl), rngs=nnx.Rngs(0))
        gd2, st2 = nnx.split(mla)
        gr2 = jax.jit(jax.grad(lambda s, h: nnx.merge(gd2, s)(h, cos, sin, mask)[0].astype(jnp.float32).sum(),
                               argnums=(0, 1)))
        print(f"MLA ({impl}) fwd+bwd {bench(gr2, st2, h):.2f} ms", flush=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    gd3, st3 = nnx.split(model)
    ids = jax.random.randint(k2, (8, 2048), 3, cfg.vocab_size)
    f3 = jax.jit(lambda s, i: nnx.merge(gd3, s)(i, compute_logits=False, return_hidden=True).hidden)
    print(f"model fwd (hidden only) {bench(f3, st3, ids):.2f} ms", flush=True)
    ein = Transformer(cfg.replace(attention_impl="einsum", num_hidden_layers=2), rngs=nnx.Rngs(0))
    cud = Transformer(cfg.replace(attention_impl="cudnn", num_hidden_layers=2), rngs=nnx.Rngs(0))
    seg2 = jnp.concatenate([jnp.ones((8, 700), jnp.int32), 2 * jnp.ones((8, 1348), jnp.int32)], 1)
    a = jax.jit(lambda m, i: m(i, seg2).logits.astype(jnp.float32))(ein, ids)
    b = jax.jit(lambda m, i: m(i, seg2).logits.astype(jnp.float32))(cud, ids)
    print(f"cudnn vs einsum logits rel err {float(jnp.abs(a - b).max() / jnp.abs(a).max()):.3e}, "
          f"mean abs diff {float(jnp.abs(a - b).mean()):.3e}, mean abs {float(jnp.abs(a).mean()):.3e}", flush=True)


if __name__ == "__main__":
    main()
