"""Parity with HF transformers 5.24 on hub-layout checkpoints (goldens made by tools/make_goldens.py).

Tolerances: logits (and MTP logits) in float32 within 1e-4 of the largest |logit|; routed experts identical;
routing weights within 1e-5. The suite never imports torch: the goldens record what HF computed.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsjax

GOLDENS = pathlib.Path(__file__).parent / "goldens"
CASES = ["v3", "v2lite", "v2", "fp8"]


def _check(case: str, model, g, mla_impl="naive"):
    ids = jnp.asarray(g["input_ids"])
    out = model(ids, return_mtp="mtp_logits" in g, mla_impl=mla_impl)
    ref = g["logits"]
    scale = np.abs(ref).max()
    err = np.abs(np.asarray(out.logits) - ref).max() / scale
    assert err < 1e-4, f"{case}: logits differ by {err:.2e} of the largest logit"
    l_moe, bt, k = g["topk_indices"].shape
    ours = np.sort(np.asarray(out.moe["indices"]).reshape(l_moe, bt, k), axis=-1)
    np.testing.assert_array_equal(ours, g["topk_indices"], err_msg=f"{case}: chosen experts differ")
    if "mtp_logits" in g:
        err = np.abs(np.asarray(out.mtp_logits[0]) - g["mtp_logits"]).max() / np.abs(g["mtp_logits"]).max()
        assert err < 1e-4, f"{case}: MTP logits differ by {err:.2e}"
        mtp_idx = np.sort(np.asarray(out.mtp_moe["indices"]).reshape(g["mtp_topk_indices"].shape), axis=-1)
        np.testing.assert_array_equal(mtp_idx, g["mtp_topk_indices"])
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_and_experts_match_hf(case):
    folder = GOLDENS / case
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["transformers"].startswith("5.24"), meta["transformers"]
    g = dict(np.load(folder / "golden.npz"))
    model = dsjax.load_hf(folder, dtype=jnp.float32)
    _check(case, model, g)


def test_routing_weights_match_hf():
    g = dict(np.load(GOLDENS / "v3" / "golden.npz"))
    model = dsjax.load_hf(GOLDENS / "v3", dtype=jnp.float32)
    h = model.embed_tokens(jnp.asarray(g["input_ids"]))
    # router of the first MoE layer applied to HF's own input of that layer is not stored; instead compare the
    # weights of the full forward's routing through a hook-free path: rerun layer 0 and route layer 1.
    from dsjax.model import make_attention_mask, rope_cos_sin

    cfg = model.cfg
    seg = jnp.ones(g["input_ids"].shape, jnp.int32)
    mask = make_attention_mask(seg, seg)
    cos, sin = rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape), jnp.float32)
    h, _, _ = model.layers[0](h, cos, sin, mask, seg != 0)
    layer = model.layers[1]
    x = layer.input_layernorm(h)
    a, _ = layer.self_attn(x, cos, sin, mask)
    x = layer.post_attention_layernorm(h + a)
    r = layer.mlp.gate(x.reshape(-1, cfg.hidden_size))
    order = np.argsort(np.asarray(r.indices), axis=-1)
    w = np.take_along_axis(np.asarray(r.weights), order, -1)
    np.testing.assert_allclose(w, g["topk_weights"][0], rtol=1e-5, atol=1e-6)


def test_v3_parity_scanned_and_absorbed():
    folder = GOLDENS / "v3"
    g = dict(np.load(folder / "golden.npz"))
    model = dsjax.load_hf(folder, dtype=jnp.float32, scan_layers=True)
    _check("v3-scanned-absorbed", model, g, mla_impl="absorbed")


def test_fp8_kept_in_fp8_and_dequantisation():
    folder = GOLDENS / "fp8"
    g = dict(np.load(folder / "golden.npz"))
    model = dsjax.load_hf(folder, dtype=jnp.float32, keep_fp8=True)
    assert model.layers[0].self_attn.kv_b_proj.kernel.get_value().dtype == jnp.float8_e4m3fn
    _check("fp8-kept", model, g)
    # dequantisation of partial 128x128 blocks agrees with the golden script's W8 * scale
    deq = dsjax.load_hf(folder, dtype=jnp.float32)
    kv_b = np.asarray(deq.layers[0].self_attn.kv_b_proj.weight()).reshape(g["dequant_check"].shape[1], -1).T
    np.testing.assert_array_equal(kv_b, g["dequant_check"])
    down = np.asarray(deq.layers[1].mlp.experts.down_proj.get_value()[0]).T
    np.testing.assert_array_equal(down, g["dequant_check_expert"])
    kept_down = np.asarray(model.layers[1].mlp.experts._w("down_proj")[0]).T
    np.testing.assert_array_equal(kept_down, g["dequant_check_expert"])
