"""Logical axes: every parameter is named, every name has a rule, and specs come out of the one rules table."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from dsjax import configs
from dsjax.model import Transformer
from dsjax.sharding import DEFAULT_RULES, LOGICAL_AXES, logical_to_spec, param_partition_specs


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_known_logical_axes(scan):
    cfg = configs.deepseek_v3(scan_layers=scan) if scan else configs.tiny()
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None, path
        assert len(axes) == len(var.get_value().shape), (path, axes)
        assert all(a is None or a in LOGICAL_AXES for a in axes), (path, axes)
    assert set(DEFAULT_RULES) == set(LOGICAL_AXES)
    specs = param_partition_specs(nnx.state(model))
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert leaves and all(isinstance(s, PartitionSpec) for s in leaves)
    if scan:
        expert = model.moe_layers.mlp.experts.gate_proj
        assert logical_to_spec(expert.get_metadata()["logical_axes"]) == PartitionSpec(None, "expert", "fsdp",
                                                                                        "tensor")


def test_rules_reject_reused_mesh_axes():
    with pytest.raises(ValueError, match="mesh axis 'tensor' is used twice"):
        logical_to_spec(("heads", "mlp"))
    with pytest.raises(ValueError, match="has no rule"):
        logical_to_spec(("nonsense",))
