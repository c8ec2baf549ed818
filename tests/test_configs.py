"""Configs: presets, hub config.json parsing, validation messages, parameter counts (eval_shape only)."""

import dataclasses
import json
import pathlib

import pytest

import dsjax
from dsjax import configs
from dsjax.configs import ConfigError, ModelConfig

HUB = pathlib.Path(__file__).parent / "data" / "hub_configs"


def test_presets_by_name():
    assert set(configs.names()) >= {"deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "tiny", "small"}
    for name in configs.names():
        cfg = configs.get(name)
        assert isinstance(cfg, ModelConfig)
        assert cfg == configs.get(name.replace("-", "_"))
    with pytest.raises(ConfigError, match="unknown.*deepseek-v3"):
        configs.get("deepseek-v4")


def test_configs_are_frozen_and_keyword_only():
    cfg = configs.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        ModelConfig(129280)  # type: ignore[misc]
    assert hash(cfg) == hash(configs.tiny())  # usable as a static jit argument


@pytest.mark.parametrize("name,preset", [("deepseek-v3", "deepseek-v3"), ("deepseek-r1", "deepseek-v3"),
                                         ("deepseek-v3-transformers5", "deepseek-v3"),
                                         ("deepseek-v2", "deepseek-v2"), ("deepseek-v2-lite", "deepseek-v2-lite")])
def test_from_hf_config_matches_preset(name, preset):
    cfg = ModelConfig.from_hf_config(HUB / f"{name}.json", dtype="bfloat16", param_dtype="bfloat16",
                                     scan_layers=True, remat_policy="dots_no_batch")
    ref = configs.get(preset)
    # The hub files differ from the presets only in the FP8 storage block and V3's V2-inherited aux_loss_alpha.
    diff = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(ref, f.name)}
    expected = {"quantization_config", "aux_loss_alpha"} if preset == "deepseek-v3" else set()
    assert diff == expected, {k: (getattr(cfg, k), getattr(ref, k)) for k in diff}
    if preset == "deepseek-v3":
        assert cfg.quantization_config.weight_block_size == (128, 128)


def test_from_hf_config_details():
    lite = ModelConfig.from_hf_config(HUB / "deepseek-v2-lite.json")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and lite.topk_method == "greedy"
    assert lite.rope_scaling.mscale == 0.707 and lite.num_nextn_predict_layers == 0
    v3 = ModelConfig.from_hf_config(str(HUB / "deepseek-v3.json"))
    assert v3.rope_scaling.factor == 40 and v3.rope_scaling.original_max_position_embeddings == 4096
    assert v3.dtype == "float32"  # the hub "torch_dtype" never overrides the compute dtype
    # folder form, transformers-5 'rope_type' inside rope_scaling, absent q_lora_rank on a V2 file
    d = json.loads((HUB / "deepseek-v2-lite.json").read_text())
    d["rope_scaling"]["rope_type"] = d["rope_scaling"].pop("type")
    d.pop("q_lora_rank")
    assert ModelConfig.from_hf_config(d).q_lora_rank is None
    # rope_parameters without scaling -> plain RoPE with its theta
    d2 = json.loads((HUB / "deepseek-v3.json").read_text())
    d2.pop("rope_scaling")
    d2["rope_parameters"] = {"rope_type": "default", "rope_theta": 50000.0}
    c2 = ModelConfig.from_hf_config(d2)
    assert c2.rope_scaling is None and c2.rope_theta == 50000.0
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_config(HUB / "nope")


def test_hf_config_round_trip(tmp_path):
    cfg = configs.tiny()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    back = ModelConfig.from_hf_config(tmp_path, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    assert back == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("changes,pattern", [
    (dict(qk_rope_head_dim=63), r"qk_rope_head_dim=63: must be even.*Fix"),
    (dict(num_experts_per_tok=17), r"num_experts_per_tok=17: exceeds n_routed_experts=16.*Fix"),
    (dict(n_group=3), r"n_group=3: does not divide n_routed_experts=16.*Fix"),
    (dict(topk_group=5), r"topk_group=5: exceeds n_group=4.*Fix"),
    (dict(topk_group=1, num_experts_per_tok=5), r"num_experts_per_tok=5: exceeds the 4 experts held by the "
                                                r"topk_group=1 kept groups.*Fix"),
    (dict(scoring_func="relu"), r"scoring_func='relu': is unknown.*Fix: use one of"),
    (dict(topk_method="aux"), r"topk_method='aux': is unknown"),
    (dict(scoring_func="softmax"), r"topk_method='noaux_tc'.*requires scoring_func='sigmoid'"),
    (dict(hidden_size=0), r"hidden_size=0: must be a positive integer.*Fix"),
    (dict(kv_lora_rank=-4), r"kv_lora_rank=-4: must be a positive integer"),
    (dict(q_lora_rank=0), r"q_lora_rank=0: must be a positive integer"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2: MLA.*must equal num_attention_heads=4"),
    (dict(n_group=16, topk_group=8), r"n_group=16: leaves fewer than 2 experts per group"),
    (dict(first_k_dense_replace=9), r"first_k_dense_replace=9: exceeds num_hidden_layers=3"),
    (dict(num_nextn_predict_layers=-1), r"num_nextn_predict_layers=-1: must be a non-negative integer"),
    (dict(dtype="float64"), r"dtype='float64': is not a supported dtype"),
    (dict(remat_policy="sometimes"), r"remat_policy='sometimes': is unknown"),
    (dict(moe_layer_freq=2), r"moe_layer_freq=2: is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu': is not supported"),
    (dict(moe_dense_decode_tokens=-1), r"moe_dense_decode_tokens=-1: must be an int >= 0.*Fix"),
])
def test_validation_messages(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        configs.tiny(**changes)


def test_rope_scaling_validation():
    with pytest.raises(ConfigError, match=r"rope_scaling.rope_type='linear'.*Fix"):
        configs.RopeScaling(rope_type="linear")
    d = json.loads((HUB / "deepseek-v3.json").read_text())
    d["rope_scaling"]["type"] = "longrope"
    with pytest.raises(ConfigError, match="longrope"):
        ModelConfig.from_hf_config(d)
    with pytest.raises(ConfigError, match="quant_method"):
        configs.QuantizationConfig(quant_method="int4")


def test_softmax_scale_matches_recipe():
    assert configs.deepseek_v3().softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert configs.deepseek_v2_lite().softmax_scale == pytest.approx(0.1147214, abs=1e-7)
    assert configs.small().softmax_scale == pytest.approx(96 ** -0.5)


# Published figures: V3 671B total / 37B active; V2 236B / 21B; V2-Lite 15.7B / 2.4B.
@pytest.mark.parametrize("name,total,active", [("deepseek-v3", 671e9, 37e9), ("deepseek-v2", 236e9, 21e9),
                                               ("deepseek-v2-lite", 15.7e9, 2.4e9)])
def test_count_params_matches_published(name, total, active):
    c = dsjax.count_params(configs.get(name))
    assert abs(c["total"] / total - 1) < 0.005, c
    assert abs(c["active"] / active - 1) < 0.03, c


def test_count_params_mtp_and_small():
    v3 = dsjax.count_params(configs.deepseek_v3())
    # the MTP module: one MoE decoder layer + eh_proj (2D x D) + 3 norms; its embedding and head are shared
    assert v3["mtp"] == pytest.approx(11.61e9, rel=1e-3)
    assert v3["total_with_mtp"] == v3["total"] + v3["mtp"]
    small = dsjax.count_params(configs.small())
    assert 1e9 <= small["total"] <= 3e9 and 0.15e9 <= small["active"] <= 0.5e9, small
    table = dsjax.param_table(configs.deepseek_v3())
    assert sum(table.values()) == v3["total_with_mtp"]


def test_decode_bytes_per_step_roofline():
    cfg = configs.small(param_dtype="bfloat16")
    counts = dsjax.count_params(cfg)
    one = dsjax.decode_bytes_per_step(cfg, 1, 0)
    # batch 1 reads exactly the active parameters (which exclude the embedding) plus one embedding row
    assert one["total"] == pytest.approx(2 * (counts["active"] + cfg.hidden_size), rel=1e-9)
    assert one["latent cache"] == 0
    # a large batch touches every routed expert; the whole model but the embedding is read once
    big = dsjax.decode_bytes_per_step(cfg, 4096, 0)
    assert big["routed experts"] == pytest.approx(2 * counts["routed_experts"], rel=1e-6)
    # balanced routing: 32 tokens x top-6 of 64 touch 64 * (1 - (58/64)**32) = 61.3 experts per layer
    b32 = dsjax.decode_bytes_per_step(cfg, 32, 0)
    assert b32["routed experts"] / big["routed experts"] == pytest.approx(1 - (58 / 64) ** 32)
    # the latent cache: B x context x L x (R + P) x 2 bytes; FP8 weights halve the weight bytes
    ctx = dsjax.decode_bytes_per_step(cfg, 2, 100)
    assert ctx["latent cache"] == 2 * 100 * dsjax.cache_bytes_per_token(cfg, "bfloat16")
    fp8 = dsjax.decode_bytes_per_step(cfg, 1, 0, weight_bytes=1)
    assert fp8["total"] == pytest.approx(one["total"] / 2)
    # an FP8 checkpoint's layout: projections and experts at 1 byte + 128x128 block scales, the rest bf16
    ck = dsjax.decode_bytes_per_step(cfg, 32, 0, fp8_weights=True)
    for name in ("attention (MLA)", "dense FFN (first-k layers)", "shared experts", "routed experts"):
        assert ck[name] == pytest.approx(b32[name] / 2 * (1 + 4 / 128**2))
    for name in ("embedding rows", "routers", "layer norms", "final norm", "output head"):
        assert ck[name] == b32[name]
    assert 0.5 < ck["total"] / b32["total"] < 0.6
    tied = dsjax.decode_bytes_per_step(configs.small(param_dtype="bfloat16", tie_word_embeddings=True), 1, 0)
    assert tied["output head"] == one["output head"]
    with pytest.raises(ValueError, match="batch=0"):
        dsjax.decode_bytes_per_step(cfg, 0, 10)
