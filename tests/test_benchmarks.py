"""The benchmark scripts' own behaviour on the CPU (their numbers come from GPU runs, docs/benchmarks.md)."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_bench_decode_writes_its_table_when_hf_times_out():
    """A device call once lost bench_decode's whole table because HF's batch-32 generate outlived the call: an HF
    subprocess that exceeds --hf_timeout_s now gives a 'timed out' row, and the table is still printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "experiments.bench_decode", "--config=tiny", "--batch_sizes=1",
                          "--prompt_len=8", "--new_tokens=4", "--repeats=1", "--hf", "--hf_timeout_s=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| ")]
    assert any(ln.startswith("| dsjax | 1 |") for ln in rows), res.stdout
    assert "| HF transformers | 1 | error: timed out after 0 s |" in res.stdout


def test_bench_decode_skips_rows_past_stop_s_and_still_writes_the_table():
    """--stop_s: rows not started by then are skipped (named in the table), so a run near its device call's limit
    still prints (and with --record, appends) what it measured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "experiments.bench_decode", "--config=tiny", "--batch_sizes=1,2",
                          "--prompt_len=8", "--new_tokens=4", "--repeats=1", "--hf", "--stop_s=0"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    for impl in ("dsjax", "HF transformers"):
        for b in (1, 2):
            assert f"| {impl} | {b} | error: skipped: --stop_s=0 reached |" in res.stdout, res.stdout


def test_kernel_timer_reads_a_trace_and_is_nan_without_a_gpu():
    """experiments.timing.kernel_us_per_call traces the calls and sums device 0's GPU kernels: on the CPU the trace
    has no GPU plane, so it reports NaN rather than a made-up time."""
    import math

    import jax.numpy as jnp

    from experiments.timing import kernel_us_per_call

    assert math.isnan(kernel_us_per_call(lambda x: x * 2, jnp.ones(8), iters=2))
