"""Per-device memory of a training run on paper: parameters, gradients, optimizer state and activations.

    python -m experiments.plan --config=deepseek-v3 --devices=64,256,2048
    python -m experiments.plan --config=deepseek-v3 --devices=256 --mesh=data=2,fsdp=2,expert=64,tensor=1
    python -m experiments.plan --config=small --devices=1,2,4 --batch_per_device=8 --seq_len=2048

Nothing is allocated and no devices are needed: shapes come from ``jax.eval_shape`` (model, AdamW state) and the
per-device split from the rules table of ``dsjax.sharding`` (``--rules``) on a mesh of the given sizes.

* params / grads: every parameter's shard (``ceil(dim / mesh axes)`` per dimension), in ``param_dtype``;
* optimizer: AdamW's two moments (``--moment_dtype``), split like their parameters;
* activations: the residuals autodiff keeps for the backward pass of one micro-batch (``--batch_per_device``
  sequences of ``--seq_len`` tokens on each device) under the preset's remat policy, found with
  ``saved_residuals`` on a per-device model (heads and MLP/expert widths divided by ``tensor``). Expert parallelism
  moves tokens but keeps about ``T*K`` routed rows per device (balanced routing); the dispatch buffers
  (``capacity_factor``) and transient memory inside a layer's recompute come on top, so treat the total as a lower
  bound and keep ~20% headroom.

Default mesh for N devices (no ``--mesh``): ``expert = min(N, 64, n_routed_experts)``, ``fsdp`` = the rest
(EP 64 x FSDP, the layout that needs the least memory per device); ``--mesh`` entries may use -1 for "the rest".
"""

from __future__ import annotations

import dataclasses
import math

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "deepseek-v3", "Model preset (dsjax.configs.names()) or training preset (tiny, small).")
flags.DEFINE_list("devices", ["64", "256", "2048"], "Device counts to plan for.")
flags.DEFINE_string("mesh", None, "Mesh as data=..,fsdp=..,expert=..,tensor=.. (one entry may be -1).")
flags.DEFINE_string("rules", "default", "Rules preset (dsjax.sharding.RULE_PRESETS, '+' combinations).")
flags.DEFINE_integer("batch_per_device", 1, "Sequences per device per micro-batch (for activations).")
flags.DEFINE_integer("seq_len", 4096, "Sequence length.")
flags.DEFINE_string("param_dtype", None, "Parameter (master weight) dtype; default: the preset's.")
flags.DEFINE_string("moment_dtype", "float32", "AdamW moment dtype (DeepSeek-V3 used bfloat16).")
flags.DEFINE_string("remat_policy", None, "Remat policy for the activation estimate; default: the preset's.")
flags.DEFINE_bool("mtp", True, "Train the MTP module(s) (activations of the MTP block).")

GIB = 2 ** 30


def _mesh_sizes(n: int, e: int) -> dict[str, int]:
    from dsjax.sharding import MESH_AXES, MeshConfig

    if FLAGS.mesh:
        sizes = {k: 1 for k in MESH_AXES}
        for part in FLAGS.mesh.split(","):
            k, v = part.split("=")
            if k.strip() not in sizes:
                raise app.UsageError(f"--mesh: unknown axis {k!r}; use {MESH_AXES}")
            sizes[k.strip()] = int(v)
        cfg = MeshConfig(**sizes).resolve(n)
    else:
        ep = math.gcd(n, min(64, e))
        cfg = MeshConfig(expert=ep, fsdp=n // ep)
    return dict(zip(MESH_AXES, cfg.sizes))


def _train_config(name: str):
    from dsjax import configs
    from dsjax.train import config as tc

    if name in tc.names():
        cfg = tc.get(name)
    else:
        cfg = tc.TrainConfig(model=configs.get(name))
    model = cfg.model.replace(scan_layers=True)  # same parameters; one traced layer per stack (fast eval_shape)
    if FLAGS.param_dtype:
        model = model.replace(param_dtype=FLAGS.param_dtype)
    if FLAGS.remat_policy:
        model = model.replace(remat_policy=FLAGS.remat_policy)
    if not FLAGS.mtp:
        model = model.replace(num_nextn_predict_layers=0)
    optim = dataclasses.replace(cfg.optim, moment_dtype=FLAGS.moment_dtype)
    data = dataclasses.replace(cfg.data, seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_per_device)
    return dataclasses.replace(cfg, model=model, optim=optim, data=data)


def _bytes(tree, specs, sizes) -> int:
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec

    from dsjax.sharding import shard_shape

    leaves = jax.tree.leaves(tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    return sum(math.prod(shard_shape(x.shape, s, sizes)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, spec_leaves))


def _activation_bytes(cfg, tensor: int) -> int:
    """Residuals saved for the backward pass of one micro-batch on one device."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsjax.model import Transformer
    from dsjax.train.losses import chunked_cross_entropy, shifted_targets
    from dsjax.train.step import split_model

    try:
        from jax._src.ad_checkpoint import saved_residuals  # public as print_saved_residuals only
    except ImportError as e:  # pragma: no cover - a future JAX moved it
        raise RuntimeError("this JAX has no saved_residuals; activations cannot be estimated") from e

    m = cfg.model
    if tensor > 1:  # per-device widths under tensor parallelism (Megatron split of heads and FFNs)
        heads = max(1, m.num_attention_heads // tensor)
        m = m.replace(num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=max(1, m.intermediate_size // tensor),
                      moe_intermediate_size=max(1, m.moe_intermediate_size // tensor))
    graphdef, params, rest = split_model(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))
    b, t = cfg.data.batch_size, cfg.data.seq_len
    depth = m.num_nextn_predict_layers

    def loss(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        seg = jnp.ones_like(tokens)
        out = model(tokens, seg, return_mtp=depth > 0, return_hidden=True, compute_logits=False)
        tg, w = shifted_targets(tokens, seg, seg, 1)
        total = chunked_cross_entropy(out.hidden, model.logits_f32, tg, w, cfg.loss.ce_chunk_tokens)[0]
        for d in range(depth):
            tg, w = shifted_targets(tokens, seg, seg, d + 2)
            total = total + chunked_cross_entropy(out.mtp_hidden[d], model.logits_f32, tg, w,
                                                  cfg.loss.ce_chunk_tokens)[0]
        return total

    res = saved_residuals(loss, params, rest, jax.ShapeDtypeStruct((b, t), jnp.int32))
    return sum(math.prod(a.shape) * a.dtype.itemsize for a, src in res if not src.startswith("from the argument"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dsjax.configs import ConfigError
    from dsjax.params import count_params
    from dsjax.sharding import make_rules
    from dsjax.train.parallel import state_specs
    from dsjax.train.step import abstract_state

    cfg = _train_config(FLAGS.config)
    m = cfg.model
    rules = make_rules(FLAGS.rules)
    abstract = abstract_state(cfg)
    specs = state_specs(cfg, rules, abstract)
    counts = count_params(m)
    print(f"{FLAGS.config}: {counts['total'] / 1e9:.2f}B parameters (+MTP {counts['mtp'] / 1e9:.2f}B), "
          f"params {m.param_dtype}, compute {m.dtype}, AdamW moments {FLAGS.moment_dtype}, remat {m.remat_policy!r}, "
          f"rules {FLAGS.rules!r}; activations for {FLAGS.batch_per_device} x {FLAGS.seq_len} tokens per device",
          flush=True)
    act_cache: dict[int, int] = {}
    rows = []
    for n in [int(x) for x in FLAGS.devices]:
        try:
            sizes = _mesh_sizes(n, m.n_routed_experts)
        except ConfigError as e:
            raise app.UsageError(str(e)) from None
        for logical, what in (("expert", "n_routed_experts"), ("heads", "num_attention_heads")):
            target = rules[logical]
            k = math.prod(sizes[a] for a in ((target,) if isinstance(target, str) else target or ()))
            value = m.n_routed_experts if logical == "expert" else m.num_attention_heads
            if value % k:
                raise app.UsageError(f"{what}={value} is not divisible by mesh axes {target!r} ({k} devices) for "
                                     f"{n} devices (mesh {sizes}). Fix: pass --mesh")
        p = _bytes(abstract.params, specs.params, sizes) + _bytes(abstract.rest, specs.rest, sizes)
        o = _bytes(abstract.opt_state, specs.opt_state, sizes)
        g = _bytes(abstract.params, specs.params, sizes)
        if sizes["tensor"] not in act_cache:
            act_cache[sizes["tensor"]] = _activation_bytes(cfg, sizes["tensor"])
        a = act_cache[sizes["tensor"]]
        rows.append((n, sizes, p, g, o, a))
    unit, div = ("GiB", GIB) if max(r[2] + r[3] + r[4] + r[5] for r in rows) >= GIB else ("MiB", 2 ** 20)
    lines = [f"| devices | data x fsdp x expert x tensor | params {unit} | grads {unit} | optimizer {unit} | "
             f"activations {unit} | total {unit} |", "|---|---|---|---|---|---|---|"]
    for n, s, p, g, o, a in rows:
        mesh = " x ".join(str(s[k]) for k in ("data", "fsdp", "expert", "tensor"))
        lines.append(f"| {n:,} | {mesh} | {p / div:,.2f} | {g / div:,.2f} | {o / div:,.2f} | {a / div:,.2f} | "
                     f"{(p + g + o + a) / div:,.2f} |")
    print("\n".join(lines))
    print("(optimizer: AdamW mu in --moment_dtype, nu in the parameter dtype, as optax stores them; activations: "
          "residuals saved for the backward pass, a lower bound -- add dispatch buffers and headroom)")


if __name__ == "__main__":
    app.run(main)
