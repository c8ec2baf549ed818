"""Logical-axis names and the one rules table that maps them to mesh axes.

Every parameter created in ``dsjax.model`` carries ``logical_axes`` metadata (one name per array axis). This
module is the only place that turns those names into ``PartitionSpec``s; layers never mention mesh axes.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with sharded parameters), ``expert`` (expert
parallel) and ``tensor`` (tensor parallel).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import PartitionSpec

__all__ = ["LOGICAL_AXES", "MESH_AXES", "DEFAULT_RULES", "logical_to_spec", "param_partition_specs"]

MESH_AXES = ("data", "fsdp", "expert", "tensor")

#: Every logical axis name a parameter may use, with what it indexes.
LOGICAL_AXES: dict[str, str] = {
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
}

#: Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "embed2": None,
    "heads": "tensor",
    "qk_head": None,
    "kv_head": None,
    "v_head": None,
    "q_lora": None,
    "kv_lora": None,
    "kv_lora_rope": None,
    "mlp": "tensor",
    "moe_mlp": "tensor",
    "expert": "expert",
    "expert_gate": None,
    "norm": None,
    "layers": None,
}


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


def param_partition_specs(state: nnx.State, rules: Mapping[str, Any] = DEFAULT_RULES) -> Any:
    """A tree of ``PartitionSpec`` matching ``state`` (an ``nnx.State`` of variables with ``logical_axes``)."""

    def spec(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        if axes is None:
            return PartitionSpec()
        return logical_to_spec(tuple(axes), rules)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
