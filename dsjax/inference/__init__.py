"""Inference: sampling, batched generation on the latent cache, MTP self-speculative decoding."""

from dsjax.inference.generate import GenerateOutput, decode_step, generate, generate_tokens, pad_prompts, prefill
from dsjax.inference.sampling import SamplingConfig, sample_tokens
from dsjax.inference.speculative import SpeculativeOutput, speculative_generate, speculative_generate_tokens

__all__ = ["GenerateOutput", "SamplingConfig", "decode_step", "generate", "generate_tokens", "pad_prompts",
           "prefill", "sample_tokens", "SpeculativeOutput", "speculative_generate", "speculative_generate_tokens"]
