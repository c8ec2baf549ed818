"""dsjax kernels: FP8 blockwise quantisation and GEMMs (XLA references + Pallas backends).

This package imports nothing from ``dsjax`` so that others can reuse it. Each op is one public function with an
``implementation=`` switch; ``"xla"`` is the reference used on CPU and for unsupported shapes.
"""

from pallas_kernels.grouped_matmul import grouped_matmul, mosaic_gpu_supported
from pallas_kernels.quant import E4M3_MAX, weight_dequant, weight_quant

__all__ = ["E4M3_MAX", "weight_dequant", "weight_quant", "grouped_matmul", "mosaic_gpu_supported"]
