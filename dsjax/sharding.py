"""Meshes, logical-axis names and the one rules table that maps them to mesh axes.

Every parameter created in ``dsjax.model`` carries ``logical_axes`` metadata (one name per array axis); activations
that need a placement use the ``batch`` / ``act_*`` names below. This module is the only place that turns those
names into ``PartitionSpec``s; layers never mention mesh axes.

Mesh axes (:data:`MESH_AXES`, in this order, outermost first):

* ``data``   -- pure data parallelism: the batch is split, parameters are replicated;
* ``fsdp``   -- data parallelism with sharded parameters (ZeRO-3 style: the ``embed`` dimension of every weight is
  split; XLA gathers a layer's weights just before use and reduce-scatters its gradients);
* ``expert`` -- expert parallelism: routed experts live on different devices and tokens travel to them
  (:mod:`dsjax.model.moe_ep`, ``shard_map`` + all-to-all); outside the MoE blocks it is one more batch axis;
* ``tensor`` -- tensor (Megatron) parallelism: heads, MLP/expert intermediate and vocabulary dimensions are split;
  every device of a ``tensor`` group sees the same tokens.

Usage::

    plan = make_plan(MeshConfig(data=2, expert=2, tensor=2))   # None for a single device
    validate(model_cfg, plan, batch_size=8)                   # divisibility, with a clear error
    with use_plan(plan):                                      # while tracing: MoE blocks use expert parallelism
        ...

Axis types: meshes are made with :class:`jax.sharding.AxisType` ``Auto`` on purpose. dsjax runs GSPMD-style: shardings
are fixed at the jit boundary (parameters, optimizer state, batch) and XLA's sharding propagation places everything
in between, plus an explicit ``shard_map`` for the MoE all-to-all. ``Explicit`` axes (the ``jax.make_mesh`` default
since JAX 0.9) would make sharding part of every array's type and require ``out_sharding=`` at each ambiguous einsum
inside the layers, i.e. mesh knowledge in the model code, which the house rules keep in this one file.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from dsjax.configs import ConfigError, ModelConfig

__all__ = ["LOGICAL_AXES", "MESH_AXES", "DEFAULT_RULES", "RULE_PRESETS", "EP_DISPATCH", "MeshConfig", "Plan",
           "make_rules", "make_mesh", "make_plan", "use_plan", "current_plan", "constrain", "validate",
           "logical_to_spec", "param_partition_specs", "flat_param_specs", "sharding_fn", "shard_shape",
           "BATCH_AXES", "tree_shardings", "param_shardings", "shard_params", "map_shards"]

MESH_AXES = ("data", "fsdp", "expert", "tensor")
#: Mesh axes that split the batch (every one of them sees different tokens).
BATCH_AXES = ("data", "fsdp", "expert")
#: Expert-parallel dispatch implementations (see :mod:`dsjax.model.moe_ep`).
EP_DISPATCH = ("auto", "ragged", "capacity", "ragged_emulated")
GRAD_SYNC = ("auto", "gspmd", "after_backward")
GRAD_SYNC_DTYPES = (None, "float32", "bfloat16")

#: Every logical axis name a parameter or activation may use, with what it indexes.
LOGICAL_AXES: dict[str, str] = {
    # parameters
    "vocab": "vocabulary entries (embedding rows, head columns)",
    "embed": "hidden_size D",
    "embed2": "the 2D concatenation fed to MTP's eh_proj",
    "heads": "attention heads N",
    "qk_head": "per-head query size C+P",
    "kv_head": "per-head expanded key+value size C+V (kv_b_proj output)",
    "v_head": "per-head value size V",
    "q_lora": "q_lora_rank",
    "kv_lora": "kv_lora_rank",
    "kv_lora_rope": "kv_lora_rank + qk_rope_head_dim (kv_a_proj_with_mqa output)",
    "mlp": "dense FFN intermediate size",
    "moe_mlp": "expert / shared-expert intermediate size",
    "expert": "routed experts E (expert weights)",
    "expert_gate": "routed experts E in the router (kept replicated: tiny, float32)",
    "norm": "RMSNorm scale vectors",
    "layers": "stacked layers of a scanned stack",
    # the latent KV cache (dsjax.model.cache.LatentCache; its batch axis is "batch")
    "cache_layers": "decoder layers L of a latent cache",
    "cache_seq": "cache slots T of a latent cache",
    "cache_kv_lora": "kv_lora_rank R of the cached latents c_kv",
    "cache_rope": "qk_rope_head_dim P of the cached rope keys k_rot",
    # activations
    "batch": "sequences of a batch (and the flattened tokens B*S inside MoE blocks)",
    "seq": "positions of a sequence",
    "act_embed": "hidden_size D of activations",
    "act_heads": "attention heads of activations",
    "act_vocab": "vocabulary of logits",
}

_NONE = {name: None for name in LOGICAL_AXES}
_BASE = {**_NONE, "batch": BATCH_AXES}

#: Named rule sets; combine with ``+`` (e.g. ``"fsdp+ep"``). Every preset splits the batch over data, fsdp and
#: expert; they differ in which weights are split.
RULE_PRESETS: dict[str, dict[str, Any]] = {
    "dp": {},                                                       # weights replicated
    "fsdp": {"embed": "fsdp"},                                      # ZeRO-3: weights split along D
    "ep": {"expert": "expert"},                                     # routed experts split
    "tp": {"vocab": "tensor", "heads": "tensor", "mlp": "tensor", "moe_mlp": "tensor", "act_heads": "tensor",
           "act_vocab": "tensor"},
}
RULE_PRESETS["default"] = {**RULE_PRESETS["fsdp"], **RULE_PRESETS["ep"], **RULE_PRESETS["tp"]}


def make_rules(spec: str = "default") -> dict[str, Any]:
    """The rules table of a preset name or ``+``-joined combination (``"dp"``, ``"fsdp+ep"``, ``"default"``)."""
    rules = dict(_BASE)
    for part in spec.split("+"):
        part = part.strip()
        if part not in RULE_PRESETS:
            raise ConfigError(f"mesh.rules={spec!r}: {part!r} is not a rules preset. Fix: use one of "
                              f"{sorted(RULE_PRESETS)} or a '+'-joined combination such as 'fsdp+ep'")
        rules.update(RULE_PRESETS[part])
    return rules


#: Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated): FSDP + EP + TP, which degrades to the
#: simpler schemes when the corresponding mesh axes have size 1.
DEFAULT_RULES: dict[str, Any] = make_rules("default")


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Device mesh ``data x fsdp x expert x tensor`` and how the model is laid out on it.

    All sizes 1 (the default) means no mesh: the default device, the plain single-device code path. One size may
    be -1: it takes the devices left over (``data=-1`` on 8 devices with ``expert=2`` gives ``data=4``).

    Attributes:
      data, fsdp, expert, tensor: mesh axis sizes; their product must equal the number of devices.
      rules: rules preset (``default``, ``dp``, ``fsdp``, ``ep``, ``tp`` or a ``+`` combination, see
        :data:`RULE_PRESETS`).
      capacity_factor: expert-parallel buffer size as a multiple of the average load (each device receives
        ``capacity_factor * tokens_per_device * K`` (token, expert) pairs at most; pairs beyond are dropped and
        counted in the ``moe_dropped`` metric). ``None``: buffers sized for the worst case, so nothing is ever
        dropped (exact, but the grouped matmuls then run over ``expert``-times more rows).
      ep_dispatch: ``auto`` (``ragged`` on GPU/TPU, where XLA has ``ragged-all-to-all``, ``capacity`` elsewhere),
        ``ragged``, ``capacity``, or ``ragged_emulated`` (the ragged bookkeeping over plain all-to-alls; for tests).
      grad_sync: how data-parallel gradients are summed. ``gspmd``: XLA's partitioner all-reduces each layer's
        weight gradients where they are produced, inside the backward loop of a scanned model (small messages, one
        synchronisation per layer). ``after_backward`` (pure data parallelism: only ``data`` > 1): every device
        runs the whole backward on its rows (``shard_map``) and one all-reduce of all gradients follows: large
        messages, no per-layer synchronisation; same values up to float32 summation order. ``auto`` (default):
        ``after_backward`` for pure data parallelism, ``gspmd`` otherwise (on 4 H100s, ``small``: 188.7 ms/step
        with a bf16 all-reduce after the backward vs 289.2 ms with ``gspmd``, one device 175.4 ms).
      grad_sync_dtype: with ``after_backward``, the dtype of that all-reduce (``bfloat16`` halves the bytes and
        rounds the summed gradients to bf16; ``None``: the gradients' own dtype).
    """

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: str = "default"
    capacity_factor: float | None = None
    ep_dispatch: str = "auto"
    grad_sync: str = "auto"
    grad_sync_dtype: str | None = None

    def __post_init__(self):
        sizes = self.sizes
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"mesh={sizes}: at most one axis may be -1 (fill). Fix: give the others explicitly")
        for name, s in zip(MESH_AXES, sizes):
            if s != -1 and s < 1:
                raise ConfigError(f"mesh.{name}={s}: must be >= 1 (or -1 to take the remaining devices)")
        make_rules(self.rules)
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"mesh.capacity_factor={self.capacity_factor}: must be > 0 (e.g. 1.25) or None for "
                              f"dropless worst-case buffers")
        if self.ep_dispatch not in EP_DISPATCH:
            raise ConfigError(f"mesh.ep_dispatch={self.ep_dispatch!r} is unknown. Fix: use one of {EP_DISPATCH}")
        if self.grad_sync not in GRAD_SYNC:
            raise ConfigError(f"mesh.grad_sync={self.grad_sync!r} is unknown. Fix: use one of {GRAD_SYNC}")
        if self.grad_sync_dtype not in GRAD_SYNC_DTYPES:
            raise ConfigError(f"mesh.grad_sync_dtype={self.grad_sync_dtype!r} is unknown. Fix: use one of "
                              f"{GRAD_SYNC_DTYPES}")
        if self.grad_sync == "after_backward" and (self.fsdp, self.expert, self.tensor) != (1, 1, 1):
            raise ConfigError(f"mesh.grad_sync='after_backward' is for pure data parallelism, but fsdp={self.fsdp}, "
                              f"expert={self.expert}, tensor={self.tensor}. Fix: set them to 1 or use "
                              f"grad_sync='gspmd'")

    @property
    def resolved_grad_sync(self) -> str:
        """``grad_sync`` with ``auto`` resolved: ``after_backward`` when only the ``data`` axis is split."""
        if self.grad_sync != "auto":
            return self.grad_sync
        return "after_backward" if (self.fsdp, self.expert, self.tensor) == (1, 1, 1) else "gspmd"

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        return (self.data, self.fsdp, self.expert, self.tensor)

    @property
    def is_single_device(self) -> bool:
        return self.sizes == (1, 1, 1, 1)

    def resolve(self, n_devices: int) -> "MeshConfig":
        """Fills a ``-1`` axis and checks that the product equals ``n_devices``."""
        sizes = list(self.sizes)
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if n_devices % known:
                raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do not "
                                  f"divide the {n_devices} devices. Fix: choose sizes whose product divides "
                                  f"{n_devices}")
            sizes[sizes.index(-1)] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ConfigError(f"mesh data x fsdp x expert x tensor = {' x '.join(map(str, sizes))} = "
                              f"{math.prod(sizes)} devices, but {n_devices} are available. Fix: make the product "
                              f"{n_devices} (or set one axis to -1 to take the rest)")
        return dataclasses.replace(self, **dict(zip(MESH_AXES, sizes)))


# ------------------------------------------------------------------------------------------------ mesh / plan
def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``data x fsdp x expert x tensor`` mesh over ``devices`` (default: all devices of all processes).

    ``jax.make_mesh`` orders devices so that the innermost axes (``tensor``, then ``expert``) sit on the fastest
    links (NVLink within a host); ``data`` is outermost (it only all-reduces gradients once a step).
    """
    devices = list(jax.devices() if devices is None else devices)
    cfg = cfg.resolve(len(devices))
    return jax.make_mesh(cfg.sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A mesh, its rules table and the expert-parallel options: what a sharded program needs at trace time."""

    mesh: jax.sharding.Mesh
    rules: Mapping[str, Any]
    config: MeshConfig

    def __hash__(self) -> int:
        # rules is a dict: hash its items, so that a plan can key caches of compiled functions (equal plans, one key)
        return hash((self.mesh, tuple(sorted(self.rules.items())), self.config))

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        return logical_to_spec(tuple(axes), self.rules)

    def sharding(self, axes: Sequence[str | None] = ()) -> NamedSharding:
        """``NamedSharding`` of logical ``axes`` (``()`` = replicated)."""
        return NamedSharding(self.mesh, self.spec(axes))

    def size(self, mesh_axes: str | Sequence[str] | None) -> int:
        if mesh_axes is None:
            return 1
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        return math.prod(self.mesh.shape[a] for a in names)

    def axis_size(self, logical: str) -> int:
        """How many ways the logical axis is split on this mesh."""
        return self.size(self.rules.get(logical))

    @property
    def batch_size_divisor(self) -> int:
        return self.axis_size("batch")

    def wrap(self, fn: Callable) -> Callable:
        """``fn`` with this plan active while it runs (use it on functions you ``jax.jit``: tracing sees the plan)."""

        def wrapped(*args, **kwargs):
            with use_plan(self):
                return fn(*args, **kwargs)

        wrapped.__name__ = getattr(fn, "__name__", "wrapped")
        wrapped.__doc__ = fn.__doc__
        return wrapped

    def describe(self) -> dict[str, Any]:
        return {"axes": dict(self.mesh.shape), "rules": self.config.rules,
                "capacity_factor": self.config.capacity_factor, "ep_dispatch": self.config.ep_dispatch}


def make_plan(cfg: MeshConfig | None, devices: Sequence[jax.Device] | None = None) -> Plan | None:
    """The :class:`Plan` for ``cfg`` over ``devices``; ``None`` for ``MeshConfig()`` (all sizes 1) -- callers then
    take the plain single-device path on the default device, with no ``shard_map`` and no sharding annotations."""
    if cfg is None or cfg.is_single_device:
        return None
    devices = list(jax.devices() if devices is None else devices)
    cfg = cfg.resolve(len(devices))
    return Plan(mesh=make_mesh(cfg, devices), rules=make_rules(cfg.rules), config=cfg)


_PLAN: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("dsjax_sharding_plan", default=None)


@contextlib.contextmanager
def use_plan(plan: Plan | None) -> Iterator[Plan | None]:
    """Makes ``plan`` the active plan (read by the MoE blocks while tracing); ``None`` deactivates."""
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def current_plan() -> Plan | None:
    """The active :class:`Plan` or ``None`` (single device)."""
    return _PLAN.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical axes under the active plan; the identity without one."""
    plan = current_plan()
    if plan is None:
        return x
    return jax.lax.with_sharding_constraint(x, plan.sharding(axes))


# ------------------------------------------------------------------------------------------------ rules -> specs
def logical_to_spec(axes: tuple[str | None, ...], rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``; a mesh axis used twice raises a ``ValueError``."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule. Fix: add it to the rules table "
                             f"(known: {sorted(rules)})")
        target = rules[name]
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for t in targets:
            if t in used:
                raise ValueError(f"mesh axis {t!r} is used twice in logical axes {axes}. Fix: change the rule "
                                 f"for {name!r}")
            used.add(t)
        spec.append(target)
    return PartitionSpec(*spec)


def _var_spec(v: Any, rules: Mapping[str, Any]) -> PartitionSpec:
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
    if axes is None:
        return PartitionSpec()
    return logical_to_spec(tuple(axes), rules)


def param_partition_specs(state: nnx.State, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A tree of ``PartitionSpec`` matching ``state`` (an ``nnx.State`` of variables with ``logical_axes``)."""
    return jax.tree.map(lambda v: _var_spec(v, rules), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def flat_param_specs(state: nnx.State, rules: Mapping[str, Any] = DEFAULT_RULES
                     ) -> dict[tuple, tuple[PartitionSpec, tuple[int, ...], Any]]:
    """``{path: (spec, shape, dtype)}`` for every variable of an (abstract) ``nnx.State``."""
    out = {}
    for path, v in nnx.to_flat_state(state):
        value = v.get_value()
        out[tuple(path)] = (_var_spec(v, rules), tuple(value.shape), value.dtype)
    return out


def sharding_fn(plan: Plan) -> Callable[[tuple, Any], NamedSharding]:
    """``(leaf_path, abstract_variable) -> NamedSharding`` from the plan's rules (for :func:`dsjax.load_hf`)."""
    return lambda path, var: NamedSharding(plan.mesh, _var_spec(var, plan.rules))


def shard_shape(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of ``shape`` split by ``spec`` on a mesh with ``axis_sizes`` (ceil division,
    as XLA pads uneven splits)."""
    out = []
    for i, n in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(-(-n // math.prod(axis_sizes[a] for a in names)) if names else n)
    return tuple(out)


def tree_shardings(plan: Plan, axes_tree: Any) -> Any:
    """A tree of ``NamedSharding`` from a tree whose leaves are tuples of logical axis names (one per array axis;
    ``()`` = replicated), e.g. :meth:`dsjax.model.LatentCache.logical_axes`."""
    return jax.tree.map(plan.sharding, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(state: nnx.State, plan: Plan) -> Any:
    """A tree of ``NamedSharding`` matching ``state`` (an ``nnx.State``, abstract or concrete): every variable by its
    ``logical_axes`` through the plan's rules (:func:`param_partition_specs`), the rest replicated."""
    return jax.tree.map(lambda s: NamedSharding(plan.mesh, s), param_partition_specs(state, plan.rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_params(state: nnx.State, plan: Plan) -> nnx.State:
    """``state`` placed on the plan's mesh as :func:`param_shardings` says (arrays already laid out that way are not
    copied). For a model larger than one device, create or load it sharded instead (``dsjax.load_hf(plan=...)``,
    ``jit(..., out_shardings=param_shardings(...))``)."""
    return jax.device_put(state, param_shardings(state, plan))


def map_shards(fn: Callable, in_axes: Sequence[Sequence[str | None] | None],
               out_axes: Sequence[str | None] | list[Sequence[str | None]], *, check_vma: bool = True) -> Callable:
    """``fn`` run on each device's shards under the active plan (``jax.shard_map``, specs from logical axes); ``fn``
    itself, untouched, without a plan.

    For custom calls XLA's partitioner cannot split (Pallas kernels): inside, ``fn`` sees per-device blocks, e.g.
    ``[B / batch devices, ...]``. ``in_axes``: one tuple of logical names per positional argument (``None`` or a
    ``None`` entry: not split, i.e. gathered if the argument arrives split); ``out_axes``: the output's tuple, or a
    list of tuples for a tuple of outputs. An output axis left unsplit must hold the same values on every device.
    """
    plan = current_plan()
    if plan is None:
        return fn

    def spec(axes):
        return PartitionSpec() if axes is None else plan.spec(axes)

    outs = tuple(map(spec, out_axes)) if isinstance(out_axes, list) else spec(out_axes)
    return jax.shard_map(fn, mesh=plan.mesh, in_specs=tuple(map(spec, in_axes)), out_specs=outs, check_vma=check_vma)


# ------------------------------------------------------------------------------------------------ validation
def validate(model_cfg: ModelConfig, plan: Plan | None, *, batch_size: int | None = None,
             micro_batches: int = 1, state: nnx.State | None = None) -> None:
    """Checks that the model and batch split evenly over ``plan``'s mesh; raises :class:`ConfigError` naming the
    quantity, the mesh axes and a fix. ``state`` (an abstract ``nnx.State``) adds a check of every parameter."""
    if plan is None:
        return
    mesh = dict(plan.mesh.shape)

    def need(what: str, value: int, logical: str, fix: str) -> None:
        target = plan.rules.get(logical)
        n = plan.size(target)
        if n > 1 and value % n:
            raise ConfigError(f"{what}={value} is not divisible by the {n} devices of mesh axes {target!r} (mesh "
                              f"{mesh}, rule {logical!r} -> {target!r}). Fix: {fix}")

    need("num_attention_heads", model_cfg.num_attention_heads, "heads",
         "choose mesh.tensor dividing the number of heads")
    need("n_routed_experts", model_cfg.n_routed_experts, "expert", "choose mesh.expert dividing the expert count")
    need("vocab_size", model_cfg.vocab_size, "vocab", "pad the vocabulary or choose another mesh.tensor")
    if batch_size is not None:
        per_micro = batch_size // max(micro_batches, 1)
        n = plan.batch_size_divisor
        if per_micro % n:
            raise ConfigError(f"batch: {per_micro} sequences per micro-batch (data.batch_size={batch_size} / "
                              f"micro_batches={micro_batches}) are not divisible by data x fsdp x expert = {n} "
                              f"devices (mesh {mesh}). Fix: make the per-micro-batch size a multiple of {n}")
    expert_rule = plan.rules.get("expert")
    if expert_rule is not None and not isinstance(expert_rule, str):
        raise ConfigError(f"rule 'expert' -> {expert_rule!r}: expert parallelism uses one mesh axis. Fix: map "
                          f"'expert' to a single mesh axis")
    if expert_rule is not None and expert_rule not in (plan.rules.get("batch") or ()):
        raise ConfigError(f"rule 'expert' -> {expert_rule!r} is not a batch axis {plan.rules.get('batch')!r}: "
                          f"tokens must be split over the expert-parallel axis. Fix: add it to the 'batch' rule")
    if state is not None:
        for path, (spec, shape, _) in flat_param_specs(state, plan.rules).items():
            for i, n in enumerate(shape):
                entry = spec[i] if i < len(spec) else None
                k = plan.size(entry)
                if k > 1 and n % k:
                    raise ConfigError(f"parameter {'/'.join(map(str, path))} {shape}: dimension {i} ({n}) is not "
                                      f"divisible by mesh axes {entry!r} ({k} devices). Fix: change the mesh or "
                                      f"the rules preset (mesh.rules)")
