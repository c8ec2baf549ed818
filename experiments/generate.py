"""Generate text from a dsjax training workdir or a Hugging Face folder.

    python -m experiments.generate --checkpoint=workdirs/tiny --prompt="def main(" --max_new_tokens=64
    python -m experiments.generate --checkpoint=/models/DeepSeek-V2-Lite --prompt="Hello" --temperature=0.7 --top_p=0.9
    python -m experiments.generate --checkpoint=workdirs/small --jsonl=prompts.jsonl --out=completions.jsonl
    python -m experiments.generate --checkpoint=workdirs/small --prompt="Q: 12+30=?" --speculative   # MTP drafts
    python -m experiments.generate --checkpoint=/models/DeepSeek-V2-Lite --jsonl=p.jsonl --set mesh.expert=4 \
        --set mesh.data=-1                                    # on a device mesh, flags as experiments.train takes them

The tokenizer comes from the workdir's config (``data.tokenizer``) or the HF folder's ``tokenizer.json``
(``--tokenizer`` overrides). JSONL mode reads one object per line with a ``prompt`` field and writes the prompt,
the completion, the number of generated tokens and their summed log-probability.

``--set mesh.<axis>=n`` (repeatable; ``data``, ``fsdp``, ``expert``, ``tensor``, ``rules``, ...: the ``mesh`` fields
of ``experiments.train``) generates on a device mesh (``dsjax.generate(..., plan=...)``): the weights laid out by the
rules table (an HF folder is placed on the mesh as it is read), each batch's rows split over data x fsdp x expert
(padded to a multiple of it). ``--num_cpu_devices`` fakes CPU devices to try a mesh without accelerators.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "dsjax workdir (with checkpoints/) or HF folder.", required=True)
flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable: one batch).")
flags.DEFINE_string("jsonl", None, "Batch mode: JSONL file with a 'prompt' field per line.")
flags.DEFINE_string("out", None, "Batch mode output JSONL (default: stdout).")
flags.DEFINE_string("tokenizer", None, "'bytes' or a tokenizer.json path (default: from the checkpoint).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus threshold (1 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 32, "Prompts per generate call in batch mode.")
flags.DEFINE_bool("speculative", False, "MTP self-speculative decoding (needs an MTP module): greedy with "
                  "--temperature=0, else speculative sampling (same output distribution as plain sampling).")
flags.DEFINE_string("dtype", "bfloat16", "Parameter/compute dtype for HF folders.")
flags.DEFINE_multi_string("set", [], "Device mesh, as experiments.train takes it: --set mesh.expert=4 --set "
                          "mesh.data=-1 (repeatable; only mesh.* fields). Default: one device.")
flags.DEFINE_integer("num_cpu_devices", None, "CPU only: number of (fake) CPU devices, for trying meshes without "
                     "accelerators.")
flags.DEFINE_bool("keep_fp8", False, "HF folders: keep the MLA, MLP and expert weights in FP8 with their 128x128 "
                  "block scales (as DeepSeek-V3's checkpoints ship them; BF16 ones are quantised on load), "
                  "dequantised on the fly: about half the weight memory.")


def mesh_plan(overrides: list[str]):
    """The :class:`dsjax.sharding.Plan` of ``--set mesh.*`` overrides (typed and validated as experiments.train does
    them), or None for one device."""
    from dsjax.sharding import make_plan
    from dsjax.train import config as tc

    bad = [o for o in overrides if not o.strip().startswith("mesh.")]
    if bad:
        raise app.UsageError(f"--set {bad[0]!r}: generation takes only mesh.* fields (e.g. --set mesh.expert=2); "
                             f"sampling has its own flags")
    return make_plan(tc.apply_overrides(tc.tiny(), overrides).mesh) if overrides else None


def load(checkpoint: str, tokenizer: str | None, plan=None):
    import jax.numpy as jnp

    import dsjax
    from dsjax.data import DataConfig, make_tokenizer

    path = pathlib.Path(checkpoint)
    if (path / "checkpoints").exists():
        from dsjax.train.loop import load_params_from_workdir

        if FLAGS.keep_fp8:
            raise app.UsageError("--keep_fp8 applies to HF folders; a dsjax workdir loads as it was trained. Fix: "
                                 "export it with dsjax.save_hf, or drop --keep_fp8")
        cfg, model = load_params_from_workdir(path)
        tok_spec = tokenizer or cfg.data.tokenizer
    elif (path / "config.json").exists():
        model = dsjax.load_hf(path, dtype=jnp.dtype(FLAGS.dtype), keep_fp8=FLAGS.keep_fp8, plan=plan)
        tok_spec = tokenizer or str(path / "tokenizer.json")
    else:
        raise app.UsageError(f"--checkpoint={checkpoint}: neither a dsjax workdir (checkpoints/) nor an HF folder "
                             f"(config.json)")
    tok = make_tokenizer(DataConfig(tokenizer=tok_spec))
    return model, tok


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.prompt) == bool(FLAGS.jsonl):
        raise app.UsageError("give --prompt (one or more) or --jsonl")
    import jax

    if FLAGS.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    from flax import nnx

    import dsjax
    from dsjax.inference import speculative_generate
    from dsjax.sharding import shard_params, validate

    plan = mesh_plan(FLAGS.set)
    model, tok = load(FLAGS.checkpoint, FLAGS.tokenizer, plan)
    if plan is not None:
        validate(model.cfg, plan, state=nnx.state(model))   # heads, experts, every weight dimension vs the mesh
        nnx.update(model, shard_params(nnx.state(model), plan))   # once (a workdir loads on one device)
    sampling = dsjax.SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                                    top_k=FLAGS.top_k, top_p=FLAGS.top_p)

    def encode(text: str) -> list[int]:
        ids = tok.encode(text)
        return ([tok.bos_id] if tok.bos_id is not None else []) + ids

    def run(texts: list[str], batch_index: int):
        prompts = [encode(t) for t in texts]
        t0 = time.perf_counter()
        if FLAGS.speculative:
            spec = speculative_generate(model, prompts, sampling=sampling, plan=plan,
                                        key=jax.random.fold_in(jax.random.key(FLAGS.seed), batch_index))
            out, extra = spec.output, f", MTP draft acceptance {spec.acceptance_rate:.1%}"
        else:
            out = dsjax.generate(model, prompts, sampling=sampling, plan=plan,
                                 key=jax.random.fold_in(jax.random.key(FLAGS.seed), batch_index))
            extra = ""
        ids = out.to_lists()
        dt = time.perf_counter() - t0
        n = sum(len(x) for x in ids)
        return ids, [float(sum(out.logprobs[b, :len(ids[b])])) for b in range(len(ids))], \
            f"{n} tokens in {dt:.2f}s ({n / dt:,.0f} tokens/s incl. compile){extra}"

    if FLAGS.prompt:
        ids, _, stats = run(list(FLAGS.prompt), 0)
        for text, gen in zip(FLAGS.prompt, ids):
            print(f"--- prompt: {text!r}\n{text}{tok.decode(gen)}")
        print(f"[{stats}]")
        return
    rows = [json.loads(line) for line in pathlib.Path(FLAGS.jsonl).read_text().splitlines() if line.strip()]
    if any("prompt" not in r for r in rows):
        raise app.UsageError(f"{FLAGS.jsonl}: every line needs a 'prompt' field")
    sink = open(FLAGS.out, "w") if FLAGS.out else None
    for i in range(0, len(rows), FLAGS.batch_size):
        chunk = rows[i:i + FLAGS.batch_size]
        ids, lps, stats = run([r["prompt"] for r in chunk], i)
        for r, gen, lp in zip(chunk, ids, lps):
            line = json.dumps({**r, "completion": tok.decode(gen), "num_tokens": len(gen), "logprob": lp})
            print(line, file=sink) if sink else print(line)
        print(f"[batch {i // FLAGS.batch_size}: {stats}]", flush=True)
    if sink:
        sink.close()


if __name__ == "__main__":
    app.run(main)
