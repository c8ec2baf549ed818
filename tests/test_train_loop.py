"""The host loop end to end on CPU: determinism, exact resume after SIGKILL, SIGTERM, aborts, bad inputs."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from dsjax.checkpoint import Checkpointer, CheckpointMismatchError, CheckpointReadError
from dsjax.data import DataError
from dsjax.train import config as tc
from dsjax.train.loop import TrainingAborted, run

ROOT = pathlib.Path(__file__).resolve().parent.parent
FAST = ["model.num_hidden_layers=2", "data.seq_len=32", "data.batch_size=4", "log_every=1", "tensorboard=false",
        "progress_bar=false", "optim.warmup_steps=2"]


def _cfg(*extra):
    return tc.apply_overrides(tc.tiny(), FAST + list(extra))


def _losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["data_checksum"]) for r in rows}


def test_two_identical_runs_are_bitwise_identical(tmp_path):
    cfg = _cfg("steps=6", "checkpoint.every=3")
    run(cfg, tmp_path / "a", log_fn=lambda s: None)
    run(cfg, tmp_path / "b", log_fn=lambda s: None)
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == 6 and a == b


def _launch(workdir, steps, every, extra=()):
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", f"--set=steps={steps}",
           f"--set=checkpoint.every={every}"] + [f"--set={s}" for s in FAST + list(extra)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def test_exact_resume_after_sigkill(tmp_path):
    steps, every = 16, 4
    straight = _launch(tmp_path / "straight", steps, every)
    rc, out = _finish(straight)
    assert rc == 0, out[-3000:]

    killed = tmp_path / "killed"
    proc = _launch(killed, steps, every)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "8").exists():  # a complete checkpoint (Orbax renames tmp dirs at the end)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out = _finish(_launch(killed, steps, every))
    assert rc == 0, out[-3000:]
    assert "resumed from" in out
    a, b = _losses(tmp_path / "straight"), _losses(killed)
    assert sorted(a) == list(range(1, steps + 1)) and sorted(b) == sorted(a)
    for s in a:  # bitwise: same loss, same batch (no batch repeated or skipped)
        assert a[s] == b[s], (s, a[s], b[s])


def test_sigterm_saves_and_stops(tmp_path):
    proc = _launch(tmp_path / "w", 400, 1000)
    deadline = time.time() + 600
    while not (tmp_path / "w" / "metrics.jsonl").exists() or \
            len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 0, out[-2000:]
    assert "received signal" in out
    steps = Checkpointer(tmp_path / "w" / "checkpoints").all_steps()
    assert len(steps) == 1 and 3 <= steps[0] < 400


def test_consecutive_nonfinite_steps_abort_without_checkpoint(tmp_path):
    cfg = _cfg("steps=40", "checkpoint.every=2", "optim.learning_rate=1e12", "optim.clip_norm=0",
               "optim.warmup_steps=0", "max_consecutive_skips=3")
    with pytest.raises(TrainingAborted, match="3 consecutive steps had a non-finite"):
        run(cfg, tmp_path, log_fn=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_bad = min(r["step"] for r in rows if r["skipped"])
    saved = Checkpointer(tmp_path / "checkpoints").all_steps()
    assert all(s < first_bad for s in saved), (saved, first_bad)


def test_bad_inputs_give_clear_errors_and_destroy_nothing(tmp_path):
    with pytest.raises(DataError, match="nothing.txt"):
        run(_cfg("steps=2", "data.source=text", f"data.paths={tmp_path / 'nothing.txt'}"), tmp_path / "a",
            log_fn=lambda s: None)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        run(_cfg("steps=2", "data.source=text", f"data.paths={tmp_path / 'empty.txt'}"), tmp_path / "b",
            log_fn=lambda s: None)
    # a tokenizer with more ids than the model's vocabulary
    with pytest.raises(DataError, match="vocab"):
        run(_cfg("steps=2", "model.vocab_size=200"), tmp_path / "c", log_fn=lambda s: None)
    # a corrupt checkpoint directory: clear error, nothing deleted
    junk = tmp_path / "d" / "checkpoints" / "5"
    junk.mkdir(parents=True)
    (junk / "state").write_text("not a checkpoint")
    with pytest.raises((CheckpointReadError, CheckpointMismatchError)):
        run(_cfg("steps=2"), tmp_path / "d", log_fn=lambda s: None)
    assert (junk / "state").read_text() == "not a checkpoint"
    # a checkpoint of another model: the message lists the mismatched paths and shapes
    run(_cfg("steps=2", "checkpoint.every=2"), tmp_path / "e", log_fn=lambda s: None)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)shape params/embed_tokens/embedding: checkpoint "
                                                      r"\(512, 64\) vs model \(512, 32\)"):
        run(_cfg("steps=4", "model.hidden_size=32"), tmp_path / "e", log_fn=lambda s: None)
    assert Checkpointer(tmp_path / "e" / "checkpoints").all_steps() == [2]


def test_checkpointer_keeps_last_k_and_ignores_tmp(tmp_path):
    import jax.numpy as jnp

    ck = Checkpointer(tmp_path, every=1, keep=2, async_save=False)
    for s in range(1, 5):
        ck.save(s, {"w": jnp.full((3,), float(s))}, {"next_index": s}, {"step": s})
    ck.wait()
    (tmp_path / "9.orbax-checkpoint-tmp-1234").mkdir()  # a half-written save from a crashed process
    ck2 = Checkpointer(tmp_path, every=1, keep=2)
    assert ck2.all_steps() == [3, 4] and ck2.latest_step() == 4
    state, data, meta = ck2.restore(4, {"w": jnp.zeros((3,))})
    assert float(state["w"][0]) == 4.0 and data == {"next_index": 4} and meta["step"] == 4
    ck.close()
    ck2.close()


def test_launcher_rejects_unknown_keys_and_plot_works(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "experiments.train", "--set=optim.lr=1", f"--workdir={tmp_path}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "unknown key 'lr'" in res.stderr
    assert not (tmp_path / "checkpoints").exists()
    run(_cfg("steps=3"), tmp_path / "p", log_fn=lambda s: None)
    res = subprocess.run([sys.executable, "-m", "experiments.plot", f"--workdir={tmp_path / 'p'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "p" / "curves.png").stat().st_size > 10_000


def test_sft_trains_on_completions_only(tmp_path):
    from dsjax.data.synthetic import write_arithmetic_jsonl

    path = tmp_path / "sft.jsonl"
    write_arithmetic_jsonl(path, 200, seed=0)
    pre = tmp_path / "pre"
    run(_cfg("steps=3", "checkpoint.every=3"), pre, log_fn=lambda s: None)
    cfg = tc.apply_overrides(tc.sft_tiny(), FAST + ["steps=4", "data.source=sft", f"data.paths={path}",
                                                          f"init_from={pre}"])
    summary = run(cfg, tmp_path / "sft", log_fn=lambda s: None)
    assert summary["end_step"] == 4
    rows = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    # fewer targets than tokens: prompts are masked out of the loss
    assert all(r["tokens"] < 4 * 32 * 0.8 for r in rows)


def test_finished_run_reopens_after_its_data_moved(tmp_path):
    """A finished run (checkpoint at ``steps``) needs no data: re-running it from a copied workdir whose data file
    moved (the iterator fingerprint holds the absolute path) returns at once instead of failing on the iterator."""
    import shutil

    (tmp_path / "a").mkdir()
    for i in range(8):                                            # one document per file
        (tmp_path / "a" / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog\n" * 50)
    run(_cfg("steps=2", "checkpoint.every=2", "data.source=text", f"data.paths={tmp_path / 'a' / '*.txt'}"),
        tmp_path / "a" / "work", log_fn=lambda s: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    logs = []
    summary = run(_cfg("steps=2", "checkpoint.every=2", "data.source=text",
                       f"data.paths={tmp_path / 'b' / '*.txt'}"), tmp_path / "b" / "work", log_fn=logs.append)
    assert summary["start_step"] == 2 and any("resumed" in s for s in logs)
    assert Checkpointer(tmp_path / "b" / "work" / "checkpoints").all_steps() == [2]
