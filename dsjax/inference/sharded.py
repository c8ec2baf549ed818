"""Generation on a device mesh: the pieces :func:`~dsjax.inference.jit_generate` and
:func:`~dsjax.inference.jit_speculative_generate` share (batch checks and padding, shardings, a cache of compiled
generators).

Layout on a :class:`~dsjax.sharding.Plan`: the model state as the rules table says (:func:`dsjax.sharding.
param_shardings`, the layout training and ``load_hf(plan=...)`` produce); prompts, prompt lengths, PRNG keys and every
``[B, ...]`` output split by rows over the batch axes (data x fsdp x expert); the latent cache likewise
(:func:`dsjax.model.cache_shardings`); scalars replicated. The generator is traced with the plan active, so the MoE
blocks take their expert-parallel path (:mod:`dsjax.model.moe_ep`) and the absorbed attention runs per device
(:meth:`dsjax.model.MLA.attend_absorbed`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.configs import ConfigError, ModelConfig
from dsjax.sharding import Plan, param_shardings, shard_params, tree_shardings, validate

__all__ = ["check_batch", "ShardedGenerator", "sharded_generator", "pad_rows", "put_rows", "BATCH_INPUT_AXES"]

#: Logical axes of a generator's batch inputs: ``prompts [B, P]``, ``prompt_lengths [B]``, ``keys [B]``.
BATCH_INPUT_AXES = (("batch", "seq"), ("batch",), ("batch",))


def check_batch(plan: Plan, batch_size: int, what: str) -> None:
    """Raises :class:`ConfigError` unless ``batch_size`` rows split evenly over the plan's batch axes."""
    n = plan.batch_size_divisor
    if batch_size % n:
        raise ConfigError(f"{what}: batch of {batch_size} rows is not divisible by the {n} devices of the batch axes "
                          f"{plan.rules.get('batch')!r} (mesh {dict(plan.mesh.shape)}). Fix: pass a multiple of {n} "
                          f"rows (dsjax.generate / speculative_generate with plan= pad the batch for you), or use a "
                          f"mesh whose data x fsdp x expert divides {batch_size}")


def pad_rows(n_rows: int, plan: Plan, *arrays: Any) -> tuple[Any, ...]:
    """Pads each array's rows (axis 0) to a multiple of the plan's batch divisor by repeating its last row (a
    repeated row stops when its original does, so padding never lengthens the decode loop)."""
    n = plan.batch_size_divisor
    extra = -n_rows % n
    if not extra:
        return arrays
    return tuple(jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)], axis=0) for a in arrays)


def put_rows(plan: Plan, prompts: Any, prompt_lengths: Any, keys: jax.Array) -> tuple[jax.Array, ...]:
    """The batch inputs on the plan's mesh, rows split over the batch axes."""
    shardings = [plan.sharding(axes) for axes in BATCH_INPUT_AXES]
    return tuple(jax.device_put(jnp.asarray(x), s) for x, s in zip((prompts, prompt_lengths, keys), shardings))


@dataclasses.dataclass(frozen=True)
class ShardedGenerator:
    """A generator jitted for a plan: ``gen(state, prompts, prompt_lengths, keys)``.

    ``state`` (laid out as :func:`dsjax.sharding.param_shardings`; :func:`dsjax.sharding.shard_params` places it),
    ``prompts [B, P]`` left-padded, ``prompt_lengths [B]``, ``keys [B]`` (one PRNG key per row); B must be a multiple
    of ``plan.batch_size_divisor`` (checked, with a clear error). Arguments laid out otherwise are moved by
    ``jax.jit``. ``lower`` takes the same arguments (e.g. ``gen.lower(...).compile().output_shardings``).
    """

    jitted: Callable
    plan: Plan
    name: str

    def __call__(self, state, prompts, prompt_lengths, keys):
        check_batch(self.plan, prompts.shape[0], self.name)
        return self.jitted(state, prompts, prompt_lengths, keys)

    def lower(self, state, prompts, prompt_lengths, keys):
        check_batch(self.plan, prompts.shape[0], self.name)
        return self.jitted.lower(state, prompts, prompt_lengths, keys)


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 16


def sharded_generator(name: str, fn: Callable, plan: Plan, state: Any, out_axes: Any, key: tuple) -> ShardedGenerator:
    """``jax.jit`` of ``fn(state, prompts, prompt_lengths, keys)`` traced under ``plan``, with the state's shardings
    from the rules table, batch inputs and ``out_axes`` (a tree of logical-axes tuples matching ``fn``'s output)
    split as the module docstring says. Cached on ``(name, plan, key, state shardings)``, so repeated calls with the
    same static arguments do not recompile (``key`` holds ``fn``'s static arguments; it must identify ``fn``)."""
    state_sh = param_shardings(state, plan)
    leaves, treedef = jax.tree.flatten(state_sh)
    cache_key = (name, plan, key, treedef, tuple(leaves))
    gen = _CACHE.get(cache_key)
    if gen is None:
        def run(state, prompts, prompt_lengths, keys):
            return fn(state, prompts, prompt_lengths, keys)

        run.__name__ = name                                      # the compiled module's name, as on one device
        jitted = jax.jit(plan.wrap(run), in_shardings=(state_sh, *(plan.sharding(a) for a in BATCH_INPUT_AXES)),
                         out_shardings=tree_shardings(plan, out_axes))
        gen = ShardedGenerator(jitted=jitted, plan=plan, name=name)
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.popitem(last=False)
        _CACHE[cache_key] = gen
    else:
        _CACHE.move_to_end(cache_key)
    return gen


def prepare(plan: Plan, model_cfg: ModelConfig, state: Any, prompts: np.ndarray, prompt_lengths: np.ndarray,
            keys: jax.Array) -> tuple[Any, jax.Array, jax.Array, jax.Array]:
    """For the ``plan=`` paths of ``generate`` / ``speculative_generate``: the model checked against the mesh
    (:func:`dsjax.sharding.validate`: heads, experts, every weight dimension, with a clear error), its state placed per
    the rules table, the batch padded to a multiple of the batch divisor (:func:`pad_rows`) and split over the batch
    axes."""
    validate(model_cfg, plan, state=state)
    prompts, prompt_lengths, keys = pad_rows(len(prompts), plan, jnp.asarray(prompts), jnp.asarray(prompt_lengths),
                                             keys)
    return (shard_params(state, plan), *put_rows(plan, prompts, prompt_lengths, keys))
