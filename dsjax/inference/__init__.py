"""Inference: sampling, batched generation on the latent cache, MTP self-speculative decoding -- on one device or,
with a :class:`~dsjax.sharding.Plan`, on a device mesh (``generate(..., plan=plan)``, :func:`jit_generate`)."""

from dsjax.inference.generate import (OUTPUT_AXES, GenerateOutput, decode_step, generate, generate_tokens, jit_generate,
                                      pad_prompts, prefill)
from dsjax.inference.sampling import SamplingConfig, sample_tokens
from dsjax.inference.sharded import ShardedGenerator
from dsjax.inference.speculative import (SPECULATIVE_OUTPUT_AXES, SpeculativeOutput, jit_speculative_generate,
                                         speculative_generate, speculative_generate_tokens)

__all__ = ["GenerateOutput", "SamplingConfig", "decode_step", "generate", "generate_tokens", "jit_generate",
           "pad_prompts", "prefill", "sample_tokens", "SpeculativeOutput", "speculative_generate",
           "speculative_generate_tokens", "jit_speculative_generate", "ShardedGenerator", "OUTPUT_AXES",
           "SPECULATIVE_OUTPUT_AXES"]
