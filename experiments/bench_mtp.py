"""MTP self-speculative decoding speed-up on a model trained long enough for its MTP module to be useful.

    python -m experiments.bench_mtp --config=small --steps=400 --record

Trains the preset (main + MTP loss) on the synthetic arithmetic-with-scratchpad task, then decodes held-out prompts
(another seed) greedily, plain and speculative (``--draft_tokens`` drafts per verification forward), at each batch
size, in the same process: reports the draft acceptance rate (overall, and by depth: draft j kept given draft j - 1
was), the main-model forwards per generated token, the wall-clock ratio, and checks that both produce the same
tokens.
"""

from __future__ import annotations

import datetime
import pathlib
import sys
import time

from absl import app, flags

from experiments.records import append_record

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "small", "Training preset.")
flags.DEFINE_integer("steps", 400, "Training steps.")
flags.DEFINE_integer("batch_size", 32, "Training batch (sequences).")
flags.DEFINE_integer("seq_len", 256, "Training sequence length.")
flags.DEFINE_string("decode_batches", "1,32", "Batch sizes for decoding.")
flags.DEFINE_integer("new_tokens", 96, "Max new tokens.")
flags.DEFINE_list("temperatures", ["0"], "Sampling temperatures: 0 is greedy (speculative output identical to plain "
                  "greedy), > 0 speculative sampling (same distribution as plain sampling, other samples).")
flags.DEFINE_list("draft_tokens", ["1", "2"], "Drafts per verification forward to time (each against the same plain "
                  "run): 1 = the MTP module's own prediction; more chain the module on its output.")
flags.DEFINE_bool("f32_check", False, "Where greedy speculative output differs from plain greedy, decode both again "
                  "with float32 compute: equal there means the difference is BF16 rounding between the verification "
                  "forward's (k + 1 tokens per row) and a plain step's kernels, which can flip a near-tie argmax.")
flags.DEFINE_bool("record", False, "Append the table to docs/benchmarks.md.")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import dsjax
    from dsjax.data import make_dataset, make_tokenizer
    from dsjax.data.synthetic import arithmetic_example
    from dsjax.inference import speculative_generate
    from dsjax.train import config as tc
    from dsjax.train import init_state, make_train_step, split_model

    cfg = tc.apply_overrides(tc.get(FLAGS.config), [
        "data.source=arithmetic", f"data.seq_len={FLAGS.seq_len}", f"data.batch_size={FLAGS.batch_size}",
        f"steps={FLAGS.steps}", "optim.warmup_steps=50", "optim.learning_rate=1e-3"])
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}; training {FLAGS.config} on arithmetic for {FLAGS.steps} steps", flush=True)
    g, p, r = split_model(nnx.eval_shape(lambda: dsjax.Transformer(cfg.model, rngs=nnx.Rngs(0))))
    step = jax.jit(make_train_step(cfg, g, p, r), donate_argnums=0)
    state = jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(0))
    tok = make_tokenizer(cfg.data)
    it = iter(make_dataset(cfg.data, tok))
    t0 = time.perf_counter()
    for i in range(cfg.steps):
        batch = {k: jnp.asarray(np.asarray(v, np.int32)) for k, v in next(it).items()
                 if k in ("tokens", "segment_ids", "positions", "loss_mask")}
        state, m = step(state, batch)
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}: loss {float(m['loss']):.3f} ce {float(m['ce']):.3f} "
                  f"mtp {float(m['mtp_loss_1']):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    params, rest = nnx.State(p), nnx.State(r)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.replace_by_pure_dict(rest, state.rest)
    model = nnx.merge(g, params, rest)
    model32 = None
    if FLAGS.f32_check:   # same weights (float32 masters), float32 compute
        g32 = split_model(nnx.eval_shape(lambda: dsjax.Transformer(cfg.model.replace(dtype="float32"),
                                                                    rngs=nnx.Rngs(0))))[0]
        model32 = nnx.merge(g32, params, rest)

    rows = []
    for b, temp in [(int(x), float(t)) for x in FLAGS.decode_batches.split(",") for t in FLAGS.temperatures]:
        prompts = [[tok.bos_id] + tok.encode(arithmetic_example(10_000, i)["prompt"]) for i in range(b)]
        sc = dsjax.SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=temp)

        def timed(fn):
            out = fn()  # compile
            jax.block_until_ready(jax.tree.leaves(out))
            t = time.perf_counter()
            out = fn()
            jax.block_until_ready(jax.tree.leaves(out))
            return out, time.perf_counter() - t

        plain, t_plain = timed(lambda: dsjax.generate(model, prompts, sampling=sc, key=jax.random.key(1)))
        plain32 = None
        for k in [int(x) for x in FLAGS.draft_tokens]:
            spec, t_spec = timed(lambda: speculative_generate(model, prompts, sampling=sc, key=jax.random.key(1),
                                                              draft_tokens=k))
            same = plain.to_lists() == spec.output.to_lists() if temp == 0 else "n/a (sampled)"
            if same is False:
                differ = sum(a != c for a, c in zip(plain.to_lists(), spec.output.to_lists()))
                same = f"False ({differ} of {b} rows)"
                if model32 is not None:
                    if plain32 is None:
                        plain32 = dsjax.generate(model32, prompts, sampling=sc, key=jax.random.key(1)).to_lists()
                    spec32 = speculative_generate(model32, prompts, sampling=sc, key=jax.random.key(1),
                                                  draft_tokens=k).output.to_lists()
                    same += f"; float32 compute: {plain32 == spec32}"
            n_tok = int(np.asarray(spec.output.lengths).max())
            by_depth = np.sum(np.asarray(spec.accepted_by_depth), axis=0)
            tried = [np.sum(spec.drafts) / k, *by_depth[:-1]]      # draft j is tried when draft j - 1 was kept
            rows.append({"batch": b, "temperature": temp, "k": k, "acceptance": spec.acceptance_rate,
                         "conditional": [float(kept / max(t, 1)) for kept, t in zip(by_depth, tried)],
                         "plain_s": t_plain, "spec_s": t_spec, "speedup": t_plain / t_spec,
                         "main_forwards": int(spec.main_forwards) + 1, "tokens": n_tok, "identical": same})
            print(rows[-1], flush=True)
        print("sample:", repr(prompts and tok.decode(prompts[0][1:])), "->", repr(tok.decode(plain.to_lists()[0])),
              flush=True)
    lines = ["| batch | temperature | drafts per forward | draft acceptance | kept given the previous kept, by depth | "
             "main forwards / tokens (longest row) | plain s | speculative s | speed-up | identical |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r_ in rows:
        cond = ", ".join(f"{100 * c:.1f}%" for c in r_["conditional"])
        lines.append(f"| {r_['batch']} | {r_['temperature']:g} | {r_['k']} | {100 * r_['acceptance']:.1f}% | {cond} | "
                     f"{r_['main_forwards']} / {r_['tokens']} | "
                     f"{r_['plain_s']:.3f} | {r_['spec_s']:.3f} | {r_['speedup']:.2f}x | {r_['identical']} |")
    table = "\n".join(lines)
    print(table)
    if FLAGS.record:
        append_record(f"MTP self-speculative decoding, `{FLAGS.config}` trained {FLAGS.steps} steps on arithmetic "
                      f"({datetime.date.today().isoformat()}, {dev.device_kind}, jax {jax.__version__})",
                      f"Final train loss {float(m['loss']):.3f} (CE {float(m['ce']):.3f}, MTP "
                      f"{float(m['mtp_loss_1']):.3f}).\n\n{table}", "bench_mtp")


if __name__ == "__main__":
    app.run(main)
