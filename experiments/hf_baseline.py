"""Builds the HF transformers DeepseekV3 model used as the peer baseline by the bench_*_hf.py scripts (torch only;
this module imports nothing from dsjax so it runs in the torch environment)."""

import json


def build_hf_model(cfg_json: str, *, min_positions: int = 0):
    """``(model, config, experts_implementation)`` for a dsjax hub-style config JSON, bf16 on the GPU if present,
    sdpa attention and the fastest available expert implementation (``grouped_mm``, ``batched_mm``, ``eager``).
    MTP layers are not part of HF's causal-LM model."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hub = json.loads(cfg_json)
    hub.pop("quantization_config", None)
    hub["num_nextn_predict_layers"] = 0
    rope = hub.pop("rope_scaling", None)
    theta = hub.pop("rope_theta", 10000.0)
    hub["rope_parameters"] = {"rope_type": "default", "rope_theta": theta} if not rope else \
        {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": rope.get("type", "yarn"), "rope_theta": theta}
    keep = {k: v for k, v in hub.items() if k not in ("architectures", "model_type", "torch_dtype")}
    keep["max_position_embeddings"] = max(keep.get("max_position_embeddings", 4096), min_positions)
    config = DeepseekV3Config(**keep)
    torch.manual_seed(0)
    model, used = None, None
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa", experts_implementation=impl)
            used = impl
            break
        except Exception:  # noqa: BLE001 - try the next implementation
            continue
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=dev, dtype=torch.bfloat16), config, used, dev
