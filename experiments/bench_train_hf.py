"""HF transformers DeepseekV3 training-step throughput (the peer baseline of bench_train.py). Needs torch + CUDA.

    python experiments/bench_train_hf.py '<hub config json>' BATCH SEQ STEPS

Builds ``DeepseekV3ForCausalLM`` from the config in bfloat16 on the GPU with ``sdpa`` attention and the fastest
expert implementation available (``grouped_mm``, else ``batched_mm``, else eager), runs AdamW (fused) steps on
random tokens with the causal-LM loss, and prints one JSON line. MTP layers are not part of HF's training model.
"""

import json
import sys
import time

import torch


def main():
    cfg_json, batch, seq, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    import transformers
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hub = json.loads(cfg_json)
    hub.pop("quantization_config", None)
    hub["num_nextn_predict_layers"] = 0
    rope = hub.pop("rope_scaling", None)
    theta = hub.pop("rope_theta", 10000.0)
    hub["rope_parameters"] = {"rope_type": "default", "rope_theta": theta} if not rope else \
        {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": rope.get("type", "yarn"), "rope_theta": theta}
    keep = {k: v for k, v in hub.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = DeepseekV3Config(**keep)
    torch.manual_seed(0)
    used = None
    for impl in ("grouped_mm", "batched_mm", "eager"):
        try:
            model = DeepseekV3ForCausalLM._from_config(config, attn_implementation="sdpa",
                                                       experts_implementation=impl)
            used = impl
            break
        except Exception:  # noqa: BLE001 - try the next implementation
            continue
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device=dev, dtype=torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=dev)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    print(json.dumps({"variant": "HF transformers", "experts_implementation": used, "step_ms": 1e3 * dt,
                      "tokens_per_s": batch * seq / dt, "loss": float(loss), "transformers": transformers.__version__,
                      "torch": torch.__version__, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0}))


if __name__ == "__main__":
    main()
