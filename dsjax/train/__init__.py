"""Training: configs, losses, optimiser, the pure train step and the host loop (``run``)."""

from dsjax.train.config import (BalanceConfig, CheckpointConfig, LossConfig, OptimConfig, TrainConfig,
                                apply_overrides)
from dsjax.train.losses import chunked_cross_entropy, shifted_targets, token_log_probs
from dsjax.train.optim import make_optimizer, make_schedule
from dsjax.train.step import (TrainState, abstract_state, flops_per_token, init_state, make_train_step, split_model,
                              state_from_model)

__all__ = [
    "BalanceConfig", "CheckpointConfig", "LossConfig", "OptimConfig", "TrainConfig", "apply_overrides",
    "chunked_cross_entropy", "shifted_targets", "token_log_probs", "make_optimizer", "make_schedule", "TrainState",
    "abstract_state", "flops_per_token", "init_state", "make_train_step", "split_model", "state_from_model", "run",
    "TrainingAborted",
]


def __getattr__(name):
    # the loop pulls in data + checkpoint code; import it on first use
    if name in ("run", "TrainingAborted", "load_params_from_workdir"):
        from dsjax.train import loop

        return getattr(loop, name)
    raise AttributeError(name)
