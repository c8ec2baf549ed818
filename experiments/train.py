"""Pretraining / SFT launcher.

    python -m experiments.train                                   # the embedded default: tiny on stdlib sources
    python -m experiments.train --config=small --workdir=/tmp/small --set optim.learning_rate=5e-4
    python -m experiments.train --config=experiments/configs/my_run.py --set data.paths=/data/*.jsonl

``--config`` is a preset name (dsjax.train.config.names()) or a .py file defining ``get_config() -> TrainConfig``.
``--set key.sub=value`` (repeatable) overrides fields with type checking; unknown keys are errors. A workdir that
holds checkpoints is resumed.

Several devices / processes (see README, "Parallelism"): ``--set mesh.data=-1`` (or ``mesh.fsdp``, ``mesh.expert``,
``mesh.tensor``) lays the run out on a mesh. Several processes (hosts) join through ``jax.distributed``:
``--distributed`` detects SLURM / Open MPI / TPU / Kubernetes clusters from their environment variables;
``--coordinator_address=host:port --num_processes=N --process_id=i`` names them explicitly.

    python -m experiments.train --set mesh.data=-1                                   # all local GPUs, data parallel
    srun python -m experiments.train --distributed --config=small --set mesh.expert=8 --set mesh.data=-1
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Training preset name or path to a .py file with get_config().")
flags.DEFINE_multi_string("set", [], "Override, e.g. --set optim.learning_rate=1e-3 (repeatable).")
flags.DEFINE_string("workdir", None, "Run directory (config.json, checkpoints/, metrics.jsonl, tensorboard/). "
                    "Default: workdirs/<config name>.")
flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the cluster environment (SLURM, Open MPI, "
                  "TPU pods, Kubernetes).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process without a cluster manager).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("num_cpu_devices", None, "CPU only: number of (fake) CPU devices per process, for testing "
                     "meshes without accelerators.")


def init_devices() -> None:
    """CPU device count and ``jax.distributed`` (before anything touches a JAX backend)."""
    import jax

    if FLAGS.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    if FLAGS.coordinator_address or FLAGS.distributed:
        # CPU collectives across processes need gloo (XLA:CPU's default has none); GPUs/TPUs ignore this option
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if FLAGS.coordinator_address:
            jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                       num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
        else:
            jax.distributed.initialize()


def load_config(spec: str, overrides: list[str]):
    from dsjax.train import config as tc

    if spec.endswith(".py"):
        path = pathlib.Path(spec)
        if not path.exists():
            raise app.UsageError(f"--config={spec}: no such file")
        mod_spec = importlib.util.spec_from_file_location("dsjax_user_config", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise app.UsageError(f"--config={spec}: the file must define get_config() -> TrainConfig")
        cfg = module.get_config()
    else:
        cfg = tc.get(spec)
    return tc.apply_overrides(cfg, overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.verbosity == 0:  # keep Orbax/JAX INFO chatter out of the progress output unless -v is given
        logging.set_verbosity(logging.WARNING)
    init_devices()
    import jax

    from dsjax.configs import ConfigError
    from dsjax.train import config as tc
    from dsjax.train.loop import run

    try:
        cfg = load_config(FLAGS.config, FLAGS.set)
    except (ConfigError, ValueError) as e:  # config and data-config validation errors
        raise app.UsageError(str(e)) from None
    if FLAGS.print_config:
        print(json.dumps(tc.to_dict(cfg), indent=2))
        return
    name = pathlib.Path(FLAGS.config).stem if FLAGS.config.endswith(".py") else FLAGS.config
    workdir = pathlib.Path(FLAGS.workdir or f"workdirs/{name}")
    logging.info("jax %s, %d process(es), devices %s", jax.__version__, jax.process_count(), jax.devices())
    if jax.process_index() == 0:
        print(f"dsjax train: config {FLAGS.config!r}, workdir {workdir}, {jax.device_count()} {jax.devices()[0].platform} "
              f"device(s); model {cfg.model.num_hidden_layers} layers / {cfg.model.n_routed_experts} experts, "
              f"data {cfg.data.source} T={cfg.data.seq_len} B={cfg.data.batch_size}, {cfg.steps} steps", flush=True)
    main_process = jax.process_index() == 0
    summary = run(cfg, workdir, log_fn=lambda s: print(s, flush=True) if main_process else None)
    last = summary.get("last", {})
    if jax.process_index() == 0 and last:
        print(f"done: step {summary['end_step']}, loss {last.get('loss', float('nan')):.4f}; metrics in "
              f"{workdir / 'metrics.jsonl'}", flush=True)


if __name__ == "__main__":
    app.run(main)
