"""Model configurations: frozen keyword-only dataclasses with HF/DeepSeek field names.

This module is a leaf: it imports nothing else from dsjax.

* :class:`ModelConfig` mirrors the fields of a DeepSeek-V2/V3 ``config.json`` (same names, same meaning) plus a
  few dsjax runtime fields (``dtype``, ``param_dtype``, ``scan_layers``, ``remat_policy``).
* Presets are plain functions (:func:`deepseek_v3`, :func:`deepseek_v2`, :func:`deepseek_v2_lite`, :func:`tiny`,
  :func:`small`) and are reachable by name through :func:`get`.
* :meth:`ModelConfig.from_hf_config` reads a hub ``config.json`` (V2, V2-Lite, V3, R1; transformers 4 style
  ``rope_scaling`` with ``type``/``rope_type`` and transformers 5 style ``rope_parameters``).

Every config validates itself in ``__post_init__`` and raises :class:`ConfigError` (a ``ValueError``) whose
message names the field, the offending value and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Literal

__all__ = [
    "ConfigError",
    "RopeScaling",
    "QuantizationConfig",
    "ModelConfig",
    "deepseek_v3",
    "deepseek_r1",
    "deepseek_v2",
    "deepseek_v2_lite",
    "tiny",
    "small",
    "get",
    "names",
]

ScoringFunc = Literal["sigmoid", "softmax"]
TopkMethod = Literal["noaux_tc", "greedy", "group_limited_greedy"]

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attn", "save_attn_out")
ATTENTION_IMPLS = ("auto", "einsum", "cudnn", "cudnn_mla", "cudnn_packed", "jax")
MLA_DECODE_IMPLS = ("auto", "xla", "pallas")
ROUTING_IMPLS = ("auto", "xla", "pallas")
GROUPED_MATMUL_IMPLS = ("auto", "xla", "tiled", "mosaic_gpu")
ROPE_TYPES = ("default", "yarn")
FP8_PROJECTIONS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
                   "up_proj", "down_proj")
FP8_GROUPED_GEMMS = ("auto", "bf16", "fp8")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and the fix."""


def _fail(field: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field}={value!r}: {problem}. Fix: {fix}.")


def _require_positive(obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            _fail(f, v, "must be a positive integer", f"set {f} to an integer >= 1")


def _require_non_negative(obj: Any, *fields: str) -> None:
    for f in fields:
        v = getattr(obj, f)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail(f, v, "must be a non-negative integer", f"set {f} to an integer >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE scaling block (``rope_scaling`` / ``rope_parameters`` of a hub config).

    Only ``yarn`` is used by DeepSeek models; ``default`` means plain RoPE. Field names follow HF.
    ``attention_factor=None`` means "derive it from ``factor``, ``mscale`` and ``mscale_all_dim``" exactly as
    transformers 5.24 ``_compute_yarn_parameters`` does.
    """

    rope_type: str = "yarn"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            _fail("rope_scaling.rope_type", self.rope_type, "is not supported",
                  f"use one of {ROPE_TYPES} (DeepSeek checkpoints use 'yarn')")
        if not (isinstance(self.factor, (int, float)) and self.factor > 0):
            _fail("rope_scaling.factor", self.factor, "must be a positive number", "e.g. factor=40 for DeepSeek-V3")
        if self.original_max_position_embeddings <= 0:
            _fail("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings,
                  "must be positive", "use the pre-training context length, 4096 for DeepSeek-V2/V3")
        if self.beta_fast <= 0 or self.beta_slow <= 0:
            _fail("rope_scaling.beta_fast/beta_slow", (self.beta_fast, self.beta_slow), "must be positive",
                  "DeepSeek uses beta_fast=32, beta_slow=1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """``quantization_config`` of an FP8 hub checkpoint (DeepSeek-V3/R1 ship e4m3 weights, 128x128 blocks)."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None  # "ue8m0" for V3.1-style power-of-two scales

    def __post_init__(self):
        if self.quant_method != "fp8":
            _fail("quantization_config.quant_method", self.quant_method, "is not supported",
                  "only 'fp8' checkpoints (DeepSeek-V3/R1 release format) can be read")
        if self.fmt != "e4m3":
            _fail("quantization_config.fmt", self.fmt, "is not supported", "use 'e4m3'")
        bs = tuple(self.weight_block_size)
        if len(bs) != 2 or any((not isinstance(b, int)) or b <= 0 for b in bs):
            _fail("quantization_config.weight_block_size", self.weight_block_size,
                  "must be two positive integers", "use [128, 128]")
        object.__setattr__(self, "weight_block_size", bs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3-family model. Field names and defaults follow the V3 ``config.json``.

    HF fields (see transformers ``DeepseekV3Config``) are followed by dsjax runtime fields, which are not part of
    a hub config: ``dtype`` (compute), ``param_dtype`` (storage), ``scan_layers`` and ``remat_policy``.
    """

    # --- vocabulary and trunk ---
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    pad_token_id: int | None = None
    # --- MLA ---
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- positions ---
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    # --- DeepSeekMoE ---
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 1e-4
    seq_aux: bool = True
    # --- multi-token prediction ---
    num_nextn_predict_layers: int = 1
    # --- FP8 checkpoint format (None for BF16/FP32 checkpoints) ---
    quantization_config: QuantizationConfig | None = None
    # --- dsjax runtime (not in hub configs) ---
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    # "auto": cuDNN flash attention on Hopper GPUs with bf16/fp16 compute (packed documents as "cudnn_packed" does;
    # else "cudnn_mla" where cuDNN >= 9.10 and the value head size differs from the key's, else "cudnn"), else
    # "einsum" (explicit scores, any backend);
    # "cudnn": always cuDNN (dense document mask, V zero-padded to the key size); "cudnn_mla": cuDNN's MLA mode with
    # unpadded V (key and value head sizes differ; cuDNN >= 9.10, Hopper; jax's internal API); "cudnn_packed" (see
    # attention_max_documents; what "auto" does with packed rows on cuDNN); "jax": jax.nn.dot_product_attention with its
    # default (XLA) backend.
    attention_impl: str = "auto"
    # "cudnn_packed": packed documents (training and prefill without a cache) described to cuDNN by per-row
    # document offsets and lengths (its packed "THD" layout: causal within each document, no dense [B,S,S] mask,
    # blocks outside the documents skipped); rows with more than this many documents fall back to the dense-mask
    # kernel (decided per step on the device, lax.cond)
    attention_max_documents: int = 16
    # the absorbed attention core of decode steps and speculative verifications (queries over the latent cache):
    # "auto" (the fused Pallas kernel, pallas_kernels.mla_decode_attention, on GPUs where the shapes allow, else
    # XLA), "xla" (einsum scores, masked softmax, einsum values), "pallas"
    mla_decode_impl: str = "auto"
    # the routers' expert selection (group scores, kept groups, top-k; pallas_kernels.moe_topk): "auto" (its Pallas
    # kernel, one launch per MoE layer, on GPUs where its shape rule holds: every preset; else XLA), "xla"
    # (lax.top_k), "pallas". Both give the same indices bitwise.
    routing_impl: str = "auto"
    # routed-expert grouped matmuls: "auto" (Mosaic GPU kernels on Hopper, else XLA ragged_dot), "xla", "mosaic_gpu"
    grouped_matmul_impl: str = "auto"
    # decode steps (one new token per sequence) of at most this many tokens whose (token, expert) pairs are too many
    # for the gathered path (2*T*K > E) run every routed expert on every token as one batched matmul per
    # projection and weight the outputs by the routing (zero for unchosen experts): the same weight reads as the
    # grouped-matmul kernel, which visits every expert's tiles anyway, without the sort and dispatch; 0: off
    moe_dense_decode_tokens: int = 128
    # FP8 training as DeepSeek-V3 does it: the MLA projections, dense MLPs and (shared and routed) expert matmuls
    # run in E4M3 with 1x128 activation / 128x128 weight scales (pallas_kernels.fp8_linear; experts: per-group
    # quantised operands through the bf16 grouped matmul); embedding, output head, router, norms and the attention
    # core stay BF16/FP32.
    fp8: bool = False
    # With fp8=True: the first N decoder layers compute in BF16 (a common FP8 mitigation: quantisation noise that
    # enters the residual stream early reaches every later gradient; experiments/fp8_grad_error.py measured the
    # gradient error of a 3-layer `small` halve, 14.6% -> 6.8%, with layer 0 in BF16, against 14.3% with the last
    # layer in BF16). With scan_layers the split must fall on the dense/MoE stack boundary: 0 or
    # first_k_dense_replace.
    fp8_bf16_layers: int = 0
    # With fp8=True: these projections (by their attribute/checkpoint name, in every layer) compute in BF16. MLA:
    # q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj; MLPs (dense layers and shared experts):
    # gate_proj, up_proj, down_proj. For ablations of where FP8 noise costs accuracy (experiments/fp8_grad_error.py
    # found the forward quantisation of the shared latent key/value path, kv_a_proj_with_mqa and kv_b_proj, the
    # most sensitive); DeepSeek-V3 keeps none of them in BF16.
    fp8_bf16_projections: tuple[str, ...] = ()
    # With fp8=True, the routed experts' GEMMs: "bf16" quantises and dequantises the operands (FP8 numerics) and
    # runs the BF16 grouped matmul; "fp8" runs the forward and the activation gradient through the m-grouped FP8
    # GEMM (pallas_kernels.fp8_gemm_grouped; same numerics up to summation order; the weight gradient stays on
    # dequantised operands); "auto": "fp8" where its Mosaic GPU kernel runs (Hopper), else "bf16". On an H200 the
    # FP8 `small` train step took 175 ms with "fp8" against 208 ms with "bf16" (docs/benchmarks.md).
    fp8_grouped_gemm: str = "auto"
    # FP8-stored checkpoints (load_hf(keep_fp8=True)) decoding on a GPU: decode-sized products with fewer rows per
    # group than this take XLA's form of the same maths (dequantise, then an einsum: for one row a matrix-vector
    # reduction that reads the E4M3 weights, K contiguous), the others the weight-only FP8 kernel
    # (pallas_kernels.fp8_weight_gemm). 1.6 us for batch 1's q_b_proj where the kernel path (x padded to 16 rows,
    # the kernel, the split-K sum) took 3.9 (CUPTI, H200, session 16). 1 = the kernel always.
    fp8_weight_kernel_min_rows: int = 2

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        _require_positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                          "v_head_dim", "max_position_embeddings", "moe_intermediate_size", "n_routed_experts",
                          "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq")
        _require_non_negative(self, "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.num_key_value_heads != self.num_attention_heads:
            _fail("num_key_value_heads", self.num_key_value_heads,
                  f"MLA expands the latent into one key/value per query head, so it must equal "
                  f"num_attention_heads={self.num_attention_heads}", "remove it or set it to num_attention_heads")
        if self.q_lora_rank is not None:
            _require_positive(self, "q_lora_rank")
        if self.qk_rope_head_dim % 2:
            _fail("qk_rope_head_dim", self.qk_rope_head_dim,
                  "must be even (RoPE rotates pairs of dimensions)", "use an even size such as 64")
        if self.hidden_act != "silu":
            _fail("hidden_act", self.hidden_act, "is not supported", "DeepSeek models use 'silu'")
        if not self.rms_norm_eps > 0:
            _fail("rms_norm_eps", self.rms_norm_eps, "must be positive", "use 1e-6")
        if not self.rope_theta > 0:
            _fail("rope_theta", self.rope_theta, "must be positive", "use 10000")
        if self.scoring_func not in SCORING_FUNCS:
            _fail("scoring_func", self.scoring_func, "is unknown", f"use one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            _fail("topk_method", self.topk_method, "is unknown", f"use one of {TOPK_METHODS}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            _fail("topk_method", self.topk_method, "(the V3 router) requires scoring_func='sigmoid'",
                  "set scoring_func='sigmoid', or topk_method='greedy'/'group_limited_greedy' for softmax")
        if self.num_experts_per_tok > self.n_routed_experts:
            _fail("num_experts_per_tok", self.num_experts_per_tok,
                  f"exceeds n_routed_experts={self.n_routed_experts}",
                  "lower num_experts_per_tok or add routed experts")
        if self.n_routed_experts % self.n_group:
            _fail("n_group", self.n_group, f"does not divide n_routed_experts={self.n_routed_experts}",
                  "choose n_group so that every group holds the same number of experts")
        if self.topk_group > self.n_group:
            _fail("topk_group", self.topk_group, f"exceeds n_group={self.n_group}",
                  "keep at most n_group groups")
        if self.uses_group_routing:
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                _fail("num_experts_per_tok", self.num_experts_per_tok,
                      f"exceeds the {self.topk_group * per_group} experts held by the topk_group={self.topk_group} "
                      f"kept groups of {per_group} experts", "raise topk_group or lower num_experts_per_tok")
            if self.topk_method == "noaux_tc" and per_group < 2:
                _fail("n_group", self.n_group,
                      "leaves fewer than 2 experts per group, but V3 group scores sum the top-2 experts",
                      "use fewer groups (n_group=1 disables group-limited routing)")
        if self.moe_layer_freq != 1:
            _fail("moe_layer_freq", self.moe_layer_freq, "is not supported (every DeepSeek release uses 1)",
                  "set moe_layer_freq=1")
        if self.first_k_dense_replace > self.num_hidden_layers:
            _fail("first_k_dense_replace", self.first_k_dense_replace,
                  f"exceeds num_hidden_layers={self.num_hidden_layers}", "use at most num_hidden_layers dense layers")
        if not self.routed_scaling_factor > 0:
            _fail("routed_scaling_factor", self.routed_scaling_factor, "must be positive", "use 1.0 to disable")
        if self.aux_loss_alpha < 0:
            _fail("aux_loss_alpha", self.aux_loss_alpha, "must be >= 0", "use 0 to disable the balance loss")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                _fail(f, getattr(self, f), "is not a supported dtype", f"use one of {DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            _fail("remat_policy", self.remat_policy, "is unknown", f"use one of {REMAT_POLICIES}")
        if not isinstance(self.fp8, bool):
            _fail("fp8", self.fp8, "must be a bool", "use fp8=True for FP8 training GEMMs, False for BF16")
        if isinstance(self.fp8_bf16_layers, bool) or not isinstance(self.fp8_bf16_layers, int) \
                or not 0 <= self.fp8_bf16_layers <= self.num_hidden_layers:
            _fail("fp8_bf16_layers", self.fp8_bf16_layers, f"must be an int in [0, {self.num_hidden_layers}]",
                  "use 0 (every layer in FP8) or the number of leading layers to keep in BF16")
        if self.fp8_grouped_gemm not in FP8_GROUPED_GEMMS:
            _fail("fp8_grouped_gemm", self.fp8_grouped_gemm, "is not a grouped-GEMM mode",
                  f"use one of {FP8_GROUPED_GEMMS}")
        if isinstance(self.fp8_bf16_projections, list):                    # from a JSON round trip
            object.__setattr__(self, "fp8_bf16_projections", tuple(self.fp8_bf16_projections))
        if not isinstance(self.fp8_bf16_projections, tuple):
            _fail("fp8_bf16_projections", self.fp8_bf16_projections, "must be a tuple of projection names",
                  f"use e.g. ('kv_a_proj_with_mqa', 'kv_b_proj'), names from {FP8_PROJECTIONS}")
        bad = set(self.fp8_bf16_projections) - set(FP8_PROJECTIONS)
        if bad:
            _fail("fp8_bf16_projections", self.fp8_bf16_projections, f"names unknown projections {sorted(bad)}",
                  f"use names from {FP8_PROJECTIONS}")
        if self.scan_layers and self.fp8_bf16_layers not in (0, self.first_k_dense_replace):
            _fail("fp8_bf16_layers", self.fp8_bf16_layers, "must fall on the dense/MoE stack boundary with "
                  "scan_layers=True", f"use 0 or first_k_dense_replace={self.first_k_dense_replace}, or "
                  "scan_layers=False")
        if self.grouped_matmul_impl not in GROUPED_MATMUL_IMPLS:
            _fail("grouped_matmul_impl", self.grouped_matmul_impl, "is unknown", f"use one of {GROUPED_MATMUL_IMPLS}")
        if isinstance(self.moe_dense_decode_tokens, bool) or not isinstance(self.moe_dense_decode_tokens, int) \
                or self.moe_dense_decode_tokens < 0:
            _fail("moe_dense_decode_tokens", self.moe_dense_decode_tokens, "must be an int >= 0",
                  "use 0 to always use the grouped/gathered expert paths, or a token bound such as 128")
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail("attention_impl", self.attention_impl, "is unknown", f"use one of {ATTENTION_IMPLS}")
        if self.mla_decode_impl not in MLA_DECODE_IMPLS:
            _fail("mla_decode_impl", self.mla_decode_impl, "is unknown", f"use one of {MLA_DECODE_IMPLS}")
        _require_positive(self, "fp8_weight_kernel_min_rows")
        if self.routing_impl not in ROUTING_IMPLS:
            _fail("routing_impl", self.routing_impl, "is unknown", f"use one of {ROUTING_IMPLS}")
        if isinstance(self.attention_max_documents, bool) or not isinstance(self.attention_max_documents, int) \
                or self.attention_max_documents < 1:
            _fail("attention_max_documents", self.attention_max_documents, "must be an int >= 1",
                  "use the most documents a packed row holds, such as 16")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.quantization_config, dict):
            object.__setattr__(self, "quantization_config", QuantizationConfig(**self.quantization_config))

    # ------------------------------------------------------------------ derived values
    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key size: ``qk_nope_head_dim + qk_rope_head_dim`` (192 for V3)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def uses_group_routing(self) -> bool:
        """True when routing first keeps ``topk_group`` of ``n_group`` expert groups."""
        if self.n_group <= 1:
            return False
        return self.topk_method in ("noaux_tc", "group_limited_greedy")

    @property
    def has_routing_bias(self) -> bool:
        """V3's ``e_score_correction_bias`` (auxiliary-loss-free balancing) exists only for ``noaux_tc``."""
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """Attention logit scale: ``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` under YaRN.

        Same rule as transformers 5.24 ``yarn_apply_mscale``: 0.1352338 for V3, 0.1147214 for V2-Lite.
        """
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.rope_type != "default" and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def replace(self, **changes: Any) -> "ModelConfig":
        """``dataclasses.replace`` with validation."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested dataclasses become dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}. Fix: remove them or use from_hf_config "
                              f"for a hub config.json")
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if isinstance(d.get("quantization_config"), dict):
            q = dict(d["quantization_config"])
            q["weight_block_size"] = tuple(q.get("weight_block_size", (128, 128)))
            d["quantization_config"] = QuantizationConfig(**q)
        return cls(**d)

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Reads a DeepSeek-V2/V2-Lite/V3/R1 hub ``config.json`` (a path to the file or its folder, or a dict).

        Handles ``rope_scaling`` with ``type`` or ``rope_type``, transformers-5 ``rope_parameters`` (which also
        carries ``rope_theta``), absent ``q_lora_rank`` (V2-Lite), ``num_nextn_predict_layers`` (or HF's alias
        ``num_mtp_layers``), ``quantization_config`` and DeepSeek-only keys (``scoring_func``, ``topk_method``).
        ``overrides`` set dsjax runtime fields (``dtype=...``) or replace hub values.
        """
        if isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.exists(path):
                raise FileNotFoundError(f"no config.json at {path!r}. Fix: pass a hub-layout model folder or the "
                                        f"path of its config.json")
            with open(path) as f:
                hf = json.load(f)
        return cls(**{**_hf_to_fields(hf), **overrides})

    def fp8_compute(self, projection: str) -> bool:
        """Whether the projection of this name (one of ``FP8_PROJECTIONS``) runs FP8 training GEMMs."""
        return self.fp8 and projection not in self.fp8_bf16_projections

    def to_hf_config(self) -> dict[str, Any]:
        """A hub-style ``config.json`` dict (transformers 4/5 and the DeepSeek remote code both read it)."""
        v3 = self.scoring_func == "sigmoid"
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        }
        skip = {"rope_scaling", "quantization_config", "dtype", "param_dtype", "scan_layers", "remat_policy",
                "attention_impl", "attention_max_documents", "grouped_matmul_impl", "moe_dense_decode_tokens",
                "mla_decode_impl", "routing_impl", "eos_token_id", "fp8",
                "fp8_bf16_layers", "fp8_bf16_projections", "fp8_grouped_gemm", "fp8_weight_kernel_min_rows"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                d[f.name] = getattr(self, f.name)
        d["eos_token_id"] = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        if self.rope_scaling is not None:
            rs = dataclasses.asdict(self.rope_scaling)
            rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = {k: v for k, v in rs.items() if v is not None}
        else:
            d["rope_scaling"] = None
        if self.quantization_config is not None:
            q = dataclasses.asdict(self.quantization_config)
            q["weight_block_size"] = list(q["weight_block_size"])
            d["quantization_config"] = {k: v for k, v in q.items() if v is not None}
        d["torch_dtype"] = self.param_dtype
        return d


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


# ---------------------------------------------------------------------- hub config parsing
_HF_ALIASES = {"num_mtp_layers": "num_nextn_predict_layers", "num_experts": "n_routed_experts",
               "num_local_experts": "n_routed_experts"}
# Hub keys that collide with dsjax runtime fields: a hub "dtype"/"torch_dtype" describes the stored weights,
# not the compute dtype, so it never overrides ModelConfig.dtype (pass dtype=... to from_hf_config instead).
# Every other key that is not a ModelConfig field (auto_map, ep_size, use_cache, ...) carries no architecture
# information and is ignored.
_HF_IGNORED = {"dtype", "torch_dtype", "param_dtype", "scan_layers", "remat_policy", "attention_impl",
               "mla_decode_impl", "routing_impl", "attention_max_documents", "grouped_matmul_impl",
               "moe_dense_decode_tokens", "fp8", "fp8_bf16_layers", "fp8_bf16_projections", "fp8_grouped_gemm",
               "fp8_weight_kernel_min_rows"}


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    theta = hf.get("rope_theta", 10000.0)
    block = hf.get("rope_parameters")
    if block is None:
        block = hf.get("rope_scaling")
    if block is None:
        return float(theta), None
    block = dict(block)
    if "full_attention" in block and isinstance(block["full_attention"], dict):  # per-layer-type form
        block = dict(block["full_attention"])
    theta = block.pop("rope_theta", theta)
    rope_type = block.pop("rope_type", None) or block.pop("type", None) or "default"
    block.pop("type", None)
    if rope_type == "default":
        return float(theta), None
    if rope_type != "yarn":
        raise ConfigError(f"rope_scaling.type={rope_type!r}: not used by DeepSeek models and not supported. "
                          f"Fix: use 'yarn' or remove rope_scaling")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    extra = sorted(set(block) - known - {"partial_rotary_factor"})
    if extra:
        raise ConfigError(f"rope_scaling has unknown keys {extra}. Fix: remove them (known: {sorted(known)})")
    block.pop("partial_rotary_factor", None)
    kwargs = {k: v for k, v in block.items() if v is not None}
    if "factor" not in kwargs:
        orig = kwargs.get("original_max_position_embeddings", 4096)
        kwargs["factor"] = hf.get("max_position_embeddings", orig) / orig
    for k in ("beta_fast", "beta_slow"):
        if not kwargs.get(k):  # HF: `get(...) or default`
            kwargs.pop(k, None)
    return float(theta), RopeScaling(rope_type="yarn", **kwargs)


def _hf_to_fields(hf: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    theta, rope = _parse_rope(hf)
    out["rope_theta"] = theta
    out["rope_scaling"] = rope
    model_type = hf.get("model_type", "")
    for key, value in hf.items():
        key = _HF_ALIASES.get(key, key)
        if key in ("rope_scaling", "rope_parameters", "rope_theta") or key in _HF_IGNORED:
            continue
        if key == "quantization_config":
            if value is not None:
                q = {k: v for k, v in value.items() if k in {f.name for f in dataclasses.fields(QuantizationConfig)}}
                if "weight_block_size" in q:
                    q["weight_block_size"] = tuple(q["weight_block_size"])
                out[key] = QuantizationConfig(**q)
            continue
        if key in fields:
            out[key] = value
    # Defaults that differ between V2 and V3 when a key is absent from the file.
    if model_type == "deepseek_v2" or hf.get("scoring_func") == "softmax":
        out.setdefault("scoring_func", "softmax")
        out.setdefault("topk_method", "greedy")
        out.setdefault("norm_topk_prob", False)
        out.setdefault("routed_scaling_factor", 1.0)
        out.setdefault("first_k_dense_replace", 0)
        out.setdefault("n_shared_experts", 2)
        out.setdefault("num_nextn_predict_layers", 0)
    if "q_lora_rank" not in hf:
        out["q_lora_rank"] = None if model_type == "deepseek_v2" else out.get("q_lora_rank", 1536)
    for k in ("n_group", "topk_group"):
        if out.get(k) is None:
            out[k] = 1
    if out.get("num_nextn_predict_layers") is None:  # absent (V2) or null
        out["num_nextn_predict_layers"] = 0
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = tuple(out["eos_token_id"])
    return out


# ---------------------------------------------------------------------- presets
def deepseek_v3(**overrides: Any) -> ModelConfig:
    """DeepSeek-V3 (671B total, 37B active; +1 MTP module). Same architecture as R1 and V3.1.

    Differences from the hub ``config.json``: the hub file also carries ``quantization_config`` (the release is
    FP8; :func:`dsjax.load_hf` reads it from the file) and ``aux_loss_alpha=0.001`` inherited from V2; the preset
    uses the V3 report's sequence-wise balance factor 1e-4.
    """
    base = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
        moe_intermediate_size=2048, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", first_k_dense_replace=3, aux_loss_alpha=1e-4, num_nextn_predict_layers=1,
        bos_token_id=0, eos_token_id=1, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
        remat_policy="dots_no_batch",
    )
    return ModelConfig(**{**base, **overrides})


def deepseek_r1(**overrides: Any) -> ModelConfig:
    """DeepSeek-R1: the V3 architecture (R1 was post-trained from V3-Base)."""
    return deepseek_v3(**overrides)


def deepseek_v2(**overrides: Any) -> ModelConfig:
    """DeepSeek-V2 (236B total, 21B active): softmax router, 8 groups / keep 3, routed scaling 16."""
    base = dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, num_hidden_layers=60,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=0.707, mscale_all_dim=0.707),
        moe_intermediate_size=1536, n_shared_experts=2, n_routed_experts=160, num_experts_per_tok=6, n_group=8,
        topk_group=3, routed_scaling_factor=16.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="group_limited_greedy", first_k_dense_replace=1, aux_loss_alpha=0.003,
        num_nextn_predict_layers=0, bos_token_id=100000, eos_token_id=100001, dtype="bfloat16",
        param_dtype="bfloat16", scan_layers=True, remat_policy="dots_no_batch",
    )
    return ModelConfig(**{**base, **overrides})


def deepseek_v2_lite(**overrides: Any) -> ModelConfig:
    """DeepSeek-V2-Lite (15.7B total, 2.4B active): no q-LoRA, softmax greedy top-6 of 64 experts."""
    base = dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
                                 mscale=0.707, mscale_all_dim=0.707),
        moe_intermediate_size=1408, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, n_group=1,
        topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax",
        topk_method="greedy", first_k_dense_replace=1, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
        bos_token_id=100000, eos_token_id=100001, dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
        remat_policy="dots_no_batch",
    )
    return ModelConfig(**{**base, **overrides})


def tiny(**overrides: Any) -> ModelConfig:
    """A V3-shaped model for CPU tests: 3 layers (1 dense), 16 experts in 4 groups, q-LoRA, YaRN, 1 MTP module."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=1024, rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0,
                                 mscale=1.0, mscale_all_dim=1.0),
        moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", first_k_dense_replace=1, aux_loss_alpha=1e-4, num_nextn_predict_layers=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32", param_dtype="float32",
    )
    return ModelConfig(**{**base, **overrides})


def small(**overrides: Any) -> ModelConfig:
    """A V3-shaped model of ~1.25B total / ~0.2B active parameters that trains on one 80 GB GPU.

    12 layers (first dense), 64 routed experts in 8 groups (keep 4), top-6, 1 shared expert, q-LoRA, 1 MTP
    module, 32k vocabulary, plain RoPE over 4k positions. BF16 compute with FP32 master weights.
    """
    base = dict(
        vocab_size=32768, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None,
        moe_intermediate_size=512, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid",
        topk_method="noaux_tc", first_k_dense_replace=1, aux_loss_alpha=1e-4, num_nextn_predict_layers=1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16", param_dtype="float32",
        scan_layers=True, remat_policy="dots_attn",
    )
    return ModelConfig(**{**base, **overrides})


_PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "deepseek-v3": deepseek_v3,
    "deepseek-r1": deepseek_r1,
    "deepseek-v2": deepseek_v2,
    "deepseek-v2-lite": deepseek_v2_lite,
    "tiny": tiny,
    "small": small,
}


def names() -> tuple[str, ...]:
    """Names accepted by :func:`get`."""
    return tuple(_PRESETS)


def get(name: str, **overrides: Any) -> ModelConfig:
    """A preset by name (``"deepseek-v3"``, ``"deepseek-v2"``, ``"deepseek-v2-lite"``, ``"tiny"``, ``"small"``)."""
    key = name.lower().replace("_", "-")
    if key not in _PRESETS:
        raise ConfigError(f"config name {name!r} is unknown. Fix: use one of {list(_PRESETS)}")
    return _PRESETS[key](**overrides)
