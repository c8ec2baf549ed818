"""Which GPU the kernels run on: the one place for the architecture checks behind every ``"auto"`` dispatch.

The Mosaic GPU GEMM kernels (wgmma) need Hopper itself (sm_90); the Mosaic GPU quantisation kernels and cuDNN's
fused attention run on Hopper or newer. Tests that trace the GPU code paths on a CPU patch these functions here.
"""

from __future__ import annotations

import re

import jax

__all__ = ["gpu_compute_capability", "is_hopper", "hopper_or_newer", "num_sms", "resolve_triton"]


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


def resolve_triton(op: str, implementation: str, *, supported: bool, shapes_ok: bool, requirement: str,
                   interpret: bool) -> str:
    """The ``implementation=`` switch of a Pallas Triton op resolved to ``"xla"`` or ``"pallas"``: ``"auto"`` takes
    the kernel where ``supported`` (the op's GPU and shape check); an explicit ``"pallas"`` needs ``shapes_ok``
    (else the error names ``requirement``, what the kernel needs and the inputs got) and a GPU unless
    ``interpret``. ``op`` names the function in the errors."""
    if implementation == "auto":
        return "pallas" if supported else "xla"
    if implementation == "xla":
        return "xla"
    if implementation != "pallas":
        raise ValueError(f"{op}: implementation={implementation!r}; use 'auto', 'xla' or 'pallas'")
    if not shapes_ok:
        raise ValueError(f"{op}(implementation='pallas') needs {requirement}. Fix: implementation='xla' or 'auto'")
    if not interpret and jax.default_backend() != "gpu":
        raise ValueError(f"{op}(implementation='pallas') runs on GPUs (Triton); pass interpret=True to interpret it "
                         f"elsewhere, or use implementation='xla'")
    return "pallas"
