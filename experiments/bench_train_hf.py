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

    from hf_baseline import build_hf_model

    model, config, used, dev = build_hf_model(cfg_json)
    model = model.train()
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
