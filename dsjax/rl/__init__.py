"""RL post-training: rule-based rewards (:mod:`dsjax.rl.rewards`, no JAX, no model import), the GRPO loss and
update (:mod:`dsjax.rl.grpo`) and the training loop (:mod:`dsjax.rl.trainer`, imported lazily)."""

from dsjax.rl.rewards import REWARDS, Reward, RewardFn, RewardRegistry, make_rewards, score_batch

__all__ = ["REWARDS", "Reward", "RewardFn", "RewardRegistry", "make_rewards", "score_batch", "GRPOConfig",
           "GRPOTrainer", "group_advantages", "make_grpo_step", "greedy_accuracy",
           "rejection_sample", "RejectionStats"]


def __getattr__(name):
    if name in ("GRPOConfig", "group_advantages", "make_grpo_step", "deepseekmath", "r1_zero"):
        from dsjax.rl import grpo

        return getattr(grpo, name)
    if name in ("GRPOTrainer", "greedy_accuracy"):
        from dsjax.rl import trainer

        return getattr(trainer, name)
    if name in ("rejection_sample", "RejectionStats"):
        from dsjax.rl import rejection

        return getattr(rejection, name)
    raise AttributeError(name)
