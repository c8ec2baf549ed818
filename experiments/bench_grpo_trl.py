"""TRL's GRPOTrainer on the HF transformers DeepseekV3 model of a dsjax config (the peer baseline of bench_grpo).

Run by experiments/bench_grpo.py in a subprocess (torch only; imports nothing from dsjax):

    python experiments/bench_grpo_trl.py '<hub config json>' '<settings json>'

Prints one JSON line: seconds per step (median over the timed steps) split into rollout (``_generate``: HF
``generate`` of prompts x G completions, with min_new_tokens = max_completion_length so every completion has the
same length as in dsjax's run) and the rest (rewards, reference/old log-probs, forward/backward, optimizer).
"""

import json
import statistics
import sys
import tempfile
import time


def byte_tokenizer():
    """A HF fast tokenizer with dsjax's byte layout: pad 0, bos 1, eos 2, byte b -> b + 3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer/decoder use
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({chr(c): b + 3 for b, c in zip(bs, cs)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   padding_side="left")


def main():
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from hf_baseline import build_hf_model

    cfg_json, settings = sys.argv[1], json.loads(sys.argv[2])
    model, config, impl, dev = build_hf_model(cfg_json)
    tok = byte_tokenizer()
    # TRL builds the reference model from a path: save the random-weight policy and let TRL load both from it
    model_dir = tempfile.mkdtemp()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    del model
    init_kwargs = {"dtype": "bfloat16" if dev == "cuda" else "float32", "attn_implementation": "sdpa",
                   "experts_implementation": impl}
    n_prompts, g, n_new = settings["prompts"], settings["G"], settings["max_new_tokens"]
    prompts = [p for p in settings["prompt_texts"]]
    ds = Dataset.from_dict({"prompt": prompts * (settings["steps"] + 4)})

    def digits(completions, **kwargs):
        return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]

    timings = {"generate": []}

    class Timed(GRPOTrainer):
        def _generate(self, *a, **k):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            t0 = time.perf_counter()
            out = super()._generate(*a, **k)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            timings["generate"].append(time.perf_counter() - t0)
            return out

    step_times = []
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            step_times.append(time.perf_counter() - self.t0)

    result = {"experts_implementation": impl, "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"}
    for cache in (settings.get("cache_implementation"), None):
        timings["generate"].clear()
        step_times.clear()
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n_prompts * g, gradient_accumulation_steps=1,
            num_generations=g, max_completion_length=n_new, temperature=1.0, beta=settings["beta"],
            num_iterations=1, learning_rate=1e-6, bf16=dev == "cuda", use_cpu=dev != "cuda", max_steps=settings["steps"], logging_steps=1,
            report_to="none", save_strategy="no", loss_type="grpo", epsilon=0.2, shuffle_dataset=False,
            cache_implementation=cache, generation_kwargs={"min_new_tokens": n_new}, disable_dropout=True,
            model_init_kwargs=init_kwargs)
        try:
            trainer = Timed(model=model_dir, reward_funcs=[digits], args=args, train_dataset=ds, processing_class=tok,
                            callbacks=[StepTimer()])
            trainer.train()
            result["cache_implementation"] = cache
            break
        except Exception as e:  # noqa: BLE001 - try the default cache
            result.setdefault("errors", []).append(f"cache_implementation={cache}: {type(e).__name__}: {e}"[:300])
            if cache is None:
                raise
    skip = settings["warmup"]
    st, gen = step_times[skip:], timings["generate"][skip:]
    result.update(step_s=statistics.median(st), rollout_s=statistics.median(gen),
                  update_s=statistics.median([s - r for s, r in zip(st, gen)]), steps_timed=len(st),
                  peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0)
    print("TRL_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
