"""RL post-training. For now: the rule-based rewards (:mod:`dsjax.rl.rewards`; no JAX, no model import)."""

from dsjax.rl.rewards import REWARDS, Reward, RewardFn, RewardRegistry, make_rewards, score_batch

__all__ = ["REWARDS", "Reward", "RewardFn", "RewardRegistry", "make_rewards", "score_batch"]
