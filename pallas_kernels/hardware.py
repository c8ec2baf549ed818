"""Which GPU the kernels run on: the one place for the architecture checks behind every ``"auto"`` dispatch.

The Mosaic GPU GEMM kernels (wgmma) need Hopper itself (sm_90); the Mosaic GPU quantisation kernels and cuDNN's
fused attention run on Hopper or newer. Tests that trace the GPU code paths on a CPU patch these functions here.
"""

from __future__ import annotations

import re

import jax

__all__ = ["gpu_compute_capability", "is_hopper", "hopper_or_newer", "num_sms"]


def gpu_compute_capability() -> tuple[int, int] | None:
    """``(major, minor)`` of the first device if it is an NVIDIA GPU, else None (CPU, TPU, ROCm, no backend)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return None
    if dev.platform != "gpu":
        return None
    m = re.match(r"(\d+)\.(\d+)", str(getattr(dev, "compute_capability", "") or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def is_hopper() -> bool:
    """The first device is a Hopper GPU (sm_90: H100, H200, H20, GH200)."""
    cc = gpu_compute_capability()
    return cc is not None and cc[0] == 9


def hopper_or_newer() -> bool:
    """The first device is an NVIDIA GPU of compute capability 9.0 or newer."""
    cc = gpu_compute_capability()
    return cc is not None and cc[0] >= 9


def num_sms(default: int = 132) -> int:
    """Streaming multiprocessors of the first device if it is an NVIDIA GPU (``core_count``), else ``default`` (132:
    an H100 SXM / H200, the cards the kernels' tilings were swept on). Kernel tiling rules that size their grids to
    the SM count (split-K, flash-decoding splits) read it here."""
    if gpu_compute_capability() is None:
        return default
    return int(getattr(jax.devices()[0], "core_count", 0) or default)
