"""`python -m experiments.train` as 2 processes (jax.distributed on localhost, gloo CPU collectives) on a global
2 x 1 x 2 x 1 mesh matches the same mesh in one process, step by step. (~40 s on 2 cores: part of the default
suite.)"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = ["--config=tiny", "--set", "steps=3", "--set", "log_every=1", "--set", "tensorboard=false",
            "--set", "progress_bar=false", "--set", "data.batch_size=8", "--set", "data.seq_len=32",
            "--set", "model.num_hidden_layers=2", "--set", "mesh.data=2", "--set", "mesh.expert=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *SETTINGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def test_two_processes_match_one_process(tmp_path):
    port = _free_port()
    procs = [_launch(tmp_path / "two", ["--num_cpu_devices=2", f"--coordinator_address=localhost:{port}",
                                        "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n-----\n".join(o[-3000:] for o in outs)
    assert "over 2 process(es)" in outs[0] and "done: step 3" in outs[0]
    one = _launch(tmp_path / "one", ["--num_cpu_devices=4"])
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out[-3000:]
    assert "over 1 process(es)" in out
    two, ref = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(two) == sorted(ref) == [1, 2, 3]
    for step in ref:
        assert two[step] == pytest.approx(ref[step], rel=1e-5), step
    assert (tmp_path / "two" / "checkpoints" / "3").is_dir()   # both processes wrote their shards of one checkpoint
