"""Hub checkpoint I/O without torch: round trips, sharding, FP8 (dequantise or keep), clear errors."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import dsjax
from dsjax import configs
from dsjax.hf import CheckpointError, checkpoint_files
from dsjax.hf.io import _enable_numpy_ml_dtypes
from pallas_kernels import weight_dequant, weight_quant


def _read_all(folder):
    _enable_numpy_ml_dtypes()
    from safetensors.numpy import load_file

    out = {}
    for f in checkpoint_files(folder):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = configs.tiny()
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
    folder = tmp_path_factory.mktemp("tiny")
    files = dsjax.save_hf(model, None, folder, max_shard_bytes=400_000)
    return cfg, model, folder, files


def test_save_writes_hub_layout(saved):
    cfg, _, folder, files = saved
    assert len(files) > 1 and (folder / "model.safetensors.index.json").exists()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = _read_all(folder)
    assert set(index["weight_map"]) == set(tensors)
    L = cfg.num_hidden_layers
    for name, shape in {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "lm_head.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
        "model.layers.1.self_attn.q_b_proj.weight": (cfg.num_attention_heads * cfg.qk_head_dim, cfg.q_lora_rank),
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight": (cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                                               cfg.hidden_size),
        "model.layers.1.self_attn.o_proj.weight": (cfg.hidden_size, cfg.num_attention_heads * cfg.v_head_dim),
        "model.layers.1.mlp.gate.weight": (cfg.n_routed_experts, cfg.hidden_size),
        "model.layers.1.mlp.gate.e_score_correction_bias": (cfg.n_routed_experts,),
        f"model.layers.2.mlp.experts.{cfg.n_routed_experts - 1}.down_proj.weight":
            (cfg.hidden_size, cfg.moe_intermediate_size),
        "model.layers.2.mlp.shared_experts.up_proj.weight": (cfg.moe_intermediate_size, cfg.hidden_size),
        f"model.layers.{L}.eh_proj.weight": (cfg.hidden_size, 2 * cfg.hidden_size),
        f"model.layers.{L}.shared_head.norm.weight": (cfg.hidden_size,),
        f"model.layers.{L}.shared_head.head.weight": (cfg.vocab_size, cfg.hidden_size),
        f"model.layers.{L}.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        f"model.layers.{L}.mlp.experts.0.gate_proj.weight": (cfg.moe_intermediate_size, cfg.hidden_size),
    }.items():
        assert tensors[name].shape == shape, name
    np.testing.assert_array_equal(tensors[f"model.layers.{L}.shared_head.head.weight"], tensors["lm_head.weight"])
    hub_cfg = json.loads((folder / "config.json").read_text())
    assert hub_cfg["num_nextn_predict_layers"] == 1 and hub_cfg["rope_scaling"]["type"] == "yarn"


def test_round_trip_is_lossless(saved, tmp_path):
    cfg, model, folder, _ = saved
    loaded = dsjax.load_hf(folder, dtype=jnp.float32)
    for (p, a), (q, b) in zip(jax.tree_util.tree_flatten_with_path(nnx.state(model))[0],
                              jax.tree_util.tree_flatten_with_path(nnx.state(loaded))[0]):
        assert p == q
        np.testing.assert_array_equal(a, b)
    dsjax.save_hf(loaded, None, tmp_path)
    a, b = _read_all(folder), _read_all(tmp_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_bf16_load_and_mtp_drop(saved):
    cfg, model, folder, _ = saved
    m = dsjax.load_hf(folder)  # default: bfloat16 parameters and compute
    assert m.cfg.param_dtype == "bfloat16" and m.embed_tokens.embedding.get_value().dtype == jnp.bfloat16
    assert m.layers[1].mlp.gate.weight.get_value().dtype == jnp.float32  # router stays float32
    assert m(jnp.ones((1, 4), jnp.int32)).logits.dtype == jnp.bfloat16
    no_mtp = dsjax.load_hf(folder, dtype=jnp.float32, mtp=False)
    assert len(no_mtp.mtp) == 0 and no_mtp.cfg.num_nextn_predict_layers == 0


def _copy_folder(src, dst, drop=(), rename=None, reshape=None, extra=None):
    _enable_numpy_ml_dtypes()
    from safetensors.numpy import save_file

    tensors = _read_all(src)
    for k in drop:
        tensors.pop(k)
    for k, new in (rename or {}).items():
        tensors[new] = tensors.pop(k)
    for k, shape in (reshape or {}).items():
        tensors[k] = np.zeros(shape, tensors[k].dtype)
    tensors.update(extra or {})
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_errors_name_the_tensors(saved, tmp_path):
    cfg, _, folder, _ = saved
    bad = _copy_folder(folder, tmp_path / "bad", drop=["model.layers.1.mlp.experts.3.up_proj.weight"],
                       rename={"model.norm.weight": "model.final_norm.weight"},
                       reshape={"model.layers.2.self_attn.kv_b_proj.weight": (7, 5)})
    with pytest.raises(CheckpointError) as e:
        dsjax.load_hf(bad)
    msg = str(e.value)
    assert "missing tensors (2)" in msg and "model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "model.norm.weight" in msg and "unexpected tensors (1)" in msg and "model.final_norm.weight" in msg
    assert "model.layers.2.self_attn.kv_b_proj.weight: (7, 5) vs (128, 32)" in msg
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        dsjax.load_hf(_empty_with_config(folder, tmp_path / "empty"))


def _empty_with_config(src, dst):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_config_mismatch_is_reported(saved, tmp_path):
    _, _, folder, _ = saved
    dst = _copy_folder(folder, tmp_path / "cfg")
    hub = json.loads((dst / "config.json").read_text())
    hub["n_routed_experts"] = 8
    hub["num_experts_per_tok"] = 2
    (dst / "config.json").write_text(json.dumps(hub))
    with pytest.raises(CheckpointError, match=r"(?s)unexpected tensors \(72\).*experts\.8\..*gate.weight: \(16, 64\) vs \(8, 64\)"):
        dsjax.load_hf(dst)


# ----------------------------------------------------------------------------------------------- FP8
def test_weight_quant_dequant_partial_blocks():
    w = jax.random.normal(jax.random.key(0), (200, 300)) * 0.05
    q, s = weight_quant(w)
    assert q.dtype == jnp.float8_e4m3fn and s.shape == (2, 3)
    back = weight_dequant(q, s, out_dtype=jnp.float32)
    rel = jnp.abs(back - w) / (jnp.abs(w) + 1e-3)
    assert float(jnp.median(rel)) < 0.04  # e4m3 keeps 3 mantissa bits
    # every block's max maps to 448 exactly
    blk = np.asarray(jnp.abs(q.astype(jnp.float32))).max()
    assert blk == 448.0
    with pytest.raises(ValueError, match="expected \\(2, 3\\)"):
        weight_dequant(q, s[:, :2])


def test_fp8_checkpoint_dequantised_or_kept(tmp_path):
    cfg = configs.tiny(hidden_size=160, moe_intermediate_size=144, q_lora_rank=136)  # partial 128-blocks
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(1))
    dsjax.save_hf(model, None, tmp_path / "bf")
    fp8 = dsjax.load_hf(tmp_path / "bf", dtype=jnp.float32, keep_fp8=True)  # quantised on load
    dsjax.save_hf(fp8, None, tmp_path / "fp8", max_shard_bytes=200_000)
    hub = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert hub["quantization_config"]["weight_block_size"] == [128, 128]
    t = _read_all(tmp_path / "fp8")
    w = t["model.layers.1.mlp.experts.5.gate_proj.weight"]
    s = t["model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv"]
    assert w.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32 and s.shape == (2, 2)
    assert t["model.layers.1.mlp.gate.weight"].dtype == np.float32  # router not quantised
    deq = dsjax.load_hf(tmp_path / "fp8", dtype=jnp.float32)
    kept = dsjax.load_hf(tmp_path / "fp8", dtype=jnp.float32, keep_fp8=True)
    expected = np.asarray(w, np.float32) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:144, :160]
    np.testing.assert_array_equal(np.asarray(deq.layers[1].mlp.experts.gate_proj.get_value()[5]).T, expected)
    # kept in FP8: the hub tensors as they are ([out, in], weight_scale_inv), reshaped to (*O, *I) for Linear
    experts = kept.layers[1].mlp.experts
    assert experts.gate_proj.get_value().shape == (cfg.n_routed_experts, 144, 160)
    np.testing.assert_array_equal(np.asarray(experts.gate_proj.get_value()[5]).view(np.uint8), w.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(experts.gate_proj_scale_inv.get_value()[5]), s)
    q_b = kept.layers[1].self_attn.q_b_proj
    hub_q_b = t["model.layers.1.self_attn.q_b_proj.weight"]
    assert q_b.kernel.get_value().shape == (cfg.num_attention_heads, cfg.qk_head_dim, 136)
    np.testing.assert_array_equal(np.asarray(q_b.kernel.get_value()).reshape(hub_q_b.shape).view(np.uint8),
                                  hub_q_b.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q_b.scale_inv.get_value()),
                                  t["model.layers.1.self_attn.q_b_proj.weight_scale_inv"])
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    np.testing.assert_allclose(deq(ids).logits, kept(ids).logits, atol=1e-5)
    np.testing.assert_allclose(deq(ids).logits, fp8(ids).logits, atol=1e-5)


def test_fp8_mtp_eh_proj_in_a_checkpoint_is_dequantised_on_load(tmp_path):
    """DeepSeek-V3's hub checkpoint may store the MTP layer's ``eh_proj`` in FP8 with a ``weight_scale_inv`` (public
    loaders map that companion). dsjax keeps ``eh_proj`` in the compute dtype, so such a tensor is dequantised on
    load, with or without ``keep_fp8``, and the model computes with the dequantised weight."""
    cfg = configs.tiny(hidden_size=160)                       # eh_proj [160, 320]: partial 128-blocks
    model = dsjax.Transformer(cfg, rngs=nnx.Rngs(3))
    dsjax.save_hf(model, None, tmp_path / "bf")
    name = f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight"
    w = _read_all(tmp_path / "bf")[name].astype(np.float32)
    q, s = (np.asarray(a) for a in weight_quant(jnp.asarray(w)))
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.dtype == np.float32 and s.shape == (2, 3)
    folder = _copy_folder(tmp_path / "bf", tmp_path / "fp8", extra={name: q, name + "_scale_inv": s})
    expected = np.asarray(weight_dequant(jnp.asarray(q), jnp.asarray(s), out_dtype=jnp.float32))
    assert np.abs(expected - w).max() > 0                     # the quantisation changed the weight
    for keep in (False, True):
        loaded = dsjax.load_hf(folder, dtype=jnp.float32, keep_fp8=keep)
        got = np.asarray(loaded.mtp[0].eh_proj.kernel.get_value()).T        # kernel is the transposed [in, out]
        np.testing.assert_array_equal(got, expected)
