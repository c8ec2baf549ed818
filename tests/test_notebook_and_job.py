"""The quick-start notebook and the default job run end to end (CI executes both)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _execute_notebook(name: str) -> str:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    env_platform = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT)}}).execute()
    finally:
        if env_platform is None:
            os.environ.pop("JAX_PLATFORMS", None)
        else:
            os.environ["JAX_PLATFORMS"] = env_platform
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return "".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                   for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_quickstart_notebook_executes():
    outputs = _execute_notebook("quickstart.ipynb")
    assert "max |absorbed - naive|" in outputs and "deepseek-v3" in outputs


def test_grpo_notebook_executes():
    outputs = _execute_notebook("grpo.ipynb")
    assert "held-out greedy 'digits' reward:" in outputs and "accepted " in outputs and "entropy" in outputs


def test_default_job_runs():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "experiments.main", "--config=tiny", "--seq_len=16"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "total_with_mtp" in res.stdout and "forward (2, 16) -> logits (2, 16, 512)" in res.stdout
    big = subprocess.run([sys.executable, "-m", "experiments.main", "--config=deepseek-v3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert big.returncode == 0, big.stderr[-3000:]
    assert "671,026,404,352" in big.stdout and "skipping the forward pass" in big.stdout


def test_main_training_job_runs(tmp_path):
    """The README's main job (experiments.train with its defaults), shortened to 40 steps for CI."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    wd = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={wd}", "--set=steps=40",
                          "--set=log_every=10"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step 40/40" in res.stdout and "done: step 40" in res.stdout
    import json

    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[-1]["loss"] < rows[0]["loss"] - 1.0, (rows[0]["loss"], rows[-1]["loss"])
    assert (wd / "config.json").exists() and list((wd / "tensorboard").glob("events.*"))
    assert (wd / "checkpoints" / "40").exists()
    again = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={wd}", "--set=steps=40"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_r1_pipeline_runs_end_to_end(tmp_path):
    """experiments.r1 (pretrain -> SFT -> GRPO -> rejection sampling), every stage shortened to a step or two."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    wd = tmp_path / "r1"
    cmd = [sys.executable, "-m", "experiments.r1", "--preset=cpu", f"--workdir={wd}", "--pre_steps=3",
           "--sft_steps=2", "--grpo_steps=2", "--prompts=2", "--G=2", "--eval_examples=4", "--rejection_prompts=2",
           "--grpo_time_limit_min=0"]
    # a time limit of 0 stops GRPO after its first step; the same command again resumes every stage and finishes
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "GRPO stopped at step 1 of 2" in res.stdout and not (wd / "r1_report.md").exists()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed GRPO" in res.stdout and "already complete" in res.stdout + res.stderr
    report = (wd / "r1_report.md").read_text()
    for stage in ("| pretrained |", "| SFT |", "| GRPO |", "Rejection sampling (2 samples x 2 new prompts"):
        assert stage in report, report
    assert "Sampled reward (mean over the first / last" in report or "Reward trend: too few" in report
    assert (wd / "r1_curves.png").stat().st_size > 0 and (wd / "rejection_sampled.jsonl").exists()
    assert len((wd / "grpo_metrics.jsonl").read_text().splitlines()) == 2
    # a wall-clock budget (here spent before GRPO starts): GRPO runs one step without checkpoints, then the run
    # evaluates and reports anyway, per operator too
    budget = [c for c in cmd if not c.startswith(("--grpo_time_limit_min", "--rejection_prompts", "--grpo_steps"))]
    res = subprocess.run(budget + ["--time_budget_min=0", "--grpo_steps=3", "--rejection_prompts=0"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = (wd / "r1_report.md").read_text()
    assert "GRPO: 1 of 3 steps" in report and "stopped by the time budget" in report, report
    assert "| accuracy + |" in report and "resumed GRPO" not in res.stdout, report
