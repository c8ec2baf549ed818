"""dsjax: DeepSeek-V3/R1 in JAX (Flax NNX) -- MLA, DeepSeekMoE, MTP, HF checkpoints, FP8.

Public surface (notebooks and the README use only this):

* ``dsjax.configs`` -- ``ModelConfig`` and presets (``configs.get("deepseek-v3")``, ``configs.tiny()``, ...).
* ``dsjax.Transformer(cfg, rngs=nnx.Rngs(0))`` -- the model; ``model(input_ids)`` returns a ``ModelOutput``.
* ``dsjax.count_params(cfg)`` / ``dsjax.format_param_table(cfg)`` -- parameter accounting without allocation.
* ``dsjax.load_hf(path)`` / ``dsjax.save_hf(model, cfg, path)`` -- hub-layout safetensors checkpoints (FP8 too).
* ``dsjax.generate(model, prompts, sampling=dsjax.SamplingConfig(...))`` -- batched decoding on the latent cache
  (``plan=`` a ``dsjax.sharding.Plan``: on a device mesh).
* ``dsjax.sharding`` / ``dsjax.MeshConfig`` -- device meshes, the logical-axis rules table and sharding plans.
"""

from dsjax import configs, sharding
from dsjax.configs import ConfigError, ModelConfig
from dsjax.model import (LatentCache, ModelOutput, RoutingBias, Transformer, cache_bytes_per_token, init_cache,
                         mha_cache_bytes_per_token)
from dsjax.params import count_params, decode_bytes_per_step, format_param_table, param_table
from dsjax.inference import GenerateOutput, SamplingConfig, generate
from dsjax.sharding import MeshConfig

__version__ = "0.1.0"


def load_hf(*args, **kwargs):
    """See :func:`dsjax.hf.load_hf` (imported lazily: it needs ``safetensors``)."""
    from dsjax.hf import load_hf as _load_hf

    return _load_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
    """See :func:`dsjax.hf.save_hf` (imported lazily: it needs ``safetensors``)."""
    from dsjax.hf import save_hf as _save_hf

    return _save_hf(*args, **kwargs)


__all__ = [
    "configs", "sharding", "MeshConfig", "ConfigError", "ModelConfig", "Transformer", "ModelOutput", "LatentCache",
    "RoutingBias", "init_cache", "cache_bytes_per_token", "mha_cache_bytes_per_token", "count_params", "param_table",
    "decode_bytes_per_step", "format_param_table", "load_hf", "save_hf", "generate", "SamplingConfig",
    "GenerateOutput", "__version__",
]
