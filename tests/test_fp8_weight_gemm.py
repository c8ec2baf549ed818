"""Weight-only FP8 GEMM (decoding with FP8-stored weights): the XLA reference and the Pallas Triton kernel (run in
the interpreter on the CPU) against a float64 oracle; its CUDA lowering; its errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8_weight_matmul, fp8_weight_swiglu
from pallas_kernels.fp8_weight_gemm import _pallas, default_splits, fp8_weight_kernel_shapes_ok

BF16_TOL = 5e-3     # bf16 output rounding (2^-8 relative) over exact E4M3 products accumulated in float32


def _case(g, m, k, n, e=None, seed=0):
    kx, kw, ks, ki = jax.random.split(jax.random.key(seed), 4)
    e = g if e is None else e
    x = jax.random.normal(kx, (g, m, k), jnp.bfloat16)
    # clipped to E4M3's range as quantisation does: an unclipped cast turns |w| > 448 into NaN
    wq = jnp.clip(jax.random.normal(kw, (e, n, k)) * 100, -448, 448).astype(jnp.float8_e4m3fn)    # [out, in]
    s = jax.random.uniform(ks, (e, -(-n // 128), -(-k // 128)), minval=1e-4, maxval=1e-3)
    index = None if e == g else jax.random.randint(ki, (g,), 0, e)
    return x, wq, s, index


def _oracle(x, wq, s, index):
    x, wq, s = (np.asarray(a, np.float64) for a in (x.astype(jnp.float32), wq.astype(jnp.float32), s))
    if index is not None:
        wq, s = wq[np.asarray(index)], s[np.asarray(index)]
    n, k = wq.shape[1:]
    w = wq * np.repeat(np.repeat(s, 128, axis=1), 128, axis=2)[:, :n, :k]
    return np.einsum("gmk,gnk->gmn", x, w)


def _rel(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("g,m,k,n,e", [(3, 5, 256, 384, None), (1, 1, 512, 256, None), (2, 64, 128, 128, None),
                                       (6, 3, 256, 256, 4)])          # last: index picks a weight per group
def test_fp8_weight_matmul_matches_float64(impl, g, m, k, n, e):
    x, wq, s, index = _case(g, m, k, n, e)
    kw = dict(implementation=impl, interpret=True) if impl == "pallas" else dict(implementation=impl)
    out = jax.jit(lambda *a: fp8_weight_matmul(*a, **kw))(x, wq, s, index)
    assert out.shape == (g, m, n) and out.dtype == x.dtype
    assert _rel(out, _oracle(x, wq, s, index)) < BF16_TOL


def _swiglu_oracle(x, gq, gs, uq, us, index):
    g, u = _oracle(x, gq, gs, index), _oracle(x, uq, us, index)
    return g / (1 + np.exp(-g)) * u


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("g,m,k,n,e", [(3, 5, 256, 384, None), (1, 1, 512, 256, None), (6, 3, 256, 256, 4)])
def test_fp8_weight_swiglu_matches_float64(impl, g, m, k, n, e):
    """Gate, up and silu(gate) * up in one kernel against the float64 oracle (two weights, own scales each)."""
    x, gq, gs, index = _case(g, m, k, n, e, seed=0)
    _, uq, us, _ = _case(g, m, k, n, e, seed=1)
    kw = dict(implementation=impl, interpret=True) if impl == "pallas" else dict(implementation=impl)
    out = jax.jit(lambda *a: fp8_weight_swiglu(*a, **kw))(x, gq, gs, uq, us, index)
    assert out.shape == (g, m, n) and out.dtype == x.dtype
    assert _rel(out, _swiglu_oracle(x, gq, gs, uq, us, index)) < BF16_TOL
    with pytest.raises(ValueError, match="one shape"):
        fp8_weight_swiglu(x, gq, gs, uq[:, :128], us[:, :1], index)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("swiglu", [False, True])
def test_one_x_group_for_every_weight(swiglu, splits):
    """``x [1, M, K]`` against a stack of E weights without an index (the MoE's dense decode path: every expert on the
    same tokens): ``[E, M, N]``, bitwise what the kernel gives for x broadcast to E groups, and the oracle's bound
    (XLA reference too)."""
    x, wq, s, _ = _case(5, 4, 256, 256)
    x1 = x[:1]
    xe = jnp.broadcast_to(x1, x.shape)
    extra = {}
    if swiglu:
        _, uq, us, _ = _case(5, 4, 256, 256, seed=1)
        extra = dict(up=(uq, us))
    got = _pallas(x1, wq, s, interpret=True, splits=splits, **extra)
    assert got.shape == (5, 4, 256)
    np.testing.assert_array_equal(got, _pallas(xe, wq, s, interpret=True, splits=splits, **extra))
    want = _swiglu_oracle(xe, wq, s, uq, us, None) if swiglu else _oracle(xe, wq, s, None)
    assert _rel(got, want) < BF16_TOL
    ref = (fp8_weight_swiglu(x1, wq, s, uq, us, implementation="xla") if swiglu
           else fp8_weight_matmul(x1, wq, s, implementation="xla"))
    assert ref.shape == (5, 4, 256) and _rel(ref, want) < BF16_TOL


def test_fp8_weight_matmul_block_scales_vary_along_k():
    """Each 128-wide K block has its own scale: a kernel that applied one scale after the K sum would fail."""
    x, wq, _, _ = _case(1, 4, 384, 128)
    s = jnp.asarray([[[1.0, 1e-3, 10.0]]], jnp.float32)
    out = fp8_weight_matmul(x, wq, s, implementation="pallas", interpret=True)
    assert _rel(out, _oracle(x, wq, s, None)) < BF16_TOL


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_fp8_weight_kernel_split_k(splits, swiglu):
    """Split-K (float32 partial products per K range, summed after; the SwiGLU applied after the sum) meets the
    oracle's bound at every split factor, with an index picking the weights; a factor not dividing K/128 is an
    error."""
    x, wq, s, index = _case(3, 5, 512, 256, 4)
    if swiglu:
        _, uq, us, _ = _case(3, 5, 512, 256, 4, seed=1)
        out = _pallas(x, wq, s, index, interpret=True, up=(uq, us), splits=splits)
        want = _swiglu_oracle(x, wq, s, uq, us, index)
    else:
        out = _pallas(x, wq, s, index, interpret=True, splits=splits)
        want = _oracle(x, wq, s, index)
    assert out.shape == (3, 5, 256) and out.dtype == x.dtype
    assert _rel(out, want) < BF16_TOL
    with pytest.raises(ValueError, match="must divide K/128"):
        _pallas(x, wq, s, index, interpret=True, splits=3)


def test_fp8_weight_kernel_default_splits():
    """Split-K only where the grid would leave SMs idle: a batch-1 projection (8 column tiles) splits its K blocks
    until >= 132 programs; the batch-32 expert GEMMs (64 x 4 tiles) do not split."""
    assert default_splits(1, 1024, 1024) == 8              # o_proj-like: 8 programs x 8 splits (all of K/128)
    assert default_splits(6, 512, 1024) == 8               # gathered experts at batch 1: 24 x 8 = 192
    assert default_splits(6, 1024, 512) == 4               # their down projection: 48 x 4 = 192 (4 = all of K/128)
    assert default_splits(1, 1024, 2816) == 22             # 8 x 22: 22 = K/128 (divisors 1, 2, 11, 22)
    assert default_splits(64, 512, 1024) == 1              # 256 programs already
    assert default_splits(22, 128, 128) == 1               # one K block: nothing to split


def test_kernel_grids_read_the_sm_count(monkeypatch):
    """The split rules size grids to the device's SMs (``hardware.num_sms``): 132 (H100/H200) without a GPU, the
    GPU's own ``core_count`` on one."""
    from pallas_kernels import hardware

    assert hardware.num_sms() == 132 and hardware.num_sms(100) == 100
    monkeypatch.setattr(hardware, "gpu_compute_capability", lambda: (8, 9))
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Dev", (), {"core_count": 142})()])
    assert hardware.num_sms() == 142
    assert default_splits(1, 1024, 1024, min_programs=hardware.num_sms()) == 8


@pytest.mark.parametrize("mma", ["f16", "bf16"])
def test_fp8_weight_kernel_mma_dtypes(mma):
    """Both MMA operand types meet the oracle's bound: float16 (the default; x scaled per row by a power of two)
    and bfloat16 (the sweep's alternative); both lower for CUDA."""
    from jax._src.mesh import AbstractDevice

    x, wq, s, index = _case(3, 5, 256, 384, 4)
    out = _pallas(x, wq, s, index, interpret=True, mma_dtype=mma)
    assert out.dtype == x.dtype and _rel(out, _oracle(x, wq, s, index)) < BF16_TOL
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    args = [jax.ShapeDtypeStruct((64, 32, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((64, 512, 1024),
                                                                                      jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct((64, 4, 8), jnp.float32)]
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(functools.partial(_pallas, interpret=False, mma_dtype=mma)).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "xla.gpu.triton" in text
    with pytest.raises(ValueError, match="mma_dtype"):
        _pallas(x, wq, s, index, interpret=True, mma_dtype="f32")


@pytest.mark.parametrize("swiglu", [False, True])
def test_fp8_weight_kernel_float16_operands_never_overflow(swiglu):
    """float16 MMA operands hold only up to 65504, bf16 activations up to ~3e38: rows with magnitudes of 1e30 (1e5
    under the SwiGLU), 1e6 (7e4), 1, 1e-8 and 1e-30, and an all-zero row, all meet the oracle's bound, row by row,
    because each row enters scaled by its own power of two and leaves unscaled."""
    x, wq, s, index = _case(2, 6, 256, 256, 4)
    top = 1e5 if swiglu else 1e30               # silu(g) * u of a 1e30 row overflows any float
    mags = jnp.asarray([top, 1e6 if not swiglu else 7e4, 1.0, 1e-8, 1e-30, 0.0], jnp.float32)[None, :, None]
    x = (x.astype(jnp.float32) * mags).astype(jnp.bfloat16)
    s = s * 1e-3                                # keep the large rows' products inside float32
    if swiglu:
        _, uq, us, _ = _case(2, 6, 256, 256, 4, seed=1)
        got = np.asarray(jnp.asarray(_pallas(x, wq, s, index, interpret=True, up=(uq, us * 1e-3)), jnp.float32))
        with np.errstate(over="ignore"):
            want = _swiglu_oracle(x, wq, s, uq, us * 1e-3, index)
    else:
        got = np.asarray(jnp.asarray(_pallas(x, wq, s, index, interpret=True), jnp.float32))
        want = _oracle(x, wq, s, index)
    assert np.isfinite(got).all()
    for row in range(4 if swiglu else 5):       # silu(g) * u of the 1e-30 row (~1e-66) underflows float32
        assert _rel(got[:, row], want[:, row]) < BF16_TOL, row
    assert (got[:, 5] == 0).all()


def test_fp8_weight_kernel_lowers_for_cuda():
    """Without a GPU: the Pallas Triton lowering (E4M3 -> bf16 casts need compute capability >= 8.9) at `small`'s
    decode shapes: experts at batch 32, a projection at batch 1, and the indexed (gathered-experts) form."""
    from jax._src.mesh import AbstractDevice

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    for g, m, k, n, indexed, swiglu in [(64, 32, 1024, 1024, False, False), (1, 1, 1024, 1536, False, False),
                                        (6, 1, 1024, 512, True, False), (64, 32, 1024, 512, False, True),
                                        (6, 1, 1024, 512, True, True), (65, 32, 1024, 512, "x", True)]:
        w = jax.ShapeDtypeStruct((g, n, k), jnp.float8_e4m3fn)
        sc = jax.ShapeDtypeStruct((g, n // 128, k // 128), jnp.float32)
        # "x": one x group for every weight of the stack (the dense decode path's experts)
        args = [jax.ShapeDtypeStruct((1 if indexed == "x" else g, m, k), jnp.bfloat16), w, sc]
        indexed = indexed is True
        if indexed:
            args.append(jax.ShapeDtypeStruct((g,), jnp.int32))
        fn = functools.partial(_pallas, interpret=False)
        if swiglu:
            fn = lambda *a, fn=fn: fn(*a, up=(a[1], a[2]))  # noqa: E731 - the up weights' shapes are the gate's
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


@pytest.mark.gpu
def test_fp8_weight_kernel_on_gpu():
    """The compiled Triton kernels (GEMM and fused SwiGLU) on the GPU at `small`'s decode shapes (experts at batch
    32, a projection at batch 1, the indexed form at batch 1) against the float64 oracle."""
    for g, m, k, n, e in [(64, 32, 1024, 1024, None), (1, 1, 1024, 1536, None), (6, 1, 1024, 1024, 64)]:
        x, wq, s, index = _case(g, m, k, n, e)
        out = jax.jit(lambda *a: fp8_weight_matmul(*a, implementation="pallas"))(x, wq, s, index)
        assert _rel(out, _oracle(x, wq, s, index)) < BF16_TOL, (g, m, k, n)
        _, uq, us, _ = _case(g, m, k, n, e, seed=1)
        out = jax.jit(lambda *a: fp8_weight_swiglu(*a, implementation="pallas"))(x, wq, s, uq, us, index)
        assert _rel(out, _swiglu_oracle(x, wq, s, uq, us, index)) < BF16_TOL, ("swiglu", g, m, k, n)
    # one x group for all 65 experts of the dense decode path (64 routed + the folded shared one)
    x, gq, gs, _ = _case(65, 32, 1024, 512)
    _, uq, us, _ = _case(65, 32, 1024, 512, seed=1)
    swiglu = jax.jit(lambda *a: fp8_weight_swiglu(*a, implementation="pallas"))
    np.testing.assert_array_equal(swiglu(x[:1], gq, gs, uq, us), swiglu(jnp.broadcast_to(x[:1], x.shape), gq, gs,
                                                                         uq, us))


def test_fp8_weight_matmul_errors():
    x, wq, s, _ = _case(2, 3, 256, 256)
    with pytest.raises(ValueError, match="disagree on G"):
        fp8_weight_matmul(jnp.concatenate([x, x[:1]]), wq, s)          # 3 x groups, 2 weights, no index
    with pytest.raises(ValueError, match="scales"):
        fp8_weight_matmul(x, wq, s[:, :1])
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_weight_matmul(x, wq.astype(jnp.bfloat16), s)
    with pytest.raises(ValueError, match="multiples of 128"):
        fp8_weight_matmul(x[..., :200], wq[..., :200], s, implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match="interpret=True"):
        fp8_weight_matmul(x, wq, s, implementation="pallas")
    assert fp8_weight_matmul(x, wq, s).shape == (2, 3, 256)          # "auto" on the CPU: the XLA reference


def _hub(path, mtp_layers=0):
    """Saves a 2-layer bf16 model (dense MLP, then routed + shared experts; ``mtp_layers`` MTP modules) with
    128-multiple projection sizes as a hub folder at ``path`` (FP8 on loading with ``keep_fp8``); returns ``path``."""
    from flax import nnx

    import dsjax

    cfg = dsjax.configs.tiny(hidden_size=256, intermediate_size=256, num_attention_heads=2, q_lora_rank=128,
                             kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                             moe_intermediate_size=128, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
                             topk_group=1, num_hidden_layers=2, num_nextn_predict_layers=mtp_layers,
                             dtype="bfloat16", param_dtype="bfloat16")
    dsjax.save_hf(dsjax.Transformer(cfg, rngs=nnx.Rngs(0)), None, path)
    return path


def _fp8_tiny_model(tmp_path, fold_shared_experts=False):
    """:func:`_hub`'s model loaded with FP8 weights (hub round trip, 128x128 blocks), its layers unstacked (the
    shared experts folded into the routed stacks with ``fold_shared_experts``: loaded scanned, as unstacking then
    copies the weights)."""
    import dsjax

    model = dsjax.load_hf(_hub(tmp_path), dtype=jnp.bfloat16, keep_fp8=True, mtp=False,
                          scan_layers=fold_shared_experts)
    return dsjax.model.unstack_layers(model, fold_shared_experts=fold_shared_experts)


def _force_kernels(monkeypatch, implementation="pallas"):
    """Decode-sized FP8 products take the kernels on the CPU (interpreted; or their XLA references); returns the
    lists of the x shapes the GEMM and the fused SwiGLU were called with."""
    from dsjax.model import layers

    kw = dict(implementation="pallas", interpret=True) if implementation == "pallas" else dict(implementation="xla")
    calls, fused = [], []
    monkeypatch.setattr(layers, "use_fp8_weight_kernel",
                        lambda x, w, block: block == (128, 128) and fp8_weight_kernel_shapes_ok(x, w))
    monkeypatch.setattr(layers, "fp8_weight_dot",
                        lambda *a, min_rows: calls.append(a[0].shape) or fp8_weight_matmul(*a, **kw))
    monkeypatch.setattr(layers, "fp8_weight_swiglu_dot",
                        lambda *a, min_rows: fused.append(a[0].shape) or fp8_weight_swiglu(*a, **kw))
    return calls, fused


@pytest.mark.parametrize("batch", [2, 8])     # 2 tokens: the gathered-experts path; 8: the dense decode path
def test_model_with_fp8_weights_uses_the_kernel_when_decoding(monkeypatch, tmp_path, batch):
    """A model with FP8 weights runs its decode-sized projections, MLPs and experts through the weight-only FP8
    kernels where `use_fp8_weight_kernel` holds (forced here, interpreted on the CPU): one fused gate/up/SwiGLU
    launch per MLP or expert set, then its down projection. Its logits match the same dispatch with the kernels'
    XLA references (the kernels' own accuracy: the float64 tests above; the layers' equivalence with the
    dequantise-then-matmul path: the next test)."""
    model = _fp8_tiny_model(tmp_path)
    ids = jax.random.randint(jax.random.key(3), (batch, 1), 3, model.cfg.vocab_size)
    with monkeypatch.context() as m:
        _force_kernels(m, "xla")
        ref = model(ids).logits.astype(jnp.float32)
    calls, fused = _force_kernels(monkeypatch)
    got = model(ids).logits.astype(jnp.float32)
    # layer 0 (dense MLP), layer 1 (routed + shared experts): 3 fused launches and their 3 down projections; MLA's
    # q_a, q_b and o per layer (unstack_layers dequantised kv_a_proj_with_mqa and kv_b_proj once)
    assert len(fused) == 3 and len(calls) == 3 + 2 * 3, (fused, calls)
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-2


@pytest.mark.parametrize("batch", [2, 8])
def test_fp8_shared_experts_fold_into_the_routed_kernel_launch(monkeypatch, tmp_path, batch):
    """Unstacking a scanned FP8-stored model folds the shared experts into the routed FP8 stacks (weights and their
    128x128 block scales): a decode step then runs shared and routed experts in one fused gate/up/SwiGLU launch and
    one down launch (2 + 2 instead of 3 + 3 over the dense and the MoE layer), with the logits of the unfolded
    model (same kernels, interpreted) to bf16 rounding."""
    apart = _fp8_tiny_model(tmp_path / "a")
    flat = _fp8_tiny_model(tmp_path / "b", fold_shared_experts=True)
    experts = flat.layers[1].mlp.experts
    assert flat.layers[1].mlp.shared_experts is None and experts.n_folded == 1
    assert experts.gate_proj[...].dtype == jnp.float8_e4m3fn and experts.gate_proj_scale_inv[...].shape[0] == 9
    shared = apart.layers[1].mlp.shared_experts
    np.testing.assert_array_equal(experts.down_proj[...][8], shared.down_proj.kernel[...])
    np.testing.assert_array_equal(experts.down_proj_scale_inv[...][8], shared.down_proj.scale_inv[...])
    ids = jax.random.randint(jax.random.key(3), (batch, 1), 3, flat.cfg.vocab_size)
    calls, fused = _force_kernels(monkeypatch)
    ref = apart(ids).logits.astype(jnp.float32)
    assert len(fused) == 3 and len(calls) == 3 + 2 * 3
    del calls[:], fused[:]
    got = flat(ids).logits.astype(jnp.float32)
    assert len(fused) == 2 and len(calls) == 2 + 2 * 3, (fused, calls)
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 1e-2


@pytest.mark.parametrize("tokens", [2, 8])
def test_fp8_decode_kernels_match_the_dequantised_layers(monkeypatch, tmp_path, tokens):
    """Layer by layer (routing given, so no top-k can flip): the dense MLP, the shared experts and the routed
    experts (gathered path at 2 tokens, dense decode path at 8) with the FP8 kernels equal the dequantise-then-matmul
    path within bf16 rounding (the fused SwiGLU keeps silu(gate) * up in float32 where the unfused path rounds each
    projection to bf16 first)."""
    model = _fp8_tiny_model(tmp_path)
    cfg = model.cfg
    x = jax.random.normal(jax.random.key(1), (tokens, 1, cfg.hidden_size), jnp.bfloat16)
    idx = jax.random.randint(jax.random.key(2), (tokens, cfg.num_experts_per_tok), 0, cfg.n_routed_experts)
    wts = jax.random.uniform(jax.random.key(3), idx.shape)
    moe = model.layers[1].mlp
    runs = {"mlp": lambda: model.layers[0].mlp(x), "shared": lambda: moe.shared_experts(x),
            "experts": lambda: moe.experts(x[:, 0], idx, wts, decode=True)}
    ref = {k: f().astype(jnp.float32) for k, f in runs.items()}
    _, fused = _force_kernels(monkeypatch)
    for k, f in runs.items():
        got = f().astype(jnp.float32)
        assert float(jnp.linalg.norm(got - ref[k]) / jnp.linalg.norm(ref[k])) < 1e-2, k
    assert len(fused) == 3


def test_unstacking_an_fp8_model_dequantizes_what_decoding_would_every_step(tmp_path):
    """``unstack_layers`` on FP8-stored weights: MLA's kv_a_proj_with_mqa and kv_b_proj (used only dequantised when
    decoding) become compute-dtype copies equal to ``Linear.weight()`` in every layer and the MTP block, the other
    projections and the experts stay FP8, and the logits are unchanged; an unscanned model is copied, not changed."""
    import dsjax
    from dsjax.model import unstack_layers

    hub = _hub(tmp_path, mtp_layers=1)
    load = lambda scan: dsjax.load_hf(hub, dtype=jnp.bfloat16, keep_fp8=True, mtp=True, scan_layers=scan)  # noqa: E731
    ids = jax.random.randint(jax.random.key(3), (2, 5), 3, 200)
    for scan in (True, False):
        model = load(scan)
        flat = unstack_layers(model)
        assert flat is not model
        for layer in [*flat.layers, flat.mtp[0].block]:
            attn = layer.self_attn
            for name in ("kv_a_proj_with_mqa", "kv_b_proj"):
                lin = getattr(attn, name)
                assert lin.scale_inv is None and lin.kernel[...].dtype == jnp.bfloat16, name
            assert attn.q_a_proj.kernel[...].dtype == jnp.float8_e4m3fn and attn.o_proj.scale_inv is not None
        got, want = (np.asarray(m(ids).logits, np.float32) for m in (flat, model))
        if scan:   # the unrolled stack fuses differently from the scan: bf16 rounding apart
            np.testing.assert_allclose(got, want, atol=2e-2)
        else:      # the same modules, the weights dequantised once instead of in the forward: bitwise equal
            orig = model.layers[1].self_attn.kv_b_proj
            assert orig.scale_inv is not None
            np.testing.assert_array_equal(flat.layers[1].self_attn.kv_b_proj.kernel[...], orig.weight())
            np.testing.assert_array_equal(got, want)


def test_single_row_fp8_products_take_xla_and_larger_ones_the_kernel(monkeypatch):
    """``ModelConfig.fp8_weight_kernel_min_rows`` (default 2): a decode-sized FP8 product with one row per group
    (batch-1 decoding) takes the XLA form (a matrix-vector reduction that reads the E4M3 weights), two or more rows
    the weight-only kernel; 1 sends every product to the kernel. The config reaches every FP8 projection of a model
    (MLA, MLPs, experts). Both forms compute the same maths (the kernel tests above)."""
    from flax import nnx

    import dsjax
    from dsjax.model import layers

    seen = []
    monkeypatch.setattr(layers, "fp8_weight_matmul", lambda *a, implementation: seen.append(implementation))
    monkeypatch.setattr(layers, "fp8_weight_swiglu", lambda *a, implementation: seen.append(implementation))
    w, s = jnp.zeros((1, 128, 128), jnp.float8_e4m3fn), jnp.ones((1, 1, 1))
    for rows in (1, 2, 32):
        x = jnp.zeros((1, rows, 128), jnp.bfloat16)
        layers.fp8_weight_dot(x, w, s)
        layers.fp8_weight_swiglu_dot(x, w, s, w, s)
    assert seen == ["xla"] * 2 + ["pallas"] * 4
    seen.clear()
    layers.fp8_weight_dot(jnp.zeros((1, 1, 128), jnp.bfloat16), w, s, min_rows=1)
    assert seen == ["pallas"]
    cfg = dsjax.configs.tiny(fp8_weight_kernel_min_rows=3)
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0), fp8=True)
    found = [m.fp8_kernel_min_rows for _, m in nnx.iter_graph(model) if isinstance(m, layers.Linear)
             and m.fp8_block is not None]
    assert found and set(found) == {3}
    with pytest.raises(dsjax.ConfigError, match="fp8_weight_kernel_min_rows"):
        dsjax.configs.tiny(fp8_weight_kernel_min_rows=0)
