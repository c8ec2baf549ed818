"""The pure, jit-compiled train step: loss, gradients, AdamW update, non-finite guard, routing-bias update.

Letters: B global batch, M micro-batches, b = B / M, T tokens, E routed experts, Lm MoE layers.

``make_train_step(cfg, graphdef, template)`` returns ``train_step(state, batch) -> (state, metrics)``; jit it once
with ``donate_argnums=0``. Inside, nothing syncs with the host:

1. The batch ``{"tokens", "segment_ids", "positions", "loss_mask"}`` (``[B, T]`` each) is split into M micro-batches
   scanned with ``lax.scan``; gradients and statistics are summed. Losses are normalised by the number of valid
   targets of the **whole** batch, so accumulation equals one big batch.
2. Loss = CE + (lambda / D) * sum_k CE_mtp_k + alpha * sum over MoE layers of the sequence-wise balance term
   (+ z-loss). CE uses float32 logits in chunks (:mod:`dsjax.train.losses`).
3. ``ok = isfinite(loss) & isfinite(grad_norm)``; when not ok, params, optimizer moments and routing biases are
   kept as they were (the step is counted in ``skipped``).
4. Auxiliary-loss-free balancing, outside autodiff: ``b += gamma * sign(mean(c) - c)`` per MoE layer from the
   token counts of the whole batch (all micro-batches; under a mesh the sums are global).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsjax.model import RoutingBias, Transformer
from dsjax.train.config import TrainConfig
from dsjax.train.losses import chunked_cross_entropy, shifted_targets
from dsjax.train.optim import make_optimizer

__all__ = ["TrainState", "init_state", "abstract_state", "make_train_step", "split_model", "flops_per_token"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training (a pytree of arrays; what checkpoints hold).

    Attributes:
      step: int32 number of batches consumed.
      params: trainable parameters (pure nested dict, master dtype).
      opt_state: Optax state (its count drives the schedule; it does not advance on skipped steps).
      rest: non-trainable variables (the routing biases), pure nested dict.
      skipped: int32 total skipped (non-finite) steps; consecutive: int32 current run of skipped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rest: Any
    skipped: jax.Array
    consecutive: jax.Array


def split_model(model: Transformer):
    """``(graphdef, params_state, rest_state)``: ``nnx.Param`` leaves vs everything else (routing biases)."""
    return nnx.split(model, nnx.Param, ...)


def _new_model(cfg: TrainConfig, key: jax.Array) -> Transformer:
    return Transformer(cfg.model, rngs=nnx.Rngs(params=key))


def init_state(cfg: TrainConfig, key: jax.Array) -> TrainState:
    """A fresh state (call under ``jax.jit`` so parameters are created on device, sharded by ``out_shardings``)."""
    return state_from_model(cfg, _new_model(cfg, key))


def state_from_model(cfg: TrainConfig, model: Transformer) -> TrainState:
    """A fresh optimizer state around existing weights (also used for SFT from a pretrained / HF model)."""
    _, params, rest = split_model(model)
    tx, _ = make_optimizer(cfg.optim, cfg.steps)
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rest=nnx.to_pure_dict(rest),
                      skipped=jnp.int32(0), consecutive=jnp.int32(0))


def abstract_state(cfg: TrainConfig) -> TrainState:
    """``jax.ShapeDtypeStruct`` tree of :func:`init_state` (no allocation)."""
    return jax.eval_shape(lambda k: init_state(cfg, k), jax.random.key(0))


def flops_per_token(cfg: TrainConfig) -> float:
    """Training FLOPs per token used for MFU: ``6 * N_active + 3 * L * H * (d_qk + d_v) * T``.

    ``N_active`` = active parameters without the input embedding (a lookup) but with the output head; MTP modules
    add their own active parameters when ``num_nextn_predict_layers > 0`` (they run every step). The attention term
    counts QK^T and PV (2 FLOPs per multiply-add) over an average causal context of T/2, times 3 for
    forward + backward: ``3 * 2 * 2 * (T/2) * H * (d_qk + d_v) / 2 * L`` = ``3 * L * H * (d_qk + d_v) * T``.
    """
    from dsjax.params import count_params

    m = cfg.model
    c = count_params(m)
    active = c["active_with_mtp"] if m.num_nextn_predict_layers else c["active"]
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    attn = 3 * layers * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * cfg.data.seq_len
    return 6.0 * active + attn


def _bias_paths(rest: Any) -> list[tuple]:
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(rest)[0]:
        keys = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        if keys[-1] == "e_score_correction_bias":
            out.append(keys)
    return out


def _counts_for(keys: tuple, counts: jax.Array, mtp_counts: jax.Array | None, first_k: int) -> jax.Array:
    """Maps a bias leaf path to its ``[.., E]`` counts rows (scanned stack, unrolled layer or MTP block)."""
    if keys[0] == "moe_layers":
        return counts
    if keys[0] == "layers":
        return counts[int(keys[1]) - first_k]
    if keys[0] == "mtp":
        return mtp_counts[int(keys[1])]
    raise KeyError(f"unexpected routing-bias location {keys}")


def _update_biases(rest: Any, counts, mtp_counts, gamma, center: bool, first_k: int) -> Any:
    def new_bias(b, c):
        err = jnp.mean(c, axis=-1, keepdims=True) - c
        upd = jnp.sign(err)
        if center:
            upd = upd - jnp.mean(upd, axis=-1, keepdims=True)
        return b + gamma * upd.astype(b.dtype)

    def visit(path, leaf):
        keys = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        if keys[-1] != "e_score_correction_bias":
            return leaf
        return new_bias(leaf, _counts_for(keys, counts, mtp_counts, first_k))

    return jax.tree_util.tree_map_with_path(visit, rest)


def _load_stats(counts: jax.Array) -> dict[str, jax.Array]:
    ratio = counts / jnp.maximum(jnp.mean(counts, axis=-1, keepdims=True), 1e-9)  # [Lm, E]
    return {"load_max": jnp.max(ratio), "load_min": jnp.min(ratio), "load_max_mean": jnp.mean(ratio.max(-1)),
            "load_min_mean": jnp.mean(ratio.min(-1))}


def make_train_step(cfg: TrainConfig, graphdef: Any, params_template: nnx.State, rest_template: nnx.State,
                    plan: Any = None
                    ) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the pure train step for ``cfg``. ``*_template`` are the model's ``nnx.State`` splits (any values).

    ``plan`` (a :class:`~dsjax.sharding.Plan`, given by :func:`dsjax.train.parallel.jit_train_step`) matters only
    when ``cfg.mesh.resolved_grad_sync == "after_backward"`` (pure data parallelism by default): the gradients are
    then computed per device in a ``shard_map`` over the batch axes and summed by one all-reduce after the backward
    pass."""
    mcfg = cfg.model
    depth = mcfg.num_nextn_predict_layers
    alpha = cfg.balance_alpha
    lam = cfg.loss.mtp_lambda
    tx, schedule = make_optimizer(cfg.optim, cfg.steps)
    m = cfg.micro_batches

    def merge(params, rest) -> Transformer:
        p = nnx.State(params_template)
        nnx.replace_by_pure_dict(p, params)
        r = nnx.State(rest_template)
        nnx.replace_by_pure_dict(r, rest)
        return nnx.merge(graphdef, p, r)

    def micro_loss(params, rest, mb, norms, balance_scale=1.0):
        model = merge(params, rest)
        # no "segment_ids" in the batch: one document per row (causal attention without a mask tensor)
        out = model(mb["tokens"], mb.get("segment_ids"), mb["positions"], return_mtp=depth > 0 and lam > 0,
                    return_hidden=True, compute_logits=False)
        seg = _segments(mb)
        tg, w = shifted_targets(mb["tokens"], seg, mb["loss_mask"], 1)
        with jax.named_scope("ce_loss"):
            ce_sum, z_sum = chunked_cross_entropy(out.hidden, model.logits_f32, tg, w, cfg.loss.ce_chunk_tokens)
        ce = ce_sum / norms[0]
        z = z_sum / norms[0]
        loss = ce + cfg.loss.z_loss * z
        aux = {"ce": ce, "z_loss": z}
        if out.mtp_hidden is not None:
            for d in range(depth):
                tg, w = shifted_targets(mb["tokens"], seg, mb["loss_mask"], d + 2)
                s, _ = chunked_cross_entropy(out.mtp_hidden[d], model.logits_f32, tg, w, cfg.loss.ce_chunk_tokens)
                aux[f"mtp_loss_{d + 1}"] = s / norms[d + 1]
                loss = loss + lam / depth * aux[f"mtp_loss_{d + 1}"]
        balance = jnp.float32(0)
        if out.moe is not None:
            balance = balance + jnp.sum(out.moe["balance"]) / m
        if out.mtp_moe is not None:
            balance = balance + jnp.sum(out.mtp_moe["balance"]) / m
        balance = balance * balance_scale   # 1 / devices under after_backward: each device adds its share
        aux["balance_loss"] = alpha * balance
        loss = loss + alpha * balance
        aux["counts"] = out.moe["counts"] if out.moe is not None else jnp.zeros((0, mcfg.n_routed_experts))
        aux["mtp_counts"] = out.mtp_moe["counts"] if out.mtp_moe is not None else \
            jnp.zeros((depth, mcfg.n_routed_experts))
        dropped = [jnp.sum(o["dropped"]) for o in (out.moe, out.mtp_moe) if o is not None and "dropped" in o]
        if dropped:  # expert parallelism on a mesh: (token, expert) pairs over capacity
            aux["moe_dropped"] = sum(dropped)
        return loss, aux

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def grads_of(params, rest, batch, norms, balance_scale=1.0):
        """``(loss, aux, grads)`` of ``batch``, accumulated over ``m`` micro-batches."""
        b = batch["tokens"].shape[0]
        micro = jax.tree.map(lambda x: x.reshape((m, b // m) + x.shape[1:]), batch)

        def acc(carry, mb):
            (loss, aux), g = grad_fn(params, rest, mb, norms, balance_scale)
            g_acc, l_acc, a_acc = carry
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss, jax.tree.map(jnp.add, a_acc, aux)), None

        if m == 1:
            (loss, aux), grads = grad_fn(params, rest, jax.tree.map(lambda x: x[0], micro), norms, balance_scale)
        else:
            # zeros typed like one micro-batch's results (inside ``shard_map`` they carry its varying mesh axes)
            (loss_s, aux_s), grads_s = jax.eval_shape(grad_fn, params, rest, jax.tree.map(lambda x: x[0], micro),
                                                      norms, balance_scale)
            init = jax.tree.map(jnp.zeros_like, (grads_s, loss_s, aux_s))
            (grads, loss, aux), _ = jax.lax.scan(acc, init, micro)
        return loss, aux, grads

    sync_after = None
    if plan is not None and cfg.mesh.resolved_grad_sync == "after_backward":
        sync_after = _after_backward_sync(grads_of, plan, cfg.mesh.grad_sync_dtype, cfg.data.batch_size, m)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        # valid targets per head over the whole batch: the loss normalisers
        norms = [jnp.maximum(shifted_targets(batch["tokens"], _segments(batch), batch["loss_mask"], k)[1].sum(),
                             1.0) for k in range(1, depth + 2)]
        if sync_after:
            loss, aux, grads = sync_after(state.params, state.rest, batch, norms)
        else:
            loss, aux, grads = grads_of(state.params, state.rest, batch, norms)

        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        counts = jax.lax.stop_gradient(aux.pop("counts"))
        mtp_counts = jax.lax.stop_gradient(aux.pop("mtp_counts"))
        gamma = cfg.balance.gamma
        if cfg.balance.gamma_until_step is not None:
            gamma = jnp.where(state.step < cfg.balance.gamma_until_step, gamma, 0.0)

        def apply(operands):
            params, opt_state, rest, grads = operands
            with jax.named_scope("optimizer"):
                updates, new_opt = tx.update(grads, opt_state, params)
                new_params = optax.apply_updates(params, updates)
            new_rest = _update_biases(rest, counts, mtp_counts, gamma, cfg.balance.center, mcfg.first_k_dense_replace)
            return new_params, new_opt, new_rest

        def skip(operands):
            params, opt_state, rest, _ = operands
            return params, opt_state, rest

        # A skipped step leaves params, moments (and Adam's count) and routing biases exactly as they were. A
        # conditional rather than a select: a select over params + moments re-reads and re-writes all of them.
        new_params, new_opt, new_rest = jax.lax.cond(ok, apply, skip,
                                                     (state.params, state.opt_state, state.rest, grads))
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            rest=new_rest,
            skipped=state.skipped + (~ok).astype(jnp.int32),
            consecutive=jnp.where(ok, 0, state.consecutive + 1).astype(jnp.int32),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped),
                   "skipped": (~ok).astype(jnp.int32), "skipped_total": new_state.skipped,
                   "consecutive_skips": new_state.consecutive, "tokens": norms[0],
                   # a position-weighted checksum of the batch: equal checksums per step <=> the same data stream
                   "data_checksum": jnp.sum(batch["tokens"].astype(jnp.uint32)
                                            * (jnp.arange(batch["tokens"].size, dtype=jnp.uint32)
                                               .reshape(batch["tokens"].shape) + 1)).astype(jnp.uint32),
                   **aux}
        if counts.shape[0]:
            metrics.update(_load_stats(counts))
            biases = [b_ for p, b_ in jax.tree_util.tree_flatten_with_path(new_state.rest)[0]
                      if getattr(p[-1], "key", None) == "e_score_correction_bias"]
            if biases:
                spreads = [jnp.max(x, -1) - jnp.min(x, -1) for x in biases]
                metrics["bias_spread"] = jnp.mean(jnp.concatenate([jnp.atleast_1d(s) for s in spreads]))
        return new_state, metrics

    return train_step


def _segments(batch: dict[str, jax.Array]) -> jax.Array:
    """The batch's document ids, or one document per row when it has none."""
    seg = batch.get("segment_ids")
    return jnp.ones_like(batch["tokens"]) if seg is None else seg


def _after_backward_sync(grads_of: Callable, plan: Any, dtype: str | None, batch_size: int, micro_batches: int
                         ) -> Callable:
    """``grads_of`` per device in a ``shard_map`` over the batch axes, then one all-reduce of every gradient.

    Each device differentiates its own rows with the model's single-device code (no plan inside): CE/MTP/z sums are
    divided by the *global* token counts (``norms``) and the balance term by the device count, so the sum over
    devices of the local losses is the global loss and ``psum`` of the local gradients is its gradient. The
    parameters enter as varying (``pcast``) so that JAX adds no per-use ``psum`` inside the backward pass.
    """
    from jax.sharding import PartitionSpec as P

    from dsjax.configs import ConfigError
    from dsjax.sharding import use_plan

    axes = tuple(a for a in plan.mesh.axis_names if plan.mesh.shape[a] > 1)
    n = math.prod(plan.mesh.shape[a] for a in axes)
    if batch_size % (n * micro_batches):
        raise ConfigError(f"data.batch_size={batch_size} must be divisible by devices x micro_batches = {n} x "
                          f"{micro_batches} with mesh.grad_sync='after_backward'. Fix: change the batch size")
    sync_dtype = None if dtype is None else jnp.dtype(dtype)

    def local(params, rest, batch, norms):
        with use_plan(None):  # the single-device model code on this device's rows
            params = jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), params)
            loss, aux, grads = grads_of(params, rest, batch, norms, 1.0 / n)
        if sync_dtype is not None:
            grads = jax.tree.map(lambda g: jax.lax.psum(g.astype(sync_dtype), axes).astype(g.dtype), grads)
        else:
            grads = jax.lax.psum(grads, axes)
        return jax.lax.psum(loss, axes), jax.lax.psum(aux, axes), grads

    return jax.shard_map(local, mesh=plan.mesh, in_specs=(P(), P(), P(axes), P()), out_specs=(P(), P(), P()))
