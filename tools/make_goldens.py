#!/usr/bin/env python
"""Golden files for dsjax parity tests, made with HF transformers 5.24 / torch 2.13 on CPU.

Regenerate:  tools/make_goldens.sh            (makes/uses .venv-ref, or $DSJAX_REF_PYTHON)
       or:   <python3.11 with torch 2.13.0 + transformers 5.24.0> tools/make_goldens.py --out tests/goldens

Every case folder is a tiny random checkpoint in the layout DeepSeek publishes on the Hub:
  config.json          remote-code style keys (rope_scaling {"type": "yarn"}, rope_theta, num_nextn_predict_layers,
                       scoring_func, topk_method, ...); never transformers-5 `rope_parameters`.
  *.safetensors        per-expert keys (model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight); the MTP module is
                       layer index num_hidden_layers (enorm, hnorm, eh_proj, shared_head.{norm,head}, embed_tokens copy,
                       and a full MoE decoder layer under the same prefix).  HF 5 keeps experts fused in memory
                       (gate_up_proj [E, 2I, D], gate rows first; down_proj [E, D, I]); we convert both ways here.
  golden.npz           input_ids int32 [B, T]; logits f32 [B, T, V] (HF *ForCausalLM, float32, eager attention);
                       last_hidden_state f32 [B, T, D] (final-normed, = the MTP input);
                       topk_indices int32 [L_moe, B*T, K] (router choices, captured by forward hooks on
                       model.layers[i].mlp.gate, K indices sorted ascending per token); topk_weights f32, aligned;
                       V3 cases also mtp_logits f32 [B, T, V], mtp_topk_indices / mtp_topk_weights [1, B*T, K];
                       fp8 also dequant_check / dequant_check_expert: dequantised f32 values of
                       model.layers.0.self_attn.kv_b_proj.weight and model.layers.1.mlp.experts.0.down_proj.weight.
  meta.json            versions, seed, description, code path of each golden, reload diffs, HF loading warnings.

Cases (B=2, T=24, vocab 256, float32 unless stated):
  v3     DeepSeek-V3 style.  hidden 64, intermediate 128, 3 layers (first_k_dense_replace=1), 4 heads, q_lora 32,
         kv_lora 32, qk_nope 16, qk_rope 8, v 16, moe_intermediate 32, 16 routed + 1 shared, top-4, sigmoid/noaux_tc,
         n_group 4, topk_group 2, norm_topk_prob, routed_scaling 2.5, non-zero e_score_correction_bias,
         YaRN factor 4 (orig 64, max 256) with mscale 1.0 != mscale_all_dim 0.8 (cos/sin factor and softmax scale
         both != 1), 1 MTP layer.  Weights split over 2 shards + model.safetensors.index.json.
  v2lite DeepSeek-V2-Lite style.  Same sizes, q_lora_rank null (q_proj), softmax/greedy, 16 experts top-6,
         2 shared, norm_topk_prob false, routed_scaling 1.0, YaRN mscale = mscale_all_dim = 0.707, no MTP.
  v2     DeepSeek-V2 (236B) style.  Like v2lite but q_lora 32, group_limited_greedy, n_group 4, topk_group 2,
         top-4, routed_scaling 16.0.
  fp8    V3 style stored as DeepSeek ships FP8: hidden 192, intermediate 320, moe_intermediate 160, q_lora 96,
         kv_lora 64, 2 heads, qk_nope 32, qk_rope 16, v 32, 8 experts top-2, n_group 2, topk_group 1, 2 layers
         (first dense), 1 MTP layer, so 128x128 blocks have partial edge blocks and several blocks per matrix.
         Every Linear of MLA / dense MLP / shared + routed experts (MTP block included) is `weight` float8_e4m3fn
         + `weight_scale_inv` f32 [ceil(out/128), ceil(in/128)], s = max(amax_block, 1e-4) / 448, W8 = e4m3(W / s).
         Embeddings, lm_head, norms, router gate, eh_proj, shared_head.head are bfloat16 (as shipped);
         e_score_correction_bias float32.  Goldens: float32 HF model holding W8.float() * s (and the bf16 values).

Weights: deterministic per case (torch.Generator, parameters in sorted-name order): Linear ~ N(0, 1/fan_in),
router gate ~ N(0, (1.6/sqrt(D))^2) so scores spread, embeddings ~ N(0, 1), RMSNorm weights 1 + 0.1 N(0, 1),
e_score_correction_bias 0.05 N(0, 1).  MTP golden: depth-1 logits at every position with HF's MtpModel
(forward_layer(0) + _project_to_logits): hidden = main last_hidden_state, ids = concat(ids[:, 1:], 0),
position_ids = arange(T), no cache, causal mask.
"""

import argparse
import contextlib
import json
import logging
import math
import pathlib
import platform
import re
import shutil
import tempfile
import warnings

import numpy as np
import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_layers import MtpModel

SEED, B, T = 20240611, 2, 24
FP8_BLOCK, FP8_MAX = 128, 448.0
DEQUANT_CHECKS = {"dequant_check": "model.layers.0.self_attn.kv_b_proj.weight",  # [128, 64]: one partial block
                  "dequant_check_expert": "model.layers.1.mlp.experts.0.down_proj.weight"}  # [192, 160]: 2x2, edges


def yarn(mscale, mscale_all_dim):
    return {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": mscale, "mscale_all_dim": mscale_all_dim}


def v3_hub(**kw):
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1,
           "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
           "kv_lora_rank": 32, "max_position_embeddings": 256, "model_type": "deepseek_v3",
           "moe_intermediate_size": 32, "moe_layer_freq": 1, "n_group": 4, "n_routed_experts": 16,
           "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 4, "num_experts_per_tok": 4,
           "num_hidden_layers": 3, "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
           "q_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "rms_norm_eps": 1e-06,
           "rope_scaling": yarn(1.0, 0.8), "rope_theta": 10000, "routed_scaling_factor": 2.5,
           "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_group": 2,
           "topk_method": "noaux_tc", "torch_dtype": "float32", "transformers_version": "4.33.1", "use_cache": True,
           "v_head_dim": 16, "vocab_size": 256}
    return {**cfg, **kw}


def v2_hub(**kw):
    cfg = v3_hub(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", n_group=1, topk_group=1,
                 n_shared_experts=2, num_experts_per_tok=6, norm_topk_prob=False, q_lora_rank=None,
                 routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy",
                 rope_scaling=yarn(0.707, 0.707))
    for k in ("ep_size", "num_nextn_predict_layers"):
        del cfg[k]
    return {**cfg, **kw}


CASES = {
    "v3": dict(shards=2, fp8=False, hub=v3_hub(),
               desc="DeepSeek-V3 style: q-LoRA MLA, sigmoid/noaux_tc group routing with e_score_correction_bias, "
                    "YaRN with mscale != mscale_all_dim, 1 MTP layer; 2 safetensors shards + index"),
    "v2lite": dict(shards=1, fp8=False, hub=v2_hub(),
                   desc="DeepSeek-V2-Lite style: no q-LoRA (q_proj), softmax/greedy top-6 of 16, 2 shared experts, "
                        "YaRN mscale = mscale_all_dim = 0.707, no MTP"),
    "v2": dict(shards=1, fp8=False,
               hub=v2_hub(q_lora_rank=32, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                          num_experts_per_tok=4, routed_scaling_factor=16.0, aux_loss_alpha=0.003,
                          transformers_version="4.39.3"),
               desc="DeepSeek-V2 (236B) style: q-LoRA MLA, softmax/group_limited_greedy (4 groups, 2 kept), top-4, "
                    "routed_scaling_factor 16"),
    "fp8": dict(shards=1, fp8=True,
                hub=v3_hub(hidden_size=192, intermediate_size=320, moe_intermediate_size=160, q_lora_rank=96,
                           kv_lora_rank=64, num_attention_heads=2, num_key_value_heads=2, qk_nope_head_dim=32,
                           qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                           topk_group=1, num_hidden_layers=2, torch_dtype="bfloat16",
                           quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                                "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}),
                desc="DeepSeek-V3 FP8 storage: block-128 e4m3 weights + weight_scale_inv with partial edge blocks, "
                     "bf16 embeddings/head/norms/router/eh_proj, 1 MTP layer (quantised block)"),
}


# ----------------------------------------------------------------------------------------------------------- weights
def init_weights(module, gen, d, prefix=""):
    """Deterministic re-initialisation of every parameter/buffer of `module` whose name starts with `prefix`."""
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        if not name.startswith(prefix):
            continue
        randn = torch.randn(t.shape, generator=gen, dtype=torch.float32)
        if name.endswith("e_score_correction_bias"):
            val = 0.05 * randn
        elif name.endswith("norm.weight"):
            val = 1.0 + 0.1 * randn
        elif name.endswith("embed_tokens.weight"):
            val = randn
        elif name.endswith("mlp.gate.weight"):
            val = randn * 1.6 / math.sqrt(d)
        elif t.dim() in (2, 3) and name.endswith(("weight", "gate_up_proj", "down_proj")):
            val = randn / math.sqrt(t.shape[-1])  # fan_in is the last dim for [out, in] and [E, out, in]
        else:
            raise ValueError(f"no init rule for {name} {tuple(t.shape)}")
        t.data.copy_(val)


EXPERT_RE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fused_to_hub(sd, rename):
    """HF-5 state dict -> hub names with per-expert tensors. `rename` maps HF names to hub names (None = drop)."""
    out = {}
    for k, v in sd.items():
        k = rename(k)
        if k is None:
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{k[:-13]}.{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{k[:-13]}.{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[:-10]}.{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def hub_to_fused(hub, rename):
    """Inverse of fused_to_hub: per-expert hub tensors -> HF-5 fused tensors. `rename` maps hub -> HF names."""
    out, experts = {}, {}
    for k, v in hub.items():
        hf = rename(k)
        if hf is None:
            continue
        m = EXPERT_RE.match(hf)
        if m:
            experts.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = v
        else:
            out[hf] = v
    for p, d in experts.items():
        n = 1 + max(e for e, _ in d)
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([d[e, "gate"], d[e, "up"]]) for e in range(n)])
        out[f"{p}.down_proj"] = torch.stack([d[e, "down"] for e in range(n)])
    return out


def mtp_names(num_layers):
    """(HF MtpModel name -> hub name, hub name -> MtpModel name) for MTP layer index `num_layers`."""
    pre = f"model.layers.{num_layers}."

    def to_hub(k):
        if k.startswith(("embed_tokens.", "shared_head.")):
            return None  # shared with the main model; written separately as copies
        k = k.removeprefix("layers.0.")
        k = {"post_norm.weight": "shared_head.norm.weight"}.get(k, k)
        return pre + k.removeprefix("mtp_block.")

    def from_hub(k):
        if not k.startswith(pre):
            return None
        k = k[len(pre):]
        if k in ("embed_tokens.weight", "shared_head.head.weight"):
            return None
        if k == "shared_head.norm.weight":
            return "layers.0.post_norm.weight"
        if k.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            return "layers.0." + k
        return "layers.0.mtp_block." + k

    return to_hub, from_hub


def is_fp8_linear(name):
    """Which hub tensors DeepSeek stores in FP8: MLA, dense/shared/routed MLP linears (MTP block included)."""
    return bool(re.search(r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                          r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$", name))


def quantize_fp8(w):
    """Block-128 e4m3 quantisation the DeepSeek way: returns (W8 float8_e4m3fn [out, in], scale_inv f32 [ro, ri])."""
    o, i = w.shape
    ro, ri = -(-o // FP8_BLOCK), -(-i // FP8_BLOCK)
    wp = torch.zeros(ro * FP8_BLOCK, ri * FP8_BLOCK)
    wp[:o, :i] = w
    amax = wp.abs().view(ro, FP8_BLOCK, ri, FP8_BLOCK).amax(dim=(1, 3))
    s = amax.clamp(min=1e-4) / FP8_MAX
    w8 = (w / expand_scale(s, o, i)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w8, s.float()


def expand_scale(s, o, i):
    return s.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:o, :i]


def dequantize_fp8(w8, s):
    return w8.float() * expand_scale(s, *w8.shape)


def store_fp8(hub):
    """float32 hub dict -> (tensors as stored on disk, float32 values the stored tensors represent)."""
    stored, effective = {}, {}
    for k, v in hub.items():
        if is_fp8_linear(k):
            w8, s = quantize_fp8(v)
            stored[k], stored[k + "_scale_inv"] = w8, s
            effective[k] = dequantize_fp8(w8, s)
        elif k.endswith("e_score_correction_bias"):
            stored[k] = effective[k] = v.float()
        else:
            stored[k] = v.to(torch.bfloat16)
            effective[k] = stored[k].float()
    return stored, effective


def load_fp8_folder(folder):
    """Read a folder's safetensors back and dequantise it: the float32 values our loader must reproduce."""
    raw = read_folder(folder)
    return {k: (dequantize_fp8(v, raw[k + "_scale_inv"]) if v.dtype == torch.float8_e4m3fn else v.float())
            for k, v in raw.items() if not k.endswith("_scale_inv")}


def natural(k):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]


def write_folder(folder, hub_cfg, tensors, shards):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hub_cfg, indent=2) + "\n")
    keys = sorted(tensors, key=natural)
    tensors = {k: tensors[k].contiguous().clone() for k in keys}
    if shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "model.safetensors").chmod(0o644)
        return
    nbytes = [t.numel() * t.element_size() for t in tensors.values()]
    total, acc, weight_map = sum(nbytes), 0, {}
    for k, n in zip(keys, nbytes):  # split by size, so a layer can straddle two files as on the Hub
        weight_map[k] = f"model-{min(shards, 1 + acc * shards // total):05d}-of-{shards:05d}.safetensors"
        acc += n
    for f in sorted(set(weight_map.values())):
        save_file({k: tensors[k] for k in keys if weight_map[k] == f}, folder / f, metadata={"format": "pt"})
        (folder / f).chmod(0o644)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def read_folder(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


# ----------------------------------------------------------------------------------------------------------- running
def run_main(model, ids):
    """Logits, final-normed hidden state and sorted router choices of every MoE layer (hooks on mlp.gate)."""
    caught, hidden = [], []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: caught.append(o))
             for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    hooks.append(model.model.norm.register_forward_hook(lambda m, i, o: hidden.append(o)))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    return logits, hidden[0], sort_topk(caught)


def sort_topk(outs):
    idx = torch.stack([o[2] for o in outs])
    w = torch.stack([o[1] for o in outs])
    idx, order = idx.sort(dim=-1)
    return idx.to(torch.int32), torch.gather(w, -1, order).float()


def run_mtp(mtp, ids, hidden, shift=0):
    ids_next = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    pos = (torch.arange(ids.shape[1]) + shift)[None].expand(ids.shape[0], -1)
    caught = []
    hook = mtp.layers[0].mtp_block.mlp.gate.register_forward_hook(lambda m, i, o: caught.append(o))
    with torch.no_grad():
        h = mtp.forward_layer(0, hidden, pos, None, input_ids=ids_next)
        logits = mtp._project_to_logits(h)
    hook.remove()
    return logits, sort_topk(caught)


@contextlib.contextmanager
def captured_logs():
    """Collects transformers' log records at WARNING and above, plus python warnings, into the yielded list."""
    msgs, handler = [], logging.Handler(logging.WARNING)
    handler.emit = lambda record: msgs.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield msgs
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        msgs += [str(w.message) for w in caught]


def clean(msgs, folder):
    """Messages without colour codes or temp paths; load-report tables are left out (see loading_info)."""
    out = [re.sub(r"\x1b\[[0-9;]*m", "", m).replace(str(folder), "<folder>").strip() for m in msgs]
    return [m[:400] for m in out if m and "LOAD REPORT" not in m]


def summarize_info(info, num_layers):
    """loading_info of from_pretrained, with the (expected) MTP-layer keys collapsed into a count."""
    pre, out = f"model.layers.{num_layers}.", {}
    for k, v in info.items():
        v = sorted(map(str, v))
        mtp = [x for x in v if x.startswith(pre)]
        out[k] = [x for x in v if not x.startswith(pre)] + [f"{len(mtp)} keys under {pre}* (MTP layer)"] * bool(mtp)
    return out


def hf_load(folder, num_layers, with_mtp):
    """Load a written folder with transformers' own loader (+ MtpModel.from_pretrained); returns (main, mtp, log)."""
    with captured_logs() as logs:
        main, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                          output_loading_info=True)
        main.eval()
        mtp = None
        if with_mtp:
            # HF only knows V3's real MTP index (`model\.layers\.61.*`); point its key filter at our layer.
            main._keys_to_ignore_on_load_unexpected = {rf"model\.layers\.{num_layers}\..*"}
            mtp = MtpModel.from_pretrained(main).eval()
    return main, mtp, {"loading_info": summarize_info(info, num_layers), "other_messages": clean(logs, folder)}


def hf_fp8_checks(folder, stored, effective, ids, golden):
    """transformers' own FP8 dequantisation, reported in meta.json, never used for the goldens:
    (1) Fp8Dequantize._dequantize_one, the op from_pretrained(quantization_config=FineGrainedFP8Config(dequantize=True))
        runs on CPU, on every stored FP8 tensor vs our block dequantisation; (2) that full load (needs accelerate)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    op, res = Fp8Dequantize(None), {"exact": [], "wrong_values": [], "error": []}
    for k in sorted((k for k in stored if k + "_scale_inv" in stored), key=natural):
        shape = tuple(stored[k].shape)
        try:
            got = op._dequantize_one(stored[k], stored[k + "_scale_inv"], output_dtype=torch.float32)
        except ValueError as e:
            res["error"].append(f"{k}: {e}")
            continue
        if torch.equal(got, effective[k]):
            res["exact"].append(f"{k} {shape}")
        else:
            res["wrong_values"].append(f"{k} {shape} max|diff| {max_diff(got, effective[k]):.3g}")
    res = {k: (v[:4] + [f"... {len(v)} tensors in all"] if len(v) > 4 else v) for k, v in res.items()}
    full = {}
    try:
        import accelerate
        from transformers import FineGrainedFP8Config
    except ImportError as e:
        full["skipped"] = f"{e}: install accelerate to run this check"
    else:
        full["accelerate"] = accelerate.__version__
        with captured_logs() as logs:
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                             quantization_config=FineGrainedFP8Config(dequantize=True))
                with torch.no_grad():
                    full["max_abs_diff_vs_golden"] = max_diff(model(input_ids=ids, use_cache=False).logits, golden)
            except Exception as e:  # noqa: BLE001 - record whatever HF does
                full["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        full["causes"] = sorted({line.strip() for m in logs for line in m.splitlines()
                                 if line.strip().startswith("ValueError")})[:3]
    return {"Fp8Dequantize_op_per_tensor": res, "from_pretrained_FineGrainedFP8Config_dequantize_True": full}


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


# ----------------------------------------------------------------------------------------------------------- a case
PATHS = {
    "logits": "{cls} in float32, attn_implementation='eager', use_cache=False, default position_ids arange(T), "
              "no attention_mask",
    "last_hidden_state": "output of model.model.norm (forward hook) = model.model(ids).last_hidden_state",
    "topk_indices/topk_weights": "forward hooks on model.model.layers[i].mlp.gate of each MoE layer, which returns "
                                 "(router_logits, topk_weights, topk_indices); stacked to [L_moe, B*T, K], indices "
                                 "sorted ascending per token, weights (routed_scaling_factor included) in that order",
    "mtp_logits": "transformers.modeling_layers.MtpModel(main_model, 1) holding the layer-L weights (shared_head.norm "
                  "-> layers.0.post_norm, decoder block -> layers.0.mtp_block; embed/head are the main model's); "
                  "forward_layer(0, last_hidden_state, position_ids=arange(T), mtp_cache=None, "
                  "input_ids=concat(ids[:, 1:], 0)) then _project_to_logits; eh_proj input [enorm(emb) | hnorm(h)]",
    "mtp_topk_indices/mtp_topk_weights": "hook on MtpModel.layers[0].mtp_block.mlp.gate, [1, B*T, K], sorted",
    "fp8": "float32 HF model holding W8.float() * repeat(weight_scale_inv, 128)[:out, :in] for the FP8 linears and "
           "the bf16 values (upcast) for the rest, computed in float32 (HF's own FP8 loading cannot, see hf_fp8_path)",
}


def build(name, spec, folder):
    """Random HF model (+ MtpModel) -> hub tensors -> stored tensors; models then hold exactly what is stored."""
    hub_cfg = spec["hub"]
    (folder / "config.json").write_text(json.dumps(hub_cfg, indent=2) + "\n")
    config = AutoConfig.from_pretrained(folder)  # proves transformers reads the hub-style file
    config._attn_implementation = "eager"
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the in-memory golden model is plain float32
    nl, d = hub_cfg["num_hidden_layers"], hub_cfg["hidden_size"]
    gen = torch.Generator().manual_seed(SEED + sum(map(ord, name)))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    init_weights(model, gen, d)
    hub, mtp = fused_to_hub(model.state_dict(), lambda k: k), None
    if "num_nextn_predict_layers" in hub_cfg:
        mtp = MtpModel(model, 1).eval()
        init_weights(mtp, gen, d, prefix="layers.")
        to_hub, from_hub = mtp_names(nl)
        hub.update(fused_to_hub(mtp.state_dict(), to_hub))
        hub[f"model.layers.{nl}.embed_tokens.weight"] = hub["model.embed_tokens.weight"]
        hub[f"model.layers.{nl}.shared_head.head.weight"] = hub["lm_head.weight"]
    hub = {k: v.detach().clone() for k, v in hub.items()}
    stored, effective = store_fp8(hub) if spec["fp8"] else (hub, hub)
    model.load_state_dict(hub_to_fused(effective, lambda k: None if k.startswith(f"model.layers.{nl}.") else k))
    if mtp is not None:
        res = mtp.load_state_dict(hub_to_fused(effective, from_hub), strict=False)
        assert not res.unexpected_keys and all(k.startswith(("embed_tokens", "shared_head")) for k in res.missing_keys)
    ids = torch.randint(0, hub_cfg["vocab_size"], (B, T), generator=gen)
    return model, mtp, stored, effective, ids


def make_case(name, spec, out_dir):
    hub_cfg, folder = spec["hub"], out_dir / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    nl = hub_cfg["num_hidden_layers"]
    model, mtp, stored, effective, ids = build(name, spec, folder)
    write_folder(folder, hub_cfg, stored, spec["shards"])

    logits, hidden, (tk_idx, tk_w) = run_main(model, ids)
    golden = {"input_ids": ids.to(torch.int32), "logits": logits, "last_hidden_state": hidden,
              "topk_indices": tk_idx, "topk_weights": tk_w}
    meta = {"case": name, "description": spec["desc"], "seed": SEED, "batch": B, "seq_len": T,
            "transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version(),
            "moe_layers": [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")],
            "golden_paths": {k: v.format(cls=type(model).__name__) for k, v in PATHS.items()
                             if (mtp is not None or "mtp" not in k) and (spec["fp8"] or k != "fp8")}}
    if mtp is not None:
        mtp_logits, (m_idx, m_w) = run_mtp(mtp, ids, hidden)
        golden.update(mtp_logits=mtp_logits, mtp_topk_indices=m_idx, mtp_topk_weights=m_w)
        meta["mtp_logits_max_abs_diff_if_positions_arange_plus_1"] = max_diff(run_mtp(mtp, ids, hidden, 1)[0],
                                                                              mtp_logits)
    if hub_cfg["topk_method"] == "noaux_tc":
        meta["router_choices_changed_if_bias_zeroed"] = count_changed(model, ids, tk_idx, "e_score_correction_bias",
                                                                      torch.zeros_like)
    if hub_cfg["topk_method"] == "group_limited_greedy":
        meta["router_choices_changed_if_plain_greedy"] = count_changed(model, ids, tk_idx, "topk_method",
                                                                       lambda _: "greedy")
    if spec["fp8"]:
        for key, wname in DEQUANT_CHECKS.items():
            golden[key] = effective[wname]
            meta[key] = {"name": wname, "shape": list(stored[wname].shape),
                         "scale_shape": list(stored[wname + "_scale_inv"].shape)}
        meta["fp8_storage"] = {
            "quantised": "weight float8_e4m3fn + weight_scale_inv float32 [ceil(out/128), ceil(in/128)], "
                         "s = max(amax_block, 1e-4) / 448, W8 = e4m3(clamp(W / s, +-448))",
            "bfloat16": "embed_tokens, lm_head, all norms, router gate, eh_proj, shared_head.head, MTP embed copy",
            "float32": "e_score_correction_bias"}
        meta["hf_fp8_path"] = hf_fp8_checks(folder, stored, effective, ids, logits)

    # ---- reload the written folder with transformers' own loader and compare
    with tempfile.TemporaryDirectory() as tmp:
        src = folder
        if spec["fp8"]:  # HF cannot dequantise partial blocks: reload our dequantisation of the files on disk
            src = pathlib.Path(tmp)
            cfg32 = {k: v for k, v in hub_cfg.items() if k != "quantization_config"}
            write_folder(src, {**cfg32, "torch_dtype": "float32"}, load_fp8_folder(folder), 1)
        main2, mtp2, log = hf_load(src, nl, mtp is not None)
    logits2, hidden2, (idx2, w2) = run_main(main2, ids)
    meta["reload"] = {
        "how": "AutoModelForCausalLM.from_pretrained(folder, dtype=float32, attn_implementation='eager')"
               + (" + MtpModel.from_pretrained(main)" if mtp is not None else "")
               + (" on a temp float32 copy = the safetensors read back + our block dequantisation" if spec["fp8"]
                  else ""),
        "max_abs_diff_logits": max_diff(logits2, logits), "topk_indices_equal": bool(torch.equal(idx2, tk_idx)),
        "max_abs_diff_topk_weights": max_diff(w2, tk_w), **log}
    if mtp is not None:
        meta["reload"]["max_abs_diff_mtp_logits"] = max_diff(run_mtp(mtp2, ids, hidden2)[0], golden["mtp_logits"])

    np.savez(folder / "golden.npz", **{k: v.detach().numpy() for k, v in golden.items()})
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.iterdir())
    r = meta["reload"]
    print(f"{name}: {size / 1e6:.2f} MB; reload max|dlogits| {r['max_abs_diff_logits']:.3g}, topk equal "
          f"{r['topk_indices_equal']}" + (f", max|dmtp| {r['max_abs_diff_mtp_logits']:.3g}" if mtp else ""))


def count_changed(model, ids, tk_idx, attr, value):
    """How many (layer, token) router choices change when every router's `attr` is set to `value` (want > 0)."""
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    saved = [getattr(g, attr) for g in gates]
    for g in gates:
        setattr(g, attr, value(getattr(g, attr)))
    idx0 = run_main(model, ids)[2][0]
    for g, v in zip(gates, saved):
        setattr(g, attr, v)
    return int((idx0 != tk_idx).any(-1).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/goldens", type=pathlib.Path)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(1)  # fixed CPU reduction order
    for name in args.cases:
        make_case(name, CASES[name], args.out)


if __name__ == "__main__":
    main()
