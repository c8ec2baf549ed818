"""SFT launcher: prompt/completion JSONL, loss on completion tokens only.

    python -m experiments.sft --data=/path/sft.jsonl --init_from=workdirs/tiny --workdir=workdirs/sft
    python -m experiments.sft --data=/path/*.jsonl --init_from=/path/to/hf-folder --config=sft-tiny

Same machinery as experiments.train (``--set`` overrides too); the data source is forced to ``sft``.
"""

from __future__ import annotations

import pathlib

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "sft-tiny", "Training preset or .py config file.")
flags.DEFINE_multi_string("data", [], "Prompt/completion JSONL file(s) or glob(s).")
flags.DEFINE_string("init_from", None, "dsjax workdir or HF folder with the starting weights.")
flags.DEFINE_multi_string("set", [], "Overrides key.sub=value.")
flags.DEFINE_string("workdir", "workdirs/sft", "Run directory.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    from dsjax.configs import ConfigError
    from dsjax.train import config as tc
    from dsjax.train.loop import run
    from experiments.train import load_config

    try:
        cfg = load_config(FLAGS.config, FLAGS.set)
        data = dataclasses.replace(cfg.data, source="sft", paths=tuple(FLAGS.data) or cfg.data.paths)
        cfg = dataclasses.replace(cfg, data=data, init_from=FLAGS.init_from or cfg.init_from)
    except (ConfigError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    summary = run(cfg, pathlib.Path(FLAGS.workdir), log_fn=lambda s: print(s, flush=True))
    print(f"done: step {summary['end_step']}, loss {summary.get('last', {}).get('loss', float('nan')):.4f}")
    del tc


if __name__ == "__main__":
    app.run(main)
