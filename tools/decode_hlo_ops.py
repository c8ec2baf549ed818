"""Lists the data-movement ops (slices, concatenations, copies, converts) of a compiled decode loop: what a decode
step re-derives or copies on every token. Session 16 found with it that the batch-32 loop of `small` sliced
``kv_b_proj`` into ``W_UK``/``W_UV`` and concatenated the two MLA down-projection kernels (XLA's dot merger) per layer
and step; ``unstack_layers`` now makes those once (``add_decode_copies``). Run it on the GPU (XLA on the CPU makes
other fusion decisions):

    PYTHONPATH=. python tools/decode_hlo_ops.py [config] [batch]      # default: small 32

Prints one line per such op inside the compiled ``generate_tokens`` (shape, scope) and writes the whole compiled
HLO to /tmp/decode_hlo.txt.
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
graphdef, state = nnx.split(dsjax.Transformer(cfg, rngs=nnx.Rngs(0)))
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
