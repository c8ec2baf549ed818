"""Metric sinks (JSONL source of truth, optional TensorBoard mirror), progress line, peak-FLOPs table."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any

__all__ = ["MetricWriter", "peak_flops_per_device", "Progress"]

# Dense BF16 peak FLOP/s per device (vendor datasheets). MFU is left blank for unknown devices.
_PEAK_BF16 = (
    ("h200", 989e12), ("h100", 989e12), ("h800", 989e12), ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("tpu v6", 918e12), ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v4", 275e12),
)


def peak_flops_per_device(device_kind: str, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key, flops in _PEAK_BF16:
        if key in kind:
            return flops
    return None


class MetricWriter:
    """Appends one JSON object per step to ``metrics.jsonl``; mirrors scalars to TensorBoard if available.

    On resume (``start_step > 0``) lines of steps after ``start_step`` -- written after the last checkpoint by the
    interrupted run -- are dropped so the file describes the run that continues; a copy of the original is kept as
    ``metrics.jsonl.bak``.
    """

    def __init__(self, workdir: pathlib.Path, *, start_step: int = 0, tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if start_step > 0 and self.path.exists():
            lines = self.path.read_text().splitlines()
            keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            if len(keep) != len(lines):
                (workdir / "metrics.jsonl.bak").write_text("\n".join(lines) + "\n")
                self.path.write_text("".join(ln + "\n" for ln in keep))
        elif start_step == 0 and self.path.exists():
            self.path.rename(workdir / "metrics.jsonl.old")
        self._file = open(self.path, "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                self._tb = None

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, float) or hasattr(v, "item") else v) for k, v in scalars.items()}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in clean.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


class Progress:
    """A tqdm bar (step, loss, tokens/s, MFU, ETA) or, without a terminal, nothing."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr,
                                 disable=not sys.stderr.isatty())
            except ImportError:
                self._bar = None

    @property
    def active(self) -> bool:
        """True when a bar is drawn (a terminal is attached); otherwise the loop prints log lines."""
        return self._bar is not None and not self._bar.disable

    def update(self, n: int, postfix: dict[str, str]) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
