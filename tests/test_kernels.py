"""pallas_kernels: the grouped matmul reference and its dispatch (the Mosaic GPU path is checked on the GPU by
experiments/profile_parts.py --quick; it cannot run on a CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import grouped_matmul, mosaic_gpu_supported
from pallas_kernels.grouped_matmul import pad_rows


def _ref(x, w, gs):
    out, start = [], 0
    for g, n in enumerate(np.asarray(gs)):
        out.append(np.asarray(x[start:start + n]) @ np.asarray(w[g]))
        start += n
    return np.concatenate(out)


def test_grouped_matmul_xla_matches_loop_and_has_gradients():
    x = jax.random.normal(jax.random.key(0), (13, 16))
    w = jax.random.normal(jax.random.key(1), (4, 16, 8))
    gs = jnp.array([3, 0, 6, 4], jnp.int32)
    np.testing.assert_allclose(grouped_matmul(x, w, gs, implementation="xla"), _ref(x, w, gs), rtol=1e-5, atol=1e-5)
    gx, gw = jax.grad(lambda x, w: grouped_matmul(x, w, gs).sum(), argnums=(0, 1))(x, w)
    assert gx.shape == x.shape and gw.shape == w.shape and float(jnp.abs(gw[1]).max()) == 0.0  # empty group


def test_row_padding_is_invisible():
    x = jax.random.normal(jax.random.key(0), (12, 16))
    w = jax.random.normal(jax.random.key(1), (3, 16, 8))
    gs = jnp.array([5, 4, 3], jnp.int32)
    xp, gp = pad_rows(x, gs, 8)
    assert xp.shape == (16, 16) and int(gp.sum()) == 16 and int(gp[-1]) == 7
    np.testing.assert_allclose(grouped_matmul(xp, w, gp, implementation="xla")[:12],
                               grouped_matmul(x, w, gs, implementation="xla"), rtol=1e-6)
    assert pad_rows(x[:6], gs.at[0].set(-1), 8)[0].shape == (6, 16)  # small M is left alone


def test_dispatch_on_cpu_and_errors():
    x = jnp.zeros((8, 128), jnp.bfloat16)
    w = jnp.zeros((2, 128, 128), jnp.bfloat16)
    assert not mosaic_gpu_supported(x, w)  # CPU
    with pytest.raises(ValueError, match="needs a Hopper GPU"):
        grouped_matmul(x, w, jnp.array([4, 4]), implementation="mosaic_gpu")
    with pytest.raises(ValueError, match="expects x"):
        grouped_matmul(x[0], w, jnp.array([4, 4]))
