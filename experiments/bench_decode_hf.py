"""HF transformers DeepseekV3 generate() throughput (baseline of bench_decode.py). Needs torch.

    python experiments/bench_decode_hf.py '<hub config json>' BATCH PROMPT_LEN NEW_TOKENS REPEATS

bf16 weights, sdpa attention, the fastest expert implementation available, greedy, static cache, EOS disabled.
Prints one JSON line: prefill tokens/s (generate with 1 new token) and decode tokens/s (the rest).
"""

import json
import sys
import time

import torch


def main():
    cfg_json, b, p, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    import transformers

    from hf_baseline import build_hf_model

    model, config, used, dev = build_hf_model(cfg_json, min_positions=p + n + 8)
    model = model.eval()
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (b, p), device=dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def gen(new):
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, cache_implementation="static", eos_token_id=None,
                                  pad_token_id=0)

    def best(new):
        gen(new)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            gen(new)
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_pre = best(1)
    t_all = best(n)
    print(json.dumps({"impl": "HF transformers", "batch": b, "prefill_tok_s": b * p / t_pre,
                      "decode_tok_s": b * (n - 1) / max(t_all - t_pre, 1e-9), "total_s": t_all,
                      "experts_implementation": used, "transformers": transformers.__version__,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0}))


if __name__ == "__main__":
    main()
