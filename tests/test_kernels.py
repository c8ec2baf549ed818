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


@pytest.mark.parametrize("gs,m", [([3, 0, 6, 4], 13), ([0, 40, 1, 0, 9, 70], 120), ([5, 0, 2, 0], 11)])
def test_grouped_matmul_tiled_equals_ragged_dot(gs, m):
    """The CPU default ("tiled": rows padded to whole tiles per group, one batched matmul) equals lax.ragged_dot:
    values and both gradients, empty groups, and rows past the groups' total (last case) giving 0."""
    x = jax.random.normal(jax.random.key(0), (m, 16))
    w = jax.random.normal(jax.random.key(1), (len(gs), 16, 8))
    gs = jnp.array(gs, jnp.int32)
    f = lambda impl: lambda x, w: grouped_matmul(x, w, gs, implementation=impl)  # noqa: E731
    np.testing.assert_allclose(f("tiled")(x, w), f("xla")(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda impl: lambda x, w: (f(impl)(x, w) ** 2).sum()  # noqa: E731
    for a, b in zip(jax.grad(loss("tiled"), argnums=(0, 1))(x, w), jax.grad(loss("xla"), argnums=(0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    assert grouped_matmul(x, w, gs).shape == (m, 8)   # auto on CPU: tiled


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


def test_custom_vjp_cotangents_take_the_primal_varying_axes_under_shard_map():
    """The Mosaic GPU grouped matmul's backward returns dW computed from data-sharded tokens (varying over
    ``data``) for a replicated weight: ``cotangent_like`` sums it over ``data`` (and ``match_varying`` casts the weight before
    the custom VJP). Checked with a custom VJP of the same structure on CPU against plain ``ragged_dot``."""
    import importlib

    from jax.sharding import PartitionSpec as P

    gm = importlib.import_module("pallas_kernels.grouped_matmul")

    def make(fix: bool):
        @jax.custom_vjp
        def f(x, w, gs):
            return jax.lax.ragged_dot(x, w, gs)

        def f_bwd(res, dy):
            x, w, gs = res
            (dx,) = jax.vjp(lambda x: jax.lax.ragged_dot(x, w, gs), x)[1](dy)
            grp = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(x.shape[0]), side="right")
            onehot = (grp[:, None] == jnp.arange(w.shape[0])[None]).astype(x.dtype)
            dw = jnp.einsum("mg,mk,mn->gkn", onehot, x, dy)          # varying over data, like the kernel's
            return (gm.cotangent_like(dx, x), gm.cotangent_like(dw, w), None) if fix else (dx, dw, None)

        f.defvjp(lambda x, w, gs: (f(x, w, gs), (x, w, gs)), f_bwd)
        return f

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    x = jax.random.normal(jax.random.key(0), (32, 8))
    w = jax.random.normal(jax.random.key(1), (2, 8, 4))

    def grads(fn):
        def body(x, w):
            return jax.lax.psum(jnp.sum(fn(x, w, jnp.array([3, 5], jnp.int32)) ** 2), "data")

        loss = lambda x, w: jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())(x, w)
        return jax.grad(loss, argnums=(0, 1))(x, w)

    ref = grads(jax.lax.ragged_dot)
    with pytest.raises(ValueError, match="same type"):
        grads(make(False))
    for fn in (make(True), lambda a, b, g: make(False)(*gm.match_varying(a, b, g))):
        for r, g in zip(ref, grads(fn)):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_mosaic_kernel_outputs_are_typed_per_device_under_shard_map(monkeypatch):
    """``plgpu.kernel`` traces with ``check_vma`` off, so inside ``shard_map`` a Mosaic GPU kernel's output is typed
    invariant; JAX's ``pvary`` where it meets data-sharded values transposes to a ``psum`` that summed the devices'
    output cotangents (seen on 2 GPUs: loss exact, gradients 88% off, plus an all-reduce per kernel). Stand-ins for
    the jax Mosaic GPU kernels with that typing (the same maths through ``ragged_dot`` under ``check_vma(False)``):
    ``grouped_matmul(implementation="mosaic_gpu")`` under a data-parallel ``shard_map`` has one device's gradients."""
    import importlib

    from jax._src import config as jax_config
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    gm = importlib.import_module("pallas_kernels.grouped_matmul")

    def fake_forward(x, w, group_sizes, transpose_rhs=False, **_):
        with jax_config._check_vma(False):
            return jax.lax.ragged_dot(x, jnp.swapaxes(w, 1, 2) if transpose_rhs else w, group_sizes)

    def fake_weight_grad(x, dy, group_sizes, **_):
        dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((0,), (0,)), ((), ())),
                                                 lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
        with jax_config._check_vma(False):
            return jax.lax.ragged_dot_general(x, dy, group_sizes, dims)

    monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", fake_forward)
    monkeypatch.setattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot", fake_weight_grad)
    monkeypatch.setattr(gm, "mosaic_gpu_supported", lambda x, w: True)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    x = jax.random.normal(jax.random.key(0), (256, 128))
    w = 0.1 * jax.random.normal(jax.random.key(1), (4, 128, 128))
    c = jax.random.normal(jax.random.key(2), (256, 128))
    gs = jnp.array([20, 30, 50, 28], jnp.int32)                  # per device (128 rows each)
    types = []

    def body(x, w, c):
        y = gm.grouped_matmul(x, w, gs, implementation="mosaic_gpu")
        types.append(str(jax.typeof(y)))
        return jax.lax.psum(jnp.sum(y * c), "data")

    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    loss = jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
    got = jax.jit(jax.grad(loss, (0, 1)))(put(x, P("data")), put(w, P()), put(c, P("data")))
    halves = lambda a: a.reshape(2, 128, -1)  # noqa: E731
    ref = jax.grad(lambda x, w: sum(jnp.sum(jax.lax.ragged_dot(halves(x)[i], w, gs) * halves(c)[i])
                                    for i in range(2)), (0, 1))(x, w)
    assert "data" in types[0], types                             # varying over the data axis
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_hardware_checks_parse_the_compute_capability(monkeypatch):
    """pallas_kernels.hardware: Hopper (sm_90) for the wgmma GEMM kernels, Hopper-or-newer for the quantisation
    kernels and cuDNN attention; a CPU, a ROCm GPU ("gfx90a") or no backend is neither."""
    import types

    from pallas_kernels import hardware

    def on(platform, cc):
        monkeypatch.setattr(hardware.jax, "devices", lambda: [types.SimpleNamespace(platform=platform,
                                                                                  compute_capability=cc)])
        return hardware.gpu_compute_capability(), hardware.is_hopper(), hardware.hopper_or_newer()

    assert on("gpu", "9.0") == ((9, 0), True, True)
    assert on("gpu", "10.0") == ((10, 0), False, True)
    assert on("gpu", "8.9") == ((8, 9), False, False)
    assert on("gpu", "gfx90a") == (None, False, False)
    assert on("cpu", None) == (None, False, False)

    def no_backend():
        raise RuntimeError("no devices")

    monkeypatch.setattr(hardware.jax, "devices", no_backend)
    assert hardware.gpu_compute_capability() is None and not hardware.is_hopper()
