"""Generation on a device mesh (8 fake CPU devices): sharded greedy decoding equals one device, the layouts are the
ones documented (state by the rules table, rows of inputs, outputs and the latent cache over the batch axes), uneven
batches are padded or refused clearly, speculative decoding under a plan equals plain greedy, and the Pallas decode
kernels are either run per device (MLA attention and the routers' selection, inside ``shard_map``) or left for XLA
(FP8 weight-only GEMM).

Model: ``tiny`` with 2 layers (1 dense + 1 MoE, 16 experts) in float32, ``qk_rope_head_dim=16`` so that the MLA
decode kernel takes its shapes. Tolerance on log-probs: 1e-5 absolute (float32; only summation orders differ: the
expert-parallel combine and the tensor-split partial sums; measured <= 5e-7).
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dsjax
from dsjax.configs import ConfigError
from dsjax.inference import OUTPUT_AXES, SamplingConfig, jit_generate, pad_prompts, speculative_generate
from dsjax.model import LatentCache, cache_shardings
from dsjax.sharding import LOGICAL_AXES, MESH_AXES, MeshConfig, Plan, make_plan, make_rules, shard_params, use_plan

BATCH = ("data", "fsdp", "expert")
PROMPTS = [[1, 5, 9, 22, 40], [1, 7, 3], [1] + list(range(30, 40)), [1, 9], [1, 2, 3, 4], [1, 300], [1, 8, 8],
           [1, 100, 200, 300, 400, 500]]
SAMPLING = SamplingConfig(max_new_tokens=4, temperature=0.0, use_eos=False, length_bucket=16)
TOL = 1e-5


def _cfg(**kw):
    return dsjax.configs.tiny(num_hidden_layers=2, qk_rope_head_dim=16, **kw)


@pytest.fixture(scope="module")
def model():
    return dsjax.Transformer(_cfg(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def reference(model):
    """Single-device greedy generation of PROMPTS."""
    return dsjax.generate(model, PROMPTS, sampling=SAMPLING)


def _plan(sizes, n_devices=8):
    return make_plan(MeshConfig(**dict(zip(MESH_AXES, sizes))), jax.devices()[:n_devices])


def _same(out, ref, rows=slice(None)):
    np.testing.assert_array_equal(out.tokens, np.asarray(ref.tokens)[rows])
    np.testing.assert_array_equal(out.lengths, np.asarray(ref.lengths)[rows])
    np.testing.assert_allclose(out.logprobs, np.asarray(ref.logprobs)[rows], atol=TOL)


def _inputs(plan, state):
    tokens, lengths = pad_prompts(PROMPTS, SAMPLING.length_bucket)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(0), jnp.arange(len(PROMPTS)))
    from dsjax.inference.sharded import put_rows

    return (shard_params(state, plan), *put_rows(plan, tokens, lengths, keys))


# data x expert on 4 devices; fsdp x expert x tensor on 8 (weights split along D, heads, vocab and experts) with
# scanned layers (stacked weights, unstacked inside the generator before the decode loop)
@pytest.mark.parametrize("sizes,n_devices,scan", [((2, 1, 2, 1), 4, False), ((1, 2, 2, 2), 8, True)])
def test_sharded_greedy_equals_one_device_with_the_documented_layouts(model, reference, sizes, n_devices, scan):
    if scan:
        model = dsjax.Transformer(_cfg(scan_layers=True), rngs=nnx.Rngs(0))
        reference = dsjax.generate(model, PROMPTS, sampling=SAMPLING)
    plan = _plan(sizes, n_devices)
    graphdef, state = nnx.split(model)
    gen = jit_generate(plan, graphdef, state, sampling=SAMPLING)
    args = _inputs(plan, state)
    compiled = gen.lower(*args).compile()
    out = compiled(*args)
    _same(out, reference)
    assert jit_generate(plan, graphdef, state, sampling=SAMPLING) is gen        # cached: no second jit object
    # outputs: rows over the batch axes
    assert out.tokens.sharding.spec == P(BATCH, None) and out.lengths.sharding.spec == P(BATCH)
    assert compiled.output_shardings == jax.tree.map(plan.sharding, OUTPUT_AXES,
                                                     is_leaf=lambda x: isinstance(x, tuple))
    # inputs: the state by the rules table (e.g. routed experts over 'expert'), the batch by rows
    state_in, prompts_in, lengths_in, keys_in = compiled.input_shardings[0]
    assert prompts_in.spec == P(BATCH, None) and lengths_in.spec == P(BATCH) and keys_in.spec == P(BATCH)
    flat = dict(nnx.to_flat_state(state_in))
    experts = flat[("moe_layers", "mlp", "experts", "gate_proj") if scan else ("layers", 1, "mlp", "experts",
                                                                               "gate_proj")]
    assert experts.spec[int(scan)] == "expert", experts.spec                     # [(L,) E, D, F]
    # the latent cache: each device holds its rows only ([L, B/devices, T, R]), never the whole batch's
    rows = 8 // plan.batch_size_divisor
    text = compiled.as_text()
    assert f"f32[2,{rows},64,32]" in text and "f32[2,8,64,32]" not in text
    # MoE blocks ran expert-parallel (all-to-all over 'expert')
    assert "all-to-all" in text


def test_cache_logical_axes_and_shardings():
    plan = _plan((2, 1, 2, 2))
    axes = LatentCache.logical_axes()
    assert axes.c_kv == ("cache_layers", "batch", "cache_seq", "cache_kv_lora")
    assert axes.k_rot == ("cache_layers", "batch", "cache_seq", "cache_rope") and axes.segment_ids == ("batch",
                                                                                                       "cache_seq")
    for name in ("cache_layers", "cache_seq", "cache_kv_lora", "cache_rope"):
        assert name in LOGICAL_AXES
    sh = cache_shardings(plan)
    assert sh.c_kv.spec == P(None, BATCH, None, None) and sh.k_rot.spec == P(None, BATCH, None, None)
    assert sh.segment_ids.spec == P(BATCH, None)
    assert hash(plan) == hash(_plan((2, 1, 2, 2))) and plan == _plan((2, 1, 2, 2))   # plans key caches


def test_uneven_batch_is_padded_by_generate_and_refused_by_the_jitted_generator(model, reference):
    plan = _plan((2, 1, 2, 1), 4)
    out = dsjax.generate(model, PROMPTS[:6], sampling=SAMPLING, plan=plan)     # padded to 8 rows, 2 dropped
    _same(out, reference, slice(0, 6))
    assert out.tokens.shape == (6, SAMPLING.max_new_tokens)
    graphdef, state = nnx.split(model)
    tokens, lengths = pad_prompts(PROMPTS[:6], SAMPLING.length_bucket)
    keys = jax.random.split(jax.random.key(0), 6)
    with pytest.raises(ConfigError, match=r"batch of 6 rows is not divisible by the 4 devices.*Fix: pass a multiple "
                                          r"of 4 rows"):
        jit_generate(plan, graphdef, state, sampling=SAMPLING)(state, tokens, lengths, keys)


def test_speculative_under_a_plan_equals_plain_greedy(model, reference):
    plan = _plan((2, 1, 2, 1), 4)
    spec = speculative_generate(model, PROMPTS, sampling=SAMPLING, draft_tokens=2, plan=plan)
    _same(spec.output, reference)
    assert spec.output.tokens.sharding.spec == P(BATCH, None) and spec.accepted_by_depth.shape == (8, 2)
    assert spec.main_forwards.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.sum(spec.accepted_by_depth, axis=1), spec.accepted)


def test_decode_kernel_runs_per_device_under_a_plan(model, reference, monkeypatch):
    """The absorbed attention routed through the (interpreted) Pallas kernel under a data x expert x tensor plan:
    the kernel sees each device's rows and heads (B/4, N/2) and generation still equals one device."""
    from dsjax.model import mla as mla_mod
    from pallas_kernels.mla_decode import _pallas, kernel_shapes_ok

    calls = []

    def through_kernel(q_lat, q_rot, c_kv, k_rot, mask, *, scale, implementation, layer=None):
        assert layer is not None and c_kv.ndim == 4          # each device's rows of the stacked cache, in place
        assert kernel_shapes_ok(q_lat.shape, q_rot.shape, c_kv.shape[1:])
        calls.append((q_lat.shape, c_kv.shape[1:]))
        return _pallas(q_lat, q_rot, c_kv, k_rot, mask, scale=scale, interpret=True, layer=layer)

    monkeypatch.setattr(mla_mod, "mla_decode_attention", through_kernel)
    # the same weights under another config value: the generator traces again, into the patched call
    kernel_model = dsjax.Transformer(_cfg(mla_decode_impl="pallas"), rngs=nnx.Rngs(0))
    out = dsjax.generate(kernel_model, PROMPTS, sampling=SAMPLING, plan=_plan((2, 1, 2, 2)))
    assert calls and all(q[0] == 2 and q[2] == 2 and c[0] == 2 for q, c in calls), calls
    _same(out, reference)


def test_routing_kernel_runs_per_device_under_a_plan(model, reference, monkeypatch):
    """The routers' expert selection through the (interpreted) Pallas kernel under a data x expert plan: each device
    selects for its own tokens (a decode step: 2 of the 8 rows, 2 tokens) and generation equals one device."""
    from dsjax.model import moe as moe_mod
    from pallas_kernels import moe_topk_weights

    calls = []

    def through_kernel(choice, scores, k, *, implementation, call_wrapper, **kw):
        assert implementation == "pallas"                    # inside the shard_map: each device's tokens
        return moe_topk_weights(choice, scores, k, implementation=implementation, interpret=True,
                                call_wrapper=lambda f: call_wrapper(lambda c, s: calls.append(c.shape) or f(c, s)),
                                **kw)

    monkeypatch.setattr(moe_mod, "moe_topk_weights", through_kernel)
    kernel_model = dsjax.Transformer(_cfg(routing_impl="pallas"), rngs=nnx.Rngs(0))
    out = dsjax.generate(kernel_model, PROMPTS, sampling=SAMPLING, plan=_plan((2, 1, 2, 1), 4))
    assert (2, 16) in calls and all(t % 2 == 0 and t <= 2 * SAMPLING.length_bucket for t, _ in calls), calls
    _same(out, reference)


def test_sharded_decode_lowers_the_kernel_per_device_for_cuda(monkeypatch):
    """Without a GPU: under a plan on an abstract 8-GPU mesh, ``mla_decode_impl="auto"`` picks the Triton kernel for
    the per-device shapes inside the ``shard_map`` (grid over the 2 local rows, not 8)."""
    from jax._src.mesh import AbstractDevice

    from dsjax.model import MLA

    mesh = jax.sharding.AbstractMesh((2, 1, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                                     abstract_device=AbstractDevice(device_kind="NVIDIA H100 80GB HBM3",
                                                                    num_cores=132, platform="gpu"))
    plan = Plan(mesh=mesh, rules=make_rules("default"), config=MeshConfig(data=2, expert=2, tensor=2))
    cfg = _cfg(kv_lora_rank=32, dtype="bfloat16")
    graphdef, state = nnx.split(MLA(cfg, rngs=nnx.Rngs(0)))
    b, n, t = 8, cfg.num_attention_heads, 64
    bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731

    def attend(state, *args, layer=None):
        with use_plan(plan):
            return nnx.merge(graphdef, state).attend_absorbed(*args, layer=layer)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")           # what "auto" asks
    q = (bf(b, 1, n, cfg.qk_nope_head_dim), bf(b, 1, n, 16))
    mask = jax.ShapeDtypeStruct((b, 1, t), jnp.bool_)
    # one layer's cache, and a decode step's stacked 12-layer cache read at layer 3 (its rows split, layers not)
    for args, kw in [((*q, bf(b, t, 32), bf(b, t, 16), mask), {}),
                     ((*q, bf(12, b, t, 32), bf(12, b, t, 16), mask), {"layer": 3})]:
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(functools.partial(attend, **kw)).trace(state, *args).lower(
                lowering_platforms=("cuda",)).as_text()
        call = next(line for line in text.splitlines() if "xla.gpu.triton" in line)
        assert "grid_x = 2 : i32" in call, call                            # 8 rows / (data x fsdp x expert = 4)
        assert "sdy.manual_computation" in text                            # inside the shard_map


def test_fp8_weight_kernel_is_left_to_xla_under_a_plan(monkeypatch):
    from dsjax.model import layers

    monkeypatch.setattr(layers, "fp8_weight_kernel_supported", lambda *a: True)   # as on an H100
    shapes = ((1, 8, 256), (1, 256, 256), (128, 128))
    assert layers.use_fp8_weight_kernel(*shapes)
    with use_plan(_plan((2, 1, 2, 2))):
        assert not layers.use_fp8_weight_kernel(*shapes)
