"""The training loop: readable host code around the pure step. Fork it.

Start-up order (the order matters for exact resume):

1. write ``workdir/config.json``; build the abstract train state;
2. if ``workdir/checkpoints`` holds a checkpoint: check it matches, restore state + data-iterator state;
   otherwise initialise (or start from ``init_from``);
3. **then** build the Grain iterator and move it to the restored position;
4. loop: ``batch = next(it)`` -> ``state, metrics = train_step(state, batch)`` (async dispatch; metrics stay on
   device and are fetched every ``log_every`` steps) -> checkpoint every ``checkpoint.every`` steps.

A step with a non-finite loss or gradient norm is skipped inside the step; after ``max_consecutive_skips`` in a row
the loop raises :class:`TrainingAborted` without writing a checkpoint. SIGTERM / SIGINT finish the current step,
save, and return.
"""

from __future__ import annotations

import json
import logging
import pathlib
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dsjax
from dsjax.checkpoint import Checkpointer
from dsjax.data import check_vocab, make_dataset, make_tokenizer
from dsjax.model import Transformer
from dsjax.train import config as train_config
from dsjax.train.config import TrainConfig
from dsjax.train import parallel
from dsjax.train.metrics import MetricWriter, Progress, peak_flops_per_device
from dsjax.train.step import (TrainState, abstract_state, flops_per_token, init_state, make_train_step,
                              split_model, state_from_model)

__all__ = ["run", "TrainingAborted", "load_params_from_workdir"]

log = logging.getLogger("dsjax.train")
BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps (or another unrecoverable training condition)."""


def _meta(cfg: TrainConfig, step: int, plan=None) -> dict[str, Any]:
    import flax
    import optax

    return {"step": step, "config": train_config.to_dict(cfg), "dsjax": dsjax.__version__, "jax": jax.__version__,
            "flax": flax.__version__, "optax": optax.__version__, "process_count": jax.process_count(),
            "devices": [str(d) for d in jax.devices()], "mesh": plan.describe() if plan is not None else None}


@jax.jit
def _all_finite(leaves) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _tree_all_finite(tree) -> bool:
    """One device reduction over all floating leaves (compiled once, reused at every checkpoint)."""
    return bool(_all_finite([x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]))


def load_params_from_workdir(workdir: str | pathlib.Path) -> tuple[TrainConfig, Transformer]:
    """The model of the latest checkpoint of a dsjax workdir (for SFT / evaluation / generation)."""
    workdir = pathlib.Path(workdir)
    cfg = train_config.from_dict(json.loads((workdir / "config.json").read_text()))
    ckpt = Checkpointer(workdir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}. Fix: train first or pass an HF folder")
    state, _, _ = ckpt.restore(step, abstract_state(cfg))
    ckpt.close()
    graphdef, p, r = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(p, state.params)
    nnx.replace_by_pure_dict(r, state.rest)
    return cfg, nnx.merge(graphdef, p, r)


def _initial_state(cfg: TrainConfig, plan=None) -> TrainState:
    if cfg.init_from:
        src = pathlib.Path(cfg.init_from)
        if (src / "checkpoints").exists():
            src_cfg, model = load_params_from_workdir(src)
        elif (src / "config.json").exists():
            model = dsjax.load_hf(src, dtype=jnp.dtype(cfg.model.param_dtype), compute_dtype=cfg.model.dtype,
                                  scan_layers=cfg.model.scan_layers, remat_policy=cfg.model.remat_policy,
                                  plan=plan)
        else:
            raise FileNotFoundError(f"init_from={cfg.init_from!r} is neither a dsjax workdir nor an HF folder")
        state = state_from_model(cfg, model)
        want = jax.tree.map(lambda x: x.shape, abstract_state(cfg).params)
        have = jax.tree.map(lambda x: x.shape, state.params)
        if want != have:
            raise ValueError(f"init_from={cfg.init_from!r}: its model does not match config.model. Fix: use the "
                             f"same model config as the source")
        return state if plan is None else jax.device_put(state, parallel.state_shardings(cfg, plan))
    if plan is not None:
        return parallel.init_state_sharded(cfg, jax.random.key(cfg.seed), plan)
    return jax.jit(init_state, static_argnums=0)(cfg, jax.random.key(cfg.seed))


def run(cfg: TrainConfig, workdir: str | pathlib.Path, *, log_fn=print) -> dict[str, Any]:
    """Trains ``cfg`` in ``workdir`` (resuming if it holds checkpoints). Returns a summary dict."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    if main:
        (workdir / "config.json").write_text(json.dumps(train_config.to_dict(cfg), indent=2))

    plan = parallel.plan_for(cfg)  # None on one device: the plain single-device path
    if plan is None and jax.process_count() > 1:
        raise ValueError(f"{jax.process_count()} processes but no mesh. Fix: --set mesh.data=-1 (or another "
                         f"data/fsdp/expert/tensor split of the {jax.device_count()} devices)")
    if plan is not None:
        log_fn(f"mesh {dict(plan.mesh.shape)} over {jax.process_count()} process(es), rules {plan.config.rules!r}")
    ckpt = Checkpointer(workdir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    target = abstract_state(cfg) if plan is None else parallel.abstract_state_sharded(cfg, plan)
    latest = ckpt.latest_step()
    data_state = None
    if latest is not None:
        state, data_state, _ = ckpt.restore(latest, target)
        start = int(latest)
        log_fn(f"resumed from {workdir / 'checkpoints' / str(latest)} (step {start})")
    else:
        state = _initial_state(cfg, plan)
        start = 0

    # Data comes after the restore so that it starts exactly where the checkpoint left it.
    tokenizer = make_tokenizer(cfg.data)
    check_vocab(tokenizer, cfg.model.vocab_size)
    if plan is None:
        it = iter(make_dataset(cfg.data, tokenizer))
    else:  # every process reads the whole global batch (same stream, and iterator state, for any process count);
        it = iter(make_dataset(cfg.data, tokenizer, process_index=0, process_count=1))  # put_batch keeps its rows
    if data_state and start < cfg.steps:   # a finished run needs no data (and may have moved: absolute paths)
        it.set_state(data_state)

    graphdef, params_t, rest_t = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
    if plan is None:
        step_fn = jax.jit(make_train_step(cfg, graphdef, params_t, rest_t), donate_argnums=0)
    else:
        step_fn = parallel.jit_train_step(cfg, plan, graphdef, params_t, rest_t)

    writer = MetricWriter(workdir, start_step=start, tensorboard=cfg.tensorboard, enabled=main)
    progress = Progress(cfg.steps, start, enabled=main and cfg.progress_bar)
    fpt = flops_per_token(cfg)
    dev = jax.devices()[0]
    peak = peak_flops_per_device(dev.device_kind, cfg.peak_tflops)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    t_last = None
    compile_s = None
    steps_timed = 0
    last_metrics: dict[str, float] = {}
    summary: dict[str, Any] = {"start_step": start, "workdir": str(workdir)}

    def flush(step: int) -> None:
        nonlocal t_last, steps_timed, last_metrics
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        tps = mfu = None
        if t_last is not None and steps_timed:
            dt = now - t_last
            tps = steps_timed * tokens_per_step / dt
            mfu = fpt * tps / (peak * jax.device_count()) if peak else None
        for (s, _), m in zip(pending, fetched):
            row = {k: (v.item() if hasattr(v, "item") else v) for k, v in m.items()}
            if s == step:
                row["tokens_per_s"] = tps
                row["mfu"] = mfu
                if compile_s is not None and s == start + 1:
                    row["compile_s"] = compile_s
            writer.write(s, row)
            last_metrics = row
        writer.flush()
        pending.clear()
        t_last, steps_timed = now, 0
        post = {"loss": f"{last_metrics['loss']:.3f}"}
        if tps:
            post["tok/s"] = f"{tps:,.0f}"
        if mfu:
            post["MFU"] = f"{100 * mfu:.1f}%"
        progress.update(0, post)
        if not progress.active:
            eta = ""
            if tps:
                eta = f", ETA {(cfg.steps - step) * tokens_per_step / tps:,.0f}s"
            log_fn(f"step {step}/{cfg.steps}: loss {last_metrics['loss']:.4f}"
                   + (f", {tps:,.0f} tokens/s" if tps else "") + (f", MFU {100 * mfu:.1f}%" if mfu else "")
                   + f", skipped {int(last_metrics['skipped_total'])}{eta}")
        if int(last_metrics["consecutive_skips"]) >= cfg.max_consecutive_skips:
            raise TrainingAborted(
                f"{int(last_metrics['consecutive_skips'])} consecutive steps had a non-finite loss or gradient norm "
                f"(last: loss={last_metrics['loss']}, grad_norm={last_metrics['grad_norm']}) at step {step}. "
                f"No checkpoint was written for them; the last good one is {ckpt.latest_step()}. Fix: lower "
                f"optim.learning_rate, check the data, or raise max_consecutive_skips.")

    if start >= cfg.steps:
        log_fn(f"{workdir} is already complete ({start}/{cfg.steps} steps); raise --set steps=... to continue "
               f"or use a new --workdir")
    t_start = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            try:
                batch = next(it)
            except StopIteration:
                log_fn(f"data exhausted after {step} steps (data.num_epochs={cfg.data.num_epochs})")
                break
            if plan is None:
                batch = {k: jnp.asarray(np.asarray(batch[k], np.int32)) for k in BATCH_KEYS}
            else:  # every process reads the same global batch and hands over its own devices' rows
                batch = parallel.put_batch({k: batch[k] for k in BATCH_KEYS}, plan)
            state, metrics = step_fn(state, batch)
            pending.append((step + 1, metrics))
            if step == start:  # first step = compile + run: report it separately, time the rest from here
                jax.block_until_ready(metrics["loss"])
                t_last = time.perf_counter()
                compile_s = t_last - t_start
                steps_timed = 0
            else:
                steps_timed += 1
            progress.update(1, {})
            signum = stop["signal"]  # read once: a signal arriving later is handled after the next step
            done = step + 1 == cfg.steps or signum is not None
            due = (step + 1) % cfg.checkpoint.every == 0 or done
            if (step + 1) % cfg.log_every == 0 or due:
                flush(step + 1)
            saved = False
            if due and int(last_metrics.get("consecutive_skips", 0)) == 0:
                if _tree_all_finite(state.params):
                    saved = ckpt.save(step + 1, state, it.get_state(), _meta(cfg, step + 1, plan), force=done)
                else:
                    log_fn(f"step {step + 1}: parameters are not finite; checkpoint NOT written")
            if signum is not None:
                log_fn(f"received signal {signum}: " + (f"saved step {step + 1}, " if saved else
                                                        "no checkpoint written for this step, ") + "stopping")
                break
    finally:
        ckpt.close()
        writer.close()
        progress.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    summary.update(end_step=int(jax.device_get(state.step)), last=last_metrics)
    return summary
