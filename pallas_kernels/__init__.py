"""dsjax kernels: FP8 blockwise quantisation and GEMMs (XLA references + Pallas backends).

This package imports nothing from ``dsjax`` so that others can reuse it. Each op is one public function with an
``implementation=`` switch; ``"xla"`` is the reference used on CPU and for unsupported shapes.
"""

from pallas_kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_grouped, gemm_reference, grouped_gemm_reference
from pallas_kernels.fp8_linear import fp8_grouped_linear, fp8_linear, grouped_fp8_gemm_on_mosaic_gpu
from pallas_kernels.fp8_weight_gemm import fp8_weight_matmul, fp8_weight_swiglu
from pallas_kernels.fp8_quant import act_quant, act_quant_dual, act_quant_t, dequant, weight_quant_dual
from pallas_kernels.mla_decode import mla_decode_attention
from pallas_kernels.moe_topk import moe_topk, moe_topk_weights
from pallas_kernels.grouped_matmul import grouped_matmul, mosaic_gpu_supported
from pallas_kernels.quant import E4M3_MAX, weight_dequant, weight_quant

__all__ = ["E4M3_MAX", "weight_dequant", "weight_quant", "grouped_matmul", "mosaic_gpu_supported",
           "act_quant", "act_quant_t", "act_quant_dual", "weight_quant_dual", "dequant",
           "GemmConfig", "fp8_gemm", "fp8_gemm_grouped", "gemm_reference", "grouped_gemm_reference", "fp8_linear",
           "fp8_grouped_linear", "grouped_fp8_gemm_on_mosaic_gpu", "fp8_weight_matmul", "fp8_weight_swiglu",
           "mla_decode_attention", "moe_topk", "moe_topk_weights"]
