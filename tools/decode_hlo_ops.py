"""Lists the data-movement ops (slices, concatenations, copies, converts) of a compiled decode loop: what a decode
step re-derives or copies on every token. Session 16 found with it that the batch-32 loop of `small` sliced
``kv_b_proj`` into ``W_UK``/``W_UV`` and concatenated the two MLA down-projection kernels (XLA's dot merger) per layer
and step; ``unstack_layers`` now makes those once (``add_decode_copies``). Run it on the GPU (XLA on the CPU makes
other fusion decisions):

    PYTHONPATH=. python tools/decode_hlo_ops.py [config] [batch]      # default: small 32

Prints one line per such op inside the compiled ``generate_tokens`` (shape, scope), then the decode loop's kernel
inventory -- the top-level ops of its body that launch work, counted by dsjax scope (session 19: ~17 per MoE layer at
batch 32) -- and writes the whole compiled HLO to /tmp/decode_hlo.txt. ``--fp8`` (a third argument) compiles the same
model stored in FP8 (128x128 blocks), as ``bench_decode --fp8_weights`` times it.
"""
import re
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import dsjax
from dsjax.inference import SamplingConfig, generate_tokens

name = sys.argv[1] if len(sys.argv) > 1 else "small"
b = int(sys.argv[2]) if len(sys.argv) > 2 else 32
p, n = 128, 128
cfg = dsjax.configs.get(name, dtype="bfloat16", param_dtype="bfloat16")
model = dsjax.Transformer(cfg, rngs=nnx.Rngs(0))
if "--fp8" in sys.argv[3:]:
    from experiments.bench_decode import fp8_weights_model

    model = fp8_weights_model(model)
graphdef, state = nnx.split(model)
prompts = jnp.ones((b, p), jnp.int32)
lengths = jnp.full((b,), p, jnp.int32)
keys = jax.random.split(jax.random.key(0), b)
sampling = SamplingConfig(max_new_tokens=n, temperature=0.0, use_eos=False, length_bucket=p)
text = generate_tokens.lower(graphdef, state, prompts, lengths, keys, cfg=sampling).compile().as_text()
open("/tmp/decode_hlo.txt", "w").write(text)
kinds = re.compile(r"(wrapped_slice|wrapped_concatenate|convert_fusion|copy|memcpy|dynamic-slice)")
for line in text.splitlines():
    line = line.strip()
    if " = " not in line or line.startswith("ROOT") or not kinds.search(line.split(" = ")[0]):
        continue
    scope = re.search(r'op_name="([^"]*)"', line)
    print(line.split(" = ")[0], line.split(" = ")[1].split(" fusion(")[0].split("(")[0][:60],
          scope.group(1) if scope else "")


def loop_body(hlo: str) -> list[str]:
    """The body of the decode ``while`` (the loop carrying the stacked latent cache, not the prefill's): its lines."""
    lines = hlo.splitlines()
    loops = [ln for ln in lines if " while(" in ln and "prefill" not in ln.split("metadata=")[-1]]
    body = re.search(r"body=(%[^,\s]+)", max(loops, key=lambda ln: ln.count("["))).group(1)
    start = next(i for i, ln in enumerate(lines) if ln.startswith(body + " "))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1:end]


def op_kind(line: str) -> str:
    """The HLO opcode of an instruction line (``fusion``, ``custom-call``, ``get-tuple-element``, ...)."""
    m = re.search(r"[)}\]] ([a-z-]+)\(", line.split(" = ", 1)[1])
    return m.group(1) if m else "?"


free = {"get-tuple-element", "bitcast", "constant", "parameter", "tuple"}   # no kernel of their own
ops = [ln.strip() for ln in loop_body(text) if " = " in ln and not ln.strip().startswith("ROOT")]
ops = [ln for ln in ops if op_kind(ln) not in free]
counts: dict[str, int] = {}
for ln in ops:
    scope = re.search(r'op_name="([^"]*)"', ln)
    where = re.sub(r"^jit\(generate_tokens\)/while/body/(checkpoint/)?", "", scope.group(1)) if scope else "(none)"
    key = f"{op_kind(ln):12s} " + "/".join(where.split("/")[:2])
    counts[key] = counts.get(key, 0) + 1
print(f"--- decode loop body: {len(ops)} ops that launch work per step ({cfg.num_hidden_layers} layers)")
for key, c in sorted(counts.items(), key=lambda kv: -kv[1]):
    print(f"{c:5d}  {key}")
