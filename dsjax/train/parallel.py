"""Training on a device mesh: train-state shardings from the rules table, sharded init, global batches, the step.

Everything here is a no-op concern on one device: :func:`plan_for` returns ``None`` for ``MeshConfig()`` on a single
device, and the loop then runs the plain single-device code.

* :func:`state_shardings` -- a :class:`~dsjax.train.step.TrainState` of ``NamedSharding``: parameters and routing
  biases by their ``logical_axes`` through the plan's rules; optimizer moments like the parameter they belong to
  (matched by path suffix and shape); counters replicated.
* :func:`init_state_sharded` -- ``jit(init_state, out_shardings=...)``: every device computes only its shards, so a
  model larger than one device is never materialised on one (and, with JAX's partitionable threefry, the values
  equal the single-device init).
* :func:`put_batch` -- a host batch (identical on every process) to a global array split over the batch axes; each
  process hands over only the rows of its own devices.
* :func:`jit_train_step` -- the train step jitted with those shardings in and out (the state keeps its layout from
  step to step, metrics come back replicated) and the plan active while it is traced.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsjax.model import Transformer
from dsjax.sharding import Plan, flat_param_specs, make_plan, validate
from dsjax.train.config import TrainConfig
from dsjax.train.step import TrainState, abstract_state, init_state, make_train_step, split_model

__all__ = ["plan_for", "state_specs", "state_shardings", "abstract_state_sharded", "init_state_sharded", "batch_sharding",
           "put_batch", "jit_train_step"]


def _keys(path) -> tuple:
    return tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))) for p in path)


def plan_for(cfg: TrainConfig, devices=None) -> Plan | None:
    """``cfg.mesh`` over ``devices`` (default all), validated against the model and batch; ``None`` on one device."""
    plan = make_plan(cfg.mesh, devices)
    if plan is not None:
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
        validate(cfg.model, plan, batch_size=cfg.data.batch_size, micro_batches=cfg.micro_batches,
                 state=nnx.state(abstract))
    return plan


def state_specs(cfg: TrainConfig, rules, abstract: TrainState | None = None) -> TrainState:
    """A ``TrainState``-shaped tree of ``PartitionSpec`` under ``rules`` (no mesh needed: also for planning)."""
    model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    specs = {path: (spec, shape) for path, (spec, shape, _) in flat_param_specs(nnx.state(model), rules).items()}

    def leaf(path, x):
        keys = _keys(path)
        shape = tuple(getattr(x, "shape", ()))
        for i in range(len(keys)):  # parameters, biases, and optimizer moments that mirror a parameter's path
            hit = specs.get(keys[i:])
            if hit is not None and hit[1] == shape:
                return hit[0]
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(leaf, abstract_state(cfg) if abstract is None else abstract)


def state_shardings(cfg: TrainConfig, plan: Plan) -> TrainState:
    """A ``TrainState``-shaped tree of ``NamedSharding`` for ``cfg`` on ``plan``."""
    return jax.tree.map(lambda s: NamedSharding(plan.mesh, s), state_specs(cfg, plan.rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def abstract_state_sharded(cfg: TrainConfig, plan: Plan) -> TrainState:
    """:func:`~dsjax.train.step.abstract_state` with shardings attached (the target of a sharded restore)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state(cfg),
                        state_shardings(cfg, plan))


def init_state_sharded(cfg: TrainConfig, key: jax.Array, plan: Plan) -> TrainState:
    """A fresh state created directly in its shards."""
    return jax.jit(init_state, static_argnums=0, out_shardings=state_shardings(cfg, plan))(cfg, key)


def batch_sharding(plan: Plan) -> NamedSharding:
    """``[B, T]`` batch arrays: sequences split over the batch axes (data x fsdp x expert)."""
    return plan.sharding(("batch", "seq"))


def put_batch(batch: dict[str, Any], plan: Plan) -> dict[str, jax.Array]:
    """Host arrays (the same global batch on every process) -> global arrays split over the batch axes."""
    sharding = batch_sharding(plan)
    out = {}
    for k, v in batch.items():
        arr = np.asarray(v, np.int32)
        out[k] = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
    return out


def jit_train_step(cfg: TrainConfig, plan: Plan, graphdef: Any, params_template: nnx.State,
                   rest_template: nnx.State) -> Callable[[TrainState, dict[str, jax.Array]],
                                                         tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted train step on ``plan``: sharded state in and out (donated), sharded batch, replicated metrics."""
    shardings = state_shardings(cfg, plan)
    step = plan.wrap(make_train_step(cfg, graphdef, params_template, rest_template, plan=plan))
    return jax.jit(step, in_shardings=(shardings, batch_sharding(plan)),
                   out_shardings=(shardings, NamedSharding(plan.mesh, PartitionSpec())), donate_argnums=0)


def split_abstract(cfg: TrainConfig):
    """``(graphdef, params, rest)`` of the abstract model (templates for :func:`jit_train_step`)."""
    return split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
