"""Plots a run's curves to PNG: loss (CE / MTP), balance loss, expert load and routing-bias spread.

    python -m experiments.plot --workdir=workdirs/tiny [--out=workdirs/tiny/curves.png]
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory holding metrics.jsonl.", required=True)
flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/curves.png).")


def load_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        raise app.UsageError(f"{path} does not exist. Fix: pass the --workdir of a training run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = pathlib.Path(FLAGS.workdir)
    rows = load_metrics(workdir)
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key) for r in rows]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(steps, series("loss"), label="total loss")
    ax.plot(steps, series("ce"), label="next-token CE")
    for k in sorted({k for r in rows for k in r if k.startswith("mtp_loss_")}):
        ax.plot(steps, series(k), label=k.replace("_", " "))
    ax.set_title("loss")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[0][1]
    ax.plot(steps, series("balance_loss"))
    ax.set_title("sequence-wise balance loss (alpha included)")
    ax.set_xlabel("step")
    ax = axes[1][0]
    for k in ("load_max", "load_max_mean", "load_min_mean"):
        if any(v is not None for v in series(k)):
            ax.plot(steps, series(k), label=k)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set_title("expert load / mean")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[1][1]
    if any(v is not None for v in series("bias_spread")):
        ax.plot(steps, series("bias_spread"))
    ax.set_title("routing-bias spread (max - min)")
    ax.set_xlabel("step")
    fig.tight_layout()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else workdir / "curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
