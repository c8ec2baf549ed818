"""Building blocks: variable types, RMSNorm, linear layers, embeddings and the SwiGLU MLP.

Letters used in shapes: B batch, T tokens, D hidden_size (embed), F intermediate size, V vocabulary,
I/O the input/output feature groups of a :class:`Linear` (e.g. I = D, O = (N heads, H head dim)).

Every parameter carries ``logical_axes`` metadata (one name per array axis); ``dsjax.sharding`` maps those names
to mesh axes through a single rules table. Layers never mention mesh axes.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import fp8_linear, fp8_weight_matmul, fp8_weight_swiglu, weight_dequant
from pallas_kernels.fp8_weight_gemm import fp8_weight_kernel_supported

from dsjax.configs import ModelConfig
from dsjax.sharding import current_plan

__all__ = [
    "RoutingBias",
    "FP8Scale",
    "DecodeCopy",
    "dtype_of",
    "make_param",
    "RMSNorm",
    "Linear",
    "Embed",
    "MLP",
]


class RoutingBias(nnx.Variable):
    """DeepSeek-V3's ``e_score_correction_bias``: a non-trainable float32 state updated outside autodiff.

    It is not an ``nnx.Param``, so ``nnx.split(model, nnx.Param, ...)`` keeps it out of gradients and the
    optimizer; the training step updates it with the auxiliary-loss-free rule.
    """


class FP8Scale(nnx.Variable):
    """Block scales (``weight_scale_inv``) of a weight kept in FP8; non-trainable."""


class DecodeCopy(nnx.Variable):
    """A weight derived from a model's parameters for decoding (e.g. MLA's ``W_UK``/``W_UV`` halves of ``kv_b_proj``),
    made once per generate call by ``dsjax.model.unstack_layers``; never trained or saved."""


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def make_param(rngs: nnx.Rngs | None, init, shape: Sequence[int], dtype, axes: Sequence[str | None],
               var_type=nnx.Param) -> nnx.Variable:
    """Creates a variable with ``logical_axes`` metadata. ``init(key, shape, dtype)`` or a constant for zeros/ones."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    if callable(init):
        value = init(rngs.params(), tuple(shape), dtype)
    else:
        value = jnp.full(tuple(shape), init, dtype)
    return var_type(value, logical_axes=tuple(axes))


def _normal(std: float):
    return jax.nn.initializers.normal(stddev=std)


@jax.custom_vjp
def dot_f32_out(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., K] @ w [K, N]`` returned in float32 (for losses over logits), with a low-precision backward.

    ``preferred_element_type=float32`` alone makes autodiff run the two backward matmuls in float32 (TF32 on GPUs,
    several times slower than bf16). Here the float32 cotangent is cast back to the operands' dtype first and
    both gradients are bf16 matmuls with float32 accumulation -- the same numerics as the forward.
    """
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _dot_f32_out_fwd(x, w):
    return dot_f32_out(x, w), (x, w)


def _dot_f32_out_bwd(res, ct):
    x, w = res
    g = ct.astype(x.dtype)
    dx = jnp.einsum("...n,kn->...k", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum("...k,...n->kn", x, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


dot_f32_out.defvjp(_dot_f32_out_fwd, _dot_f32_out_bwd)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 like HF: ``w * cast(x32 * rsqrt(mean(x32^2) + eps), x.dtype)``."""

    def __init__(self, size: int, *, eps: float, param_dtype, axis_name: str = "norm", rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = make_param(None, 1.0, (size,), param_dtype, (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(x.dtype) * y.astype(x.dtype)


def use_fp8_weight_kernel(x_shape: tuple[int, int, int], w_shape: tuple[int, int, int],
                          fp8_block: tuple[int, int] | None) -> bool:
    """Whether a decode-sized product of ``x [G, M, K]`` and FP8-stored weights ``w [E, N, K]`` (``fp8_block``, the
    checkpoint's block size) runs the weight-only FP8 kernel, which reads the FP8 bytes and dequantises in registers,
    instead of dequantising the weights to a BF16 copy first. Needs DeepSeek's 128x128 blocks and the kernel's GPU
    and shape conditions (``pallas_kernels.fp8_weight_gemm``), and no active sharding plan: the kernel is a custom
    call XLA's partitioner cannot split, and the weights it would read may be split along K (``fsdp``) or N
    (``tensor``), so on a mesh the product takes the XLA path (dequantise, then a matmul GSPMD partitions)."""
    return (fp8_block == (128, 128) and current_plan() is None
            and fp8_weight_kernel_supported(x_shape, w_shape))


def _fp8_implementation(x: jax.Array, min_rows: int) -> str:
    """The weight-only kernel from ``min_rows`` rows per group (``ModelConfig.fp8_weight_kernel_min_rows``), else
    XLA's form of the same maths."""
    return "pallas" if x.shape[1] >= min_rows else "xla"


def fp8_weight_dot(x: jax.Array, wq: jax.Array, scale: jax.Array, index: jax.Array | None = None, *,
                   min_rows: int = 2) -> jax.Array:
    """``x [G, M, K] @ dequant(wq [E, N, K], scale [E, N/128, K/128])^T -> [G, M, N]`` through the weight-only FP8
    kernel, or XLA's fused matrix-vector form for fewer than ``min_rows`` rows per group
    (``ModelConfig.fp8_weight_kernel_min_rows``; call it where :func:`use_fp8_weight_kernel` holds)."""
    return fp8_weight_matmul(x, wq, scale, index, implementation=_fp8_implementation(x, min_rows))


def fp8_weight_swiglu_dot(x: jax.Array, gq: jax.Array, gs: jax.Array, uq: jax.Array, us: jax.Array,
                          index: jax.Array | None = None, *, min_rows: int = 2) -> jax.Array:
    """``silu(x @ dequant(gq, gs)^T) * (x @ dequant(uq, us)^T) -> [G, M, F]``: gate, up and SwiGLU in one weight-only
    FP8 kernel launch (or XLA's form for single rows, as :func:`fp8_weight_dot`; call it where
    :func:`use_fp8_weight_kernel` holds for the gate)."""
    return fp8_weight_swiglu(x, gq, gs, uq, us, index, implementation=_fp8_implementation(x, min_rows))


class Linear(nnx.Module):
    """A bias-optional linear map ``[..., *I] -> [..., *O]`` with a kernel of shape ``(*I, *O)``.

    ``kernel`` is the transpose of the HF ``weight`` (``[out, in]``), reshaped to the feature groups, e.g. MLA's
    ``q_b_proj`` has kernel ``(R_q, N, H)``. When the weight is kept in FP8 (``fp8_block`` given), ``kernel`` holds
    float8_e4m3fn values in the checkpoint's own layout, the HF ``weight`` reshaped to ``(*O, *I)`` (``q_b_proj``:
    ``(N, H, R_q)``), and ``scale_inv`` the checkpoint's float32 block scales over the flattened
    ``(prod O, prod I)`` matrix (``weight_scale_inv``): the layout the FP8 kernels read (K contiguous); the kernel is
    dequantised on the fly (the FP8 GEMM kernels replace that in the FP8 path), except for
    decode-sized inputs on a GPU, which go through the weight-only FP8 kernel (:func:`fp8_weight_dot`).
    ``fp8_compute=True`` (FP8 *training*, ``ModelConfig.fp8``) runs the map through ``pallas_kernels.fp8_linear``:
    E4M3 forward and backward GEMMs on the flattened ``(prod I, prod O)`` kernel.
    """

    def __init__(self, in_features: Sequence[int] | int, out_features: Sequence[int] | int, *,
                 in_axes: Sequence[str], out_axes: Sequence[str], param_dtype, dtype, rngs: nnx.Rngs,
                 use_bias: bool = False, init_std: float = 0.02, fp8_block: tuple[int, int] | None = None,
                 fp8_compute: bool = False, fp8_kernel_min_rows: int = 2):
        self.in_features = (in_features,) if isinstance(in_features, int) else tuple(in_features)
        self.out_features = (out_features,) if isinstance(out_features, int) else tuple(out_features)
        self.dtype = dtype
        self.fp8_block = fp8_block
        self.fp8_compute = fp8_compute
        self.fp8_kernel_min_rows = fp8_kernel_min_rows
        shape = self.in_features + self.out_features
        self.kernel_axes = tuple(in_axes) + tuple(out_axes)          # of the (*I, *O) compute-layout kernel
        if fp8_block is None:
            self.kernel = make_param(rngs, _normal(init_std), shape, param_dtype, self.kernel_axes)
            self.scale_inv = None
        else:   # the checkpoint's [out, in] layout, reshaped to (*O, *I); scales [ceil(O/bo), ceil(I/bi)]
            self.kernel = make_param(None, 0.0, self.out_features + self.in_features, jnp.float8_e4m3fn,
                                     tuple(out_axes) + tuple(in_axes))
            rows = math.ceil(math.prod(self.out_features) / fp8_block[0])
            cols = math.ceil(math.prod(self.in_features) / fp8_block[1])
            self.scale_inv = make_param(None, 1.0, (rows, cols), jnp.float32, (None, None), var_type=FP8Scale)
        self.bias = make_param(None, 0.0, self.out_features, param_dtype, tuple(out_axes)) if use_bias else None

    def weight(self) -> jax.Array:
        """The kernel in the compute dtype (dequantised when stored in FP8)."""
        w = self.kernel.get_value()
        if self.scale_inv is not None:      # FP8: the [out, in] matrix, dequantised, then transposed to (*I, *O)
            n_in, n_out = math.prod(self.in_features), math.prod(self.out_features)
            w2 = weight_dequant(w.reshape(n_out, n_in), self.scale_inv.get_value(), block_size=self.fp8_block,
                                out_dtype=jnp.float32)
            w = w2.T.reshape(self.in_features + self.out_features)
        return w.astype(self.dtype)

    def fp8_decode_operands(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """``(x [1, rows, K], kernel [1, N, K], scales [1, N/128, K/128])`` for the weight-only FP8 kernels when the
        kernel is stored in FP8, the compute dtype is 16-bit and ``x`` is decode-sized
        (:func:`use_fp8_weight_kernel`); else None."""
        if self.scale_inv is None or jnp.dtype(self.dtype).itemsize != 2:
            return None
        k, n = math.prod(self.in_features), math.prod(self.out_features)
        rows = math.prod(x.shape[:x.ndim - len(self.in_features)])
        if not use_fp8_weight_kernel((1, rows, k), (1, n, k), self.fp8_block):
            return None
        return (x.astype(self.dtype).reshape(1, rows, k), self.kernel.get_value().reshape(1, n, k),
                self.scale_inv.get_value()[None])

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """``x [..., *I] -> [..., *O]`` in the compute dtype (or ``out_dtype``, accumulated in that dtype)."""
        n_in = len(self.in_features)
        if self.fp8_compute and self.scale_inv is None:
            lead = x.shape[:x.ndim - n_in]
            w = self.kernel.get_value().reshape(math.prod(self.in_features), -1)   # quantised from the master copy
            y = fp8_linear(x.astype(self.dtype).reshape(*lead, w.shape[0]), w, out_dtype=out_dtype or self.dtype)
            y = y.reshape(*lead, *self.out_features)
            return y if self.bias is None else y + self.bias.get_value().astype(y.dtype)
        operands = self.fp8_decode_operands(x) if out_dtype in (None, self.dtype) else None
        if operands is not None:                                       # decode: FP8 bytes read, no BF16 copy
            y = fp8_weight_dot(*operands, min_rows=self.fp8_kernel_min_rows)
            y = y.reshape(*x.shape[:x.ndim - n_in], *self.out_features)
            return y if self.bias is None else y + self.bias.get_value().astype(y.dtype)
        if (out_dtype == jnp.float32 and n_in == 1 and len(self.out_features) == 1
                and jnp.dtype(self.dtype).itemsize < 4):
            y = dot_f32_out(x.astype(self.dtype), self.weight())
            return y if self.bias is None else y + self.bias.get_value().astype(y.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), self.weight(), (contract, ((), ())),
                                preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table ``[V, D]``; ``attend`` gives ``x @ table.T`` for tied output heads."""

    def __init__(self, vocab_size: int, features: int, *, param_dtype, dtype, rngs: nnx.Rngs, init_std: float):
        self.dtype = dtype
        self.embedding = make_param(rngs, _normal(init_std), (vocab_size, features), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.get_value(), ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """Tied output head ``x [..., D] -> [..., V]``."""
        table = self.embedding.get_value().astype(self.dtype)
        if out_dtype == jnp.float32 and jnp.dtype(self.dtype).itemsize < 4:
            return dot_f32_out(x.astype(self.dtype), table.T)
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table, preferred_element_type=out_dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``: ``[B, T, D] -> [B, T, F] -> [B, T, D]``.

    Used for the dense first layers (F = intermediate_size) and the shared experts
    (F = moe_intermediate_size * n_shared_experts).
    """

    def __init__(self, cfg: ModelConfig, intermediate_size: int, *, rngs: nnx.Rngs, mlp_axis: str = "mlp",
                 fp8_block: tuple[int, int] | None = None):
        kw = dict(param_dtype=dtype_of(cfg.param_dtype), dtype=dtype_of(cfg.dtype), rngs=rngs,
                  use_bias=cfg.mlp_bias, init_std=cfg.initializer_range, fp8_block=fp8_block,
                  fp8_kernel_min_rows=cfg.fp8_weight_kernel_min_rows)
        d, f = cfg.hidden_size, intermediate_size
        self.gate_proj = Linear(d, f, in_axes=("embed",), out_axes=(mlp_axis,),
                                fp8_compute=cfg.fp8_compute("gate_proj"), **kw)
        self.up_proj = Linear(d, f, in_axes=("embed",), out_axes=(mlp_axis,),
                              fp8_compute=cfg.fp8_compute("up_proj"), **kw)
        self.down_proj = Linear(f, d, in_axes=(mlp_axis,), out_axes=("embed",),
                                fp8_compute=cfg.fp8_compute("down_proj"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        g, u = self.gate_proj, self.up_proj
        if g.bias is None and u.bias is None:
            gate, up = g.fp8_decode_operands(x), u.fp8_decode_operands(x)
            if gate is not None and up is not None:          # decode-sized, FP8-stored: gate, up, SwiGLU in one launch
                h = fp8_weight_swiglu_dot(*gate, *up[1:], min_rows=g.fp8_kernel_min_rows)
                return self.down_proj(h.reshape(*x.shape[:-1], -1))
        return self.down_proj(jax.nn.silu(g(x)) * u(x))
