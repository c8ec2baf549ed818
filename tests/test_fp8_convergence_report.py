"""experiments.fp8_convergence's report over saved runs (docs/fp8_convergence_runs/, the GPU runs behind the
README's FP8 figures): the gaps it prints are the relative differences of the EMA-smoothed losses, recomputed
here from the raw per-step losses, and each FP8 run is labelled with the expert GEMM it ran."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNS = ROOT / "docs" / "fp8_convergence_runs"


def _ema(xs, a=0.98):
    v, out = None, []
    for x in xs:
        v = x if v is None else a * v + (1 - a) * x
        out.append(v)
    return out


def test_report_over_saved_runs_recomputes_the_gaps(tmp_path):
    files = ["bf16_s1.json", "fp8kv_s1.json", "fp8kvg_s1.json"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "experiments.fp8_convergence", "--config=small", "--steps=1000",
                          "--runs=", *[f"--load={RUNS / f}" for f in files], "--eval_batches=16"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    summary = json.loads(out[out.index("{"):out.rindex("}") + 1])
    runs = [next(iter(json.loads((RUNS / f).read_text()).values())) for f in files]
    base = _ema(runs[0]["losses"])
    assert summary["final_smoothed_bf16"] == base[-1]
    labels = [r["label"] for r in summary["fp8_runs"]]
    assert labels[0].endswith("[experts: bf16 GEMM]") and labels[1].endswith("[experts: fp8 GEMM]")
    for row, run in zip(summary["fp8_runs"], runs[1:]):
        gaps = [(o - b) / b for b, o in zip(base, _ema(run["losses"]))]
        tail = gaps[500:]
        assert abs(row["final_rel_gap"] - gaps[-1]) < 1e-12
        assert abs(row["mean_rel_gap_second_half"] - sum(tail) / len(tail)) < 1e-12
        assert abs(row["max_abs_rel_gap_second_half"] - max(map(abs, tail))) < 1e-12
        assert row["eval"] == run["eval"]
    # the README's second-seed figure for the kv setting
    assert round(100 * summary["fp8_runs"][0]["final_rel_gap"], 2) == 0.53


def test_a_load_with_the_wrong_step_count_is_a_usage_error():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "experiments.fp8_convergence", "--steps=999", "--runs=",
                          f"--load={RUNS / 'bf16.json'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "has 1000 steps, --steps=999" in res.stderr
