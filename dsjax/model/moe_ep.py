"""Routed experts on a device mesh: ``shard_map`` with all-to-all dispatch and combine (expert parallelism).

Letters: T tokens on this device, D hidden_size, K experts per token, M = T*K (token, expert) pairs, E routed
experts, P expert-parallel devices (the ``expert`` mesh axis), El = E/P experts per device, C capacity (pairs one
device sends to another), R receive-buffer rows.

:func:`expert_parallel` is what :class:`~dsjax.model.moe.MoE` calls when a :class:`~dsjax.sharding.Plan` is active
(``use_plan``); without one the single-device code in ``moe.py`` runs unchanged. The router runs outside (GSPMD), so
the per-expert counts feeding the auxiliary-loss-free bias update are global sums over the whole batch. Inside the
``shard_map`` every device holds the tokens of its batch shard and the experts of its ``expert`` shard
(``gate/up [El, D, F/tp]``, ``down [El, F/tp, D]``; FSDP shards of the weights are gathered at the boundary and their
gradients reduce-scattered by XLA):

1. sort the M pairs by expert (``argsort``, gather-only);
2. **dispatch**: send each pair's token row to the device owning its expert (all-to-all over ``expert``);
3. run SwiGLU over the received rows with the grouped matmuls (``pallas_kernels.grouped_matmul``, ``md,edf->mf``
   per local expert) -- dropless within the device;
4. **combine**: send the results back (the inverse all-to-all), weight them with the router weights and sum over K
   (``tkd,tk->td``); with a ``tensor`` axis the partial sums over F are ``psum``-ed.

Two dispatch implementations (``MeshConfig.ep_dispatch``):

* ``ragged`` (GPU/TPU; XLA:CPU has no ``ragged-all-to-all``): ``jax.lax.ragged_all_to_all`` with one slice per
  (destination device, local expert). The all-gathered ``[P, E]`` count matrix gives every device the receivers'
  layout, so received rows arrive already grouped by local expert (expert-major, then source device) and no local
  re-sort is needed. Receive buffer: ``R = capacity_factor * T*K`` rows, or the worst case ``P*T*min(K, El)``
  (dropless) when ``capacity_factor`` is None; rows that do not fit are dropped consistently on both sides.
* ``capacity`` (any platform): fixed ``[P, C, D]`` send buffers with ``C = capacity_factor * T*K / P`` (or the
  worst case ``T*min(K, El)``), plain ``all_to_all``; pairs beyond C for a destination are dropped (in token order).
* ``ragged_emulated``: the ``ragged`` bookkeeping with ``ragged_all_to_all`` emulated by padded ``all_to_all``s
  (tests the ragged path on CPU).

Dropped pairs contribute nothing to their token's output (like a dropped token in capacity-based MoE) and are
counted: the second return value, summed over all devices, surfaces as ``moe_dropped`` in the train metrics.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.grouped_matmul import cotangent_like, match_varying

from dsjax.model.layers import dtype_of
from dsjax.model.moe import RoutedExperts, _dispatch, _permute, expert_ffn
from dsjax.sharding import Plan

__all__ = ["expert_parallel", "dispatch_mode", "ragged_all_to_all_emulated", "ragged_layout"]


def dispatch_mode(plan: Plan) -> str:
    """The dispatch implementation ``plan`` resolves to (``auto``: ``ragged`` on GPU/TPU, ``capacity`` on CPU)."""
    mode = plan.config.ep_dispatch
    if mode == "auto":
        platform = plan.mesh.devices.flat[0].platform
        mode = "ragged" if platform in ("gpu", "cuda", "rocm", "tpu") else "capacity"
    return mode


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _inverse(order: jax.Array) -> jax.Array:
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _ffn(xs, wg, wu, wd, group_sizes, impl: str, dt, fp8: bool | str = False):
    """SwiGLU over rows grouped by expert: ``[R, D] -> [R, D]`` (``moe.expert_ffn``, as in ``RoutedExperts``; with
    ``fp8`` (False or ``ModelConfig.fp8_grouped_gemm``: "auto" / "bf16" / "fp8") on FP8-quantised operands through
    ``fp8_grouped_linear``, as there). Under tensor parallelism each shard fuses its own gate and up columns."""
    return expert_ffn(xs, wg, wu, wd, group_sizes, implementation=impl, dtype=dt, fp8=fp8)


def _combine(out: jax.Array, weights: jax.Array, t: int, k: int) -> jax.Array:
    """``out [M, D]`` (token-major pairs), ``weights [T, K] -> [T, D]`` float32."""
    return jnp.einsum("tkd,tk->td", out.reshape(t, k, -1).astype(jnp.float32), weights)


def _local(x, idx, wts, wg, wu, wd, *, impl, dt, fp8=False):
    """No expert axis: the single-device dropless path on this device's tokens."""
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = _inverse(order)
    gs = jnp.bincount(flat, length=wg.shape[0]).astype(jnp.int32)
    ys = _ffn(_dispatch(x, order, inverse, k), wg, wu, wd, gs, impl, dt, fp8)
    return _combine(_permute(ys, inverse, order), wts, t, k), jnp.float32(0)


def _capacity(x, idx, wts, wg, wu, wd, *, axis, p, cap, impl, dt, fp8=False):
    """Fixed-size ``[P, C, D]`` buffers and plain all-to-alls; pairs beyond C per destination are dropped."""
    t, k = idx.shape
    m, d, el = t * k, x.shape[1], wg.shape[0]
    flat = idx.reshape(m)
    dest = flat // el                                             # [M] owning device
    order = jnp.argsort(flat, stable=True)                        # by expert, hence by destination
    inverse = _inverse(order)
    sizes = jnp.bincount(dest, length=p)                          # [P] pairs per destination
    starts = jnp.cumsum(sizes) - sizes
    c = jnp.arange(cap)
    valid = c[None, :] < sizes[:, None]                           # [P, C]
    pair = jnp.take(order, jnp.minimum(starts[:, None] + c[None, :], m - 1))
    send_x = jnp.where(valid[..., None], jnp.take(x, pair // k, axis=0), 0)            # [P, C, D]
    send_e = jnp.where(valid, jnp.take(flat, pair) % el, el)                          # [P, C], El = empty slot
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0).reshape(p * cap, d)                # rows from every source
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0).reshape(p * cap)
    order2 = jnp.argsort(recv_e, stable=True)
    inverse2 = _inverse(order2)
    gs = jnp.bincount(recv_e, length=el + 1).astype(jnp.int32)
    gs = gs[:el].at[-1].add(gs[el])                               # empty (zero) rows ride with the last expert
    ys = _ffn(_permute(recv_x, order2, inverse2), wg, wu, wd, gs, impl, dt, fp8)
    ys = jnp.where((recv_e < el)[:, None], _permute(ys, inverse2, order2), 0)
    back = jax.lax.all_to_all(ys.reshape(p, cap, d), axis, 0, 0).reshape(p * cap, d)  # results of my slots
    slot = inverse - starts[dest]                                 # [M] position of each pair in its send row
    kept = slot < cap
    out = jnp.take(back, dest * cap + jnp.minimum(slot, cap - 1), axis=0)
    out = jnp.where(kept[:, None], out, 0)
    return _combine(out, wts, t, k), jnp.sum(~kept).astype(jnp.float32)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """``jax.lax.ragged_all_to_all`` semantics from padded ``all_to_all``s (memory ``N x rows``; for tests)."""
    rows = operand.shape[0]
    r = jnp.arange(rows)
    valid = r[None, :] < send_sizes[:, None]                                           # [N, rows]
    src = jnp.minimum(input_offsets[:, None] + r[None, :], rows - 1)
    chunks = jnp.where(valid[..., None], jnp.take(operand, src, axis=0), 0)            # [N, rows, D]
    recv = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)
    offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dst = jnp.where(r[None, :] < recv_sizes[:, None], offs[:, None] + r[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(recv.reshape(-1, *operand.shape[1:]), mode="drop")


def ragged_layout(flat: jax.Array, *, axis: str, p: int, el: int, buf: int) -> dict[str, jax.Array]:
    """The bookkeeping of the ``ragged`` dispatch for this device's pairs ``flat [M]`` (global expert ids).

    Slices are indexed ``dst*El + l`` on the sending side and ``src*El + l`` on the receiving side; the receive
    buffer (R = ``buf`` rows) is expert-major, then source device. Returns int32 arrays: ``in_off`` (offset of each
    global expert in my expert-sorted pairs), ``send`` (pairs I send per slice, after the buffer limit), ``out_off``
    (where each of my slices lands in its receiver's buffer), ``recv`` (rows I receive per slice), ``back_off``
    (where each received slice sits in my buffer), ``home_off`` (where it came from in its sender's sorted pairs),
    ``mine`` (rows per local expert, [El]). The return trip is the dispatch with the roles swapped.
    """
    e = p * el
    i32 = jnp.int32
    cnt = jnp.bincount(flat, length=e).astype(i32)                # [E] my pairs per global expert
    all_cnt = jax.lax.all_gather(cnt, axis)                       # [P(src), E]
    me = jax.lax.axis_index(axis)
    a = all_cnt.reshape(p, p, el).transpose(1, 2, 0)              # [dst, l, src] pairs src sends to dst's expert l
    a_flat = a.reshape(p, el * p)
    off = (jnp.cumsum(a_flat, -1) - a_flat).reshape(p, el, p)     # offset in dst's buffer: expert-major, then src
    sent = jnp.clip(buf - off, 0, a).astype(i32)                  # what fits in R rows (all devices agree)
    off = jnp.minimum(off, buf).astype(i32)                       # empty slices past the buffer: offsets in range
    src_off = (jnp.cumsum(all_cnt, -1) - all_cnt).astype(i32)     # [P(src), E] every device's sorted layout
    return dict(in_off=src_off[me], send=sent[:, :, me].reshape(e), out_off=off[:, :, me].reshape(e),
                recv=sent[me].T.reshape(e), back_off=off[me].T.reshape(e),
                home_off=jax.lax.dynamic_slice_in_dim(src_off, me * el, el, axis=1).reshape(e),
                mine=sent[me].sum(-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ragged_send(a2a, axis, rows, x, in_off, send, out_off, recv, rev_in_off, rev_out_off):
    """``a2a(x -> [rows, D])`` whose backward is the same collective in the reverse direction with the layout we
    computed (``rev_*``), rather than the offsets JAX's transpose rule re-derives with two ``all_to_all``s."""
    out, x = match_varying(jnp.zeros((rows, *x.shape[1:]), x.dtype), x)
    return a2a(x, out, in_off, send, out_off, recv, axis_name=axis)


def _ragged_send_fwd(a2a, axis, rows, x, *layout):
    return _ragged_send(a2a, axis, rows, x, *layout), (x[:, :0], layout)   # x[:, :0]: x's rows and varying axes


def _ragged_send_bwd(a2a, axis, rows, res, ct):
    x0, (in_off, send, out_off, recv, rev_in_off, rev_out_off) = res
    out, ct = match_varying(jnp.zeros((x0.shape[0], *ct.shape[1:]), ct.dtype), ct)
    dx = a2a(ct, out, rev_in_off, recv, rev_out_off, send, axis_name=axis)
    return (cotangent_like(dx, x0),) + (None,) * 6


_ragged_send.defvjp(_ragged_send_fwd, _ragged_send_bwd)


def _ragged(x, idx, wts, wg, wu, wd, *, axis, p, buf, impl, dt, a2a, fp8=False, own_vjp=True):
    """``ragged_all_to_all`` dispatch: one slice per (destination, local expert), expert-major receive layout."""
    t, k = idx.shape
    m, el = t * k, wg.shape[0]
    flat = idx.reshape(m)
    order = jnp.argsort(flat, stable=True)
    inverse = _inverse(order)
    lay = ragged_layout(flat, axis=axis, p=p, el=el, buf=buf)
    xs = _dispatch(x, order, inverse, k)                          # [M, D] sorted by expert
    fwd = (lay["in_off"], lay["send"], lay["out_off"], lay["recv"])
    rev = (lay["back_off"], lay["recv"], lay["home_off"], lay["send"])
    if own_vjp:
        send = functools.partial(_ragged_send, a2a, axis)
        recv = send(buf, xs, *fwd, *rev[::2])
    else:
        recv = a2a(xs, jnp.zeros((buf, xs.shape[1]), xs.dtype), *fwd, axis_name=axis)
    total = lay["mine"].sum()
    gs = lay["mine"].at[-1].add(buf - total).astype(jnp.int32)    # padding rows ride with the last expert
    ys = _ffn(recv, wg, wu, wd, gs, impl, dt, fp8)
    ys = jnp.where((jnp.arange(buf) < total)[:, None], ys, 0)
    # return trip: my slice (src, l) goes back to src at the offset of expert me*El + l in src's sorted layout
    if own_vjp:
        back = send(m, ys, *rev, *fwd[::2])                       # [M, D] sorted pair order
    else:
        back = a2a(ys, jnp.zeros((m, ys.shape[1]), ys.dtype), *rev, axis_name=axis)
    ex = jnp.take(flat, order)
    kept = (jnp.arange(m) - jnp.take(lay["in_off"], ex)) < jnp.take(lay["send"], ex)
    back = jnp.where(kept[:, None], back, 0)
    out = _permute(back, inverse, order)
    return _combine(out, wts, t, k), (m - jnp.sum(lay["send"])).astype(jnp.float32)


def expert_parallel(experts: RoutedExperts, x: jax.Array, indices: jax.Array, weights: jax.Array, plan: Plan
                    ) -> tuple[jax.Array, jax.Array]:
    """``x [T, D]``, ``indices/weights [T, K] -> (y [T, D], dropped)`` over ``plan``'s mesh (global arrays in,
    global arrays out; T split over the batch axes). ``dropped``: float32 number of (token, expert) pairs dropped
    over the whole batch (always 0 with ``capacity_factor=None`` or without an expert axis)."""
    cfg = experts.cfg
    dt = dtype_of(cfg.dtype)
    impl = cfg.grouped_matmul_impl
    fp8 = cfg.fp8_grouped_gemm if cfg.fp8 and experts.fp8_block is None else False
    mesh = plan.mesh
    batch = _axes(plan.rules.get("batch"))
    ep_axes = _axes(plan.rules.get("expert"))
    tp = _axes(plan.rules.get("moe_mlp"))
    if len(ep_axes) > 1 or (ep_axes and ep_axes[0] not in batch) or set(tp) & set(batch):
        raise ValueError(f"expert parallelism needs 'expert' on one batch axis and 'moe_mlp' off the batch axes; "
                         f"rules: batch={batch}, expert={ep_axes}, moe_mlp={tp}. Fix: use a RULE_PRESETS combination")
    p = plan.size(ep_axes)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    if e % p:
        raise ValueError(f"n_routed_experts={e} is not divisible by the {p} expert-parallel devices. Fix: choose "
                         f"mesh.expert dividing {e}")
    n_tok = x.shape[0]
    t = n_tok // plan.size(batch)                                 # tokens per device
    el = e // p
    cf = plan.config.capacity_factor
    worst = t * min(k, el)                                        # most pairs one source can send one device
    mode = dispatch_mode(plan) if p > 1 else "local"
    if mode == "capacity":
        cap = worst if cf is None else max(1, min(worst, math.ceil(cf * t * k / p)))
        local = functools.partial(_capacity, axis=ep_axes[0], p=p, cap=cap, impl=impl, dt=dt, fp8=fp8)
    elif mode in ("ragged", "ragged_emulated"):
        buf = p * worst if cf is None else max(1, min(p * worst, math.ceil(cf * t * k)))
        a2a = jax.lax.ragged_all_to_all if mode == "ragged" else ragged_all_to_all_emulated
        local = functools.partial(_ragged, axis=ep_axes[0], p=p, buf=buf, impl=impl, dt=dt, a2a=a2a, fp8=fp8)
    else:
        local = functools.partial(_local, impl=impl, dt=dt, fp8=fp8)

    def body(x, idx, wts, wg, wu, wd):
        y, dropped = local(x, idx, wts, wg, wu, wd)
        if tp:
            y = jax.lax.psum(y, tp)                               # partial sums over the split F
        if batch:
            dropped = jax.lax.psum(dropped, batch)
        return y.astype(dt), dropped

    ep = ep_axes[0] if ep_axes else None
    tpa = tp if len(tp) != 1 else tp[0]
    tpa = tpa or None
    tok = P(batch or None, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P(ep, None, tpa), P(ep, None, tpa),
                                                  P(ep, tpa, None)),
                       out_specs=(tok, P()))
    names = ("gate_proj", "up_proj", "down_proj")
    # FP8 training quantises the master weights (as RoutedExperts does); otherwise the compute-dtype weights
    w = [getattr(experts, n).get_value() if fp8 else experts._w(n) for n in names]
    return fn(x.astype(dt), indices, weights.astype(jnp.float32), *w)
