"""GRPO training loop: rollouts with ``dsjax.generate``, host-side rewards, advantages, jitted updates.

One step:

1. take ``prompts_per_step`` examples (dicts with ``"prompt"`` and whatever the rewards read, e.g. ``"answer"``);
2. sample G completions per prompt (groups contiguous) at ``cfg.temperature``;
3. score them on the host (:func:`dsjax.rl.rewards.score_batch`, thread pool, per-call timeout); with
   ``dynamic_sampling`` drop groups whose rewards all agree and refill from new prompts (a few tries);
4. advantages per group; old-policy and reference log-probs once per rollout (jitted forwards);
5. ``mu`` passes of ``minibatches`` optimizer updates (:func:`dsjax.rl.grpo.make_grpo_step`).

Metrics per step: rewards (mean/std/min/max, per function), accuracy and format rates when those rewards are used,
``frac_reward_zero_std`` -- all over every completion sampled in the step (with dynamic sampling the trained groups
are a biased subset: their mean is ``reward_mean_trained``) --, completion lengths and truncation ratio, KL, clip
fractions, ratio stats, policy/KL loss, grad norm, lr, rollout and train tokens/s and the time split (rollout /
reference / train / reward).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.inference import SamplingConfig, generate_tokens, pad_prompts, speculative_generate_tokens
from dsjax.model import Transformer
from dsjax.rl.grpo import GRPOConfig, GRPOState, completion_arrays, group_advantages, make_grpo_step
from dsjax.train.config import OptimConfig
from dsjax.train.step import split_model

__all__ = ["GRPOTrainer", "greedy_accuracy"]


def _reward_metrics(rolled: list, g: int) -> dict[str, float]:
    """Reward and completion statistics over every completion sampled in a step (``rolled``: ``(scores, lengths,
    truncated)`` per rollout batch): an unbiased estimate of the policy's reward. Dynamic sampling trains only on
    groups whose rewards differ, so the trained batch's statistics stay mid-range by construction (all-correct
    groups are dropped) and cannot show improvement; the caller reports that mean as ``reward_mean_trained``."""
    every = {k: np.concatenate([r[0][k] for r in rolled]) for k, v in rolled[0][0].items() if isinstance(v, np.ndarray)}
    total = every["total"]
    lens, trunc = np.concatenate([r[1] for r in rolled]), np.concatenate([r[2] for r in rolled])
    out = {"reward_mean": float(total.mean()), "reward_std": float(total.std()), "reward_min": float(total.min()),
           "reward_max": float(total.max()), "frac_reward_zero_std": float((total.reshape(-1, g).std(1) == 0).mean()),
           "rollout_batches": float(len(rolled)), "completion_len_mean": float(lens.mean()),
           "completion_len_min": float(lens.min()), "completion_len_max": float(lens.max()),
           "truncated_ratio": float(trunc.mean())}
    for k, v in every.items():
        if k != "total":
            out[f"reward/{k}"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return out


def _tok_prompt(tokenizer, text: str) -> list[int]:
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)


def greedy_accuracy(model: Transformer, tokenizer, examples: Sequence[dict], rewards: Sequence[Any], *,
                    max_new_tokens: int = 128, batch_size: int = 64,
                    group_fn: Callable[[dict], str] | None = None) -> dict[str, float]:
    """Greedy decoding of held-out examples; returns the mean of each reward (e.g. ``accuracy``, ``format``).

    With ``group_fn`` (example -> group name) also the mean per group, as ``"<reward>/<group>"`` (e.g.
    ``"accuracy/*"`` for the multiplications of an arithmetic set).
    """
    from dsjax.rl.rewards import score_batch

    sums: dict[str, list[float]] = {}
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, length_bucket=64)
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i:i + batch_size])
        tokens, lengths = pad_prompts([_tok_prompt(tokenizer, ex["prompt"]) for ex in chunk], cfg.length_bucket)
        graphdef, state = nnx.split(model)
        keys = jax.random.split(jax.random.key(0), len(chunk))
        out = generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys, cfg=cfg)
        texts = [tokenizer.decode(t) for t in out.to_lists()]
        exs = [{**ex, "num_tokens": int(n)} for ex, n in zip(chunk, np.asarray(out.lengths))]
        scores = score_batch(list(rewards), texts, exs)
        for k, v in scores.items():
            if isinstance(v, np.ndarray):
                sums.setdefault(k, []).extend(v.tolist())
                if group_fn is not None:
                    for ex, x in zip(chunk, v.tolist()):
                        sums.setdefault(f"{k}/{group_fn(ex)}", []).append(x)
    with warnings.catch_warnings():   # a reward that is None for every example of a group: nan, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(np.nanmean(v)) if len(v) else float("nan") for k, v in sums.items()}


class GRPOTrainer:
    """GRPO on a :class:`~dsjax.Transformer` with rule-based rewards. Readable; fork it.

    Args:
      model: the policy to train (also the initial reference).
      tokenizer: a dsjax tokenizer (``encode``/``decode``/``bos_id``/``eos_id``).
      rewards: a list of :class:`dsjax.rl.rewards.Reward` (see ``make_rewards``).
      cfg: :class:`~dsjax.rl.grpo.GRPOConfig`.
      optim: the optimizer config; ``steps`` the planned number of steps (for the schedule).
      prompts_per_step: prompts per update (the update batch has ``prompts_per_step * G`` completions).
      rollout_multiplier: with ``cfg.dynamic_sampling``, each rollout samples ``rollout_multiplier *
        prompts_per_step`` prompts (one larger decode batch instead of several refills when many groups agree;
        kept groups beyond ``prompts_per_step`` are dropped).
      min_prompts_per_step: with ``cfg.dynamic_sampling``, refill (another rollout) only while fewer groups than this
        disagree (default ``prompts_per_step``: every update is full). Lower, a step trains on what one rollout
        yields -- the update batch keeps its shape (``prompts_per_step * G`` rows; rows of missing groups carry no
        loss and count in no normaliser) -- and skips the refills that dominate the step when most groups agree.
      prompt_bucket: prompts are left-padded to a multiple of this (short prompts: small buckets waste less).
    """

    def __init__(self, model: Transformer, tokenizer, rewards: Sequence[Any], cfg: GRPOConfig, *,
                 optim: OptimConfig | None = None, steps: int = 100, prompts_per_step: int = 8, seed: int = 0,
                 log_samples_every: int = 10, rollout_multiplier: int = 1, prompt_bucket: int = 16,
                 min_prompts_per_step: int | None = None):
        if cfg.speculative_rollouts and not model.cfg.num_nextn_predict_layers:
            raise ValueError("GRPOConfig(speculative_rollouts=True) drafts with the MTP module, and this model has "
                             "none (num_nextn_predict_layers=0). Fix: speculative_rollouts=False")
        self.tokenizer = tokenizer
        self.rewards = list(rewards)
        self.cfg = cfg
        self._acceptance: list[tuple[int, int]] = []   # (accepted, proposed) drafts of this step's rollouts
        self.steps = steps
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.log_samples_every = log_samples_every
        if rollout_multiplier < 1 or prompt_bucket < 1:
            raise ValueError(f"rollout_multiplier={rollout_multiplier}, prompt_bucket={prompt_bucket}: must be >= 1")
        self.rollout_multiplier = rollout_multiplier if cfg.dynamic_sampling else 1
        self.min_prompts = prompts_per_step if min_prompts_per_step is None else min_prompts_per_step
        if not 1 <= self.min_prompts <= prompts_per_step:
            raise ValueError(f"min_prompts_per_step={min_prompts_per_step}: must be in 1..prompts_per_step "
                             f"({prompts_per_step})")
        self.finished = False  # set by train(): whether the last call ran every planned step
        optim = optim or OptimConfig(learning_rate=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0)
        self.graphdef, p, r = split_model(model)
        self.model_cfg = model.cfg
        init, log_probs, update = make_grpo_step(cfg, optim, steps * cfg.mu * cfg.minibatches, self.graphdef, p, r)
        self._log_probs = jax.jit(log_probs)
        self._update = jax.jit(update, donate_argnums=0)
        self.state: GRPOState = jax.jit(init)(nnx.to_pure_dict(p), nnx.to_pure_dict(r))
        self.stops = tuple(model.cfg.eos_token_ids)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       length_bucket=prompt_bucket)

    # ------------------------------------------------------------------------------------------ helpers
    def model(self) -> Transformer:
        """The current policy as a module (shares no buffers with the training state)."""
        p, r = split_model(nnx.eval_shape(lambda: Transformer(self.model_cfg, rngs=nnx.Rngs(0))))[1:]
        nnx.replace_by_pure_dict(p, self.state.params)
        nnx.replace_by_pure_dict(r, self.state.rest)
        return nnx.merge(self.graphdef, p, r)

    def _rollout(self, examples: list[dict], step: int):
        g = self.cfg.num_generations
        prompts = [_tok_prompt(self.tokenizer, ex["prompt"]) for ex in examples for _ in range(g)]
        tokens, lengths = pad_prompts(prompts, self.sampling.length_bucket)
        model = self.model()
        graphdef, state = nnx.split(model)
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        keys = jax.random.split(key, len(prompts))
        if self.cfg.speculative_rollouts:
            spec = speculative_generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                               cfg=self.sampling)
            out = spec.output
            self._acceptance.append((int(jnp.sum(spec.accepted)), int(jnp.sum(spec.drafts))))
        else:
            out = generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                  cfg=self.sampling)
        comp = np.asarray(out.tokens)
        clen = np.asarray(out.lengths)
        last = comp[np.arange(len(clen)), np.maximum(clen - 1, 0)]
        truncated = (clen >= self.cfg.max_new_tokens) & ~np.isin(last, self.stops)
        return tokens, lengths, comp, clen, truncated

    def _score(self, examples, comp, clen):
        from dsjax.rl.rewards import score_batch

        g = self.cfg.num_generations
        texts = [self.tokenizer.decode(comp[i, :clen[i]].tolist()) for i in range(len(clen))]
        exs = [{**examples[i // g], "num_tokens": int(clen[i])} for i in range(len(clen))]
        return texts, score_batch(self.rewards, texts, exs)

    def _saved(self, state: GRPOState) -> GRPOState:
        """What a checkpoint holds: the state, less the reference when it is never refreshed (it is then the
        initial policy, which a resuming trainer is built from): a quarter less disk."""
        return state if self.cfg.ref_update_every else dataclasses.replace(state, ref_params=None)

    # ------------------------------------------------------------------------------------------ one step
    def step(self, examples: Iterator[dict], step: int) -> tuple[dict[str, float], list[tuple[str, str, float]]]:
        """One GRPO step drawing prompts from ``examples``; returns ``(metrics, samples)``."""
        g, t0 = self.cfg.num_generations, time.perf_counter()
        batch_ex: list[dict] = []
        parts, rolled = [], []   # rolled: the scores of every completion sampled this step (all tries)
        t_reward = t_rollout = 0.0
        self._acceptance = []
        tries = 0
        while len(batch_ex) < self.min_prompts and tries < (4 if self.cfg.dynamic_sampling else 1):
            tries += 1
            # always roll out a full set of prompts: one generate shape, compiled once (with dynamic sampling,
            # rollout_multiplier times the prompts a step trains on: one larger batch decodes faster than several)
            exs = [next(examples) for _ in range(self.prompts_per_step * self.rollout_multiplier)]
            t1 = time.perf_counter()
            tokens, lengths, comp, clen, trunc = self._rollout(exs, step * 16 + tries)
            t2 = time.perf_counter()
            texts, scores = self._score(exs, comp, clen)
            rolled.append((scores, clen, trunc))
            t_rollout += t2 - t1
            t_reward += time.perf_counter() - t2
            keep = np.ones(len(exs), bool)
            if self.cfg.dynamic_sampling:
                keep = scores["total"].reshape(-1, g).std(1) > 0
            for i in np.nonzero(keep)[0][:self.prompts_per_step - len(batch_ex)]:
                rows = slice(i * g, (i + 1) * g)
                batch_ex.append(exs[i])
                parts.append((tokens[rows], lengths[rows], comp[rows], clen[rows], trunc[rows],
                              {k: v[rows] for k, v in scores.items() if isinstance(v, np.ndarray)},
                              texts[rows]))
        if not parts:  # every group agreed: nothing to learn from this step
            return {"skipped_rollout": 1.0, "time_rollout_s": t_rollout, **_reward_metrics(rolled, g)}, []
        p_len = max(x[0].shape[1] for x in parts)
        pad_left = lambda a: np.pad(a, ((0, 0), (p_len - a.shape[1], 0)))
        tokens = np.concatenate([pad_left(x[0]) for x in parts])
        lengths, comp, clen, trunc = (np.concatenate([x[i] for x in parts]) for i in (1, 2, 3, 4))
        scores = {k: np.concatenate([x[5][k] for x in parts]) for k in parts[0][5]}
        texts = [t for x in parts for t in x[6]]
        adv = group_advantages(jnp.asarray(scores["total"]), g, scale=self.cfg.adv_scale, eps=self.cfg.adv_eps,
                               rloo=self.cfg.rloo)
        arrays = completion_arrays(tokens, lengths, comp, clen, trunc if self.cfg.mask_truncated else None)
        # pad to prompts_per_step * G rows (rows without loss mask contribute nothing): the jitted log-prob and
        # update functions see one shape whatever dynamic sampling kept
        pad = self.prompts_per_step * g - arrays["tokens"].shape[0]
        arrays = {k: np.pad(v, ((0, pad), (0, 0))) for k, v in arrays.items()}
        adv = jnp.pad(adv, (0, pad))
        batch = {k: jnp.asarray(v) for k, v in arrays.items()}
        t3 = time.perf_counter()
        if self.cfg.mu > 1 or self.cfg.minibatches > 1:   # else the update uses stop_gradient(logp) (same values)
            batch["old_logp"] = self._log_probs(self.state.params, self.state.rest, batch)
        if self.cfg.beta > 0:
            batch["ref_logp"] = self._log_probs(self.state.ref_params, self.state.rest, batch)
        batch["advantages"] = adv
        jax.block_until_ready(batch)
        t4 = time.perf_counter()
        m = batch["tokens"].shape[0]
        mb = max(m // self.cfg.minibatches, 1)
        upd = []
        for _ in range(self.cfg.mu):
            for s in range(0, m, mb):
                self.state, um = self._update(self.state, jax.tree.map(lambda x: x[s:s + mb], batch))
                upd.append(um)
        upd = jax.device_get(upd)
        t5 = time.perf_counter()
        kept_total = scores["total"]
        metrics: dict[str, float] = {
            **_reward_metrics(rolled, g), "reward_mean_trained": float(kept_total.mean()),
            "time_rollout_s": t_rollout, "time_reward_s": t_reward, "time_reference_s": t4 - t3,
            "time_train_s": t5 - t4,
            "rollout_tokens_per_s": float(sum(r[1].sum() for r in rolled)) / max(t_rollout, 1e-9),
            "train_tokens_per_s": self.cfg.mu * float(batch["completion_mask"].sum()) / max(t5 - t4, 1e-9),
            "prompts": float(len(batch_ex)), "step_time_s": time.perf_counter() - t0,
        }
        if self._acceptance:
            metrics["rollout_draft_acceptance"] = (sum(a for a, _ in self._acceptance)
                                                   / max(sum(d for _, d in self._acceptance), 1))
        for k in upd[-1]:
            metrics[k] = float(np.mean([u[k] for u in upd]))
        samples = []
        if step % self.log_samples_every == 0:
            samples = [(batch_ex[j // g]["prompt"], texts[j], float(kept_total[j])) for j in range(0, len(texts), g)
                       ][:3]
        return metrics, samples

    def train(self, examples: Iterator[dict], steps: int | None = None, *, log_fn: Callable[[str], None] = print,
              on_step: Callable[[int, dict], None] | None = None, checkpoint_dir: str | os.PathLike | None = None,
              checkpoint_every: int = 25, time_limit_s: float | None = None) -> list[dict[str, float]]:
        """Runs GRPO up to step ``steps`` (default: the planned ``self.steps``); returns the metrics history.

        With ``checkpoint_dir`` the state (policy, optimizer, and the reference when ``ref_update_every`` refreshes
        it), the metrics history and the number of examples drawn are saved every ``checkpoint_every`` steps and at
        the end (Orbax, keep 1: a `small` GRPO state is ~16-22 GB); a later call with
        the same directory and a fresh ``examples`` iterator resumes from the newest checkpoint: it skips the
        examples already drawn and continues with the same rollout keys (``fold_in(seed, step)``), so a run split
        over several processes follows the same trajectory as one. ``time_limit_s`` stops after the first step that
        ends past the limit (checkpointed; :attr:`finished` tells whether all steps ran).
        """
        total = steps or self.steps
        history: list[dict[str, float]] = []
        drawn = [0]

        def counted():
            for ex in examples:
                drawn[0] += 1
                yield ex

        stream = counted()
        ckpt, start = None, 0
        if checkpoint_dir is not None:
            from dsjax.checkpoint import Checkpointer

            ckpt = Checkpointer(checkpoint_dir, every=checkpoint_every, keep=1, async_save=False)
            last = ckpt.latest_step()
            if last is not None:
                abstract, initial_ref = jax.eval_shape(lambda: self._saved(self.state)), self.state.ref_params
                # a checkpoint of another model (or an older layout) fails here, while this trainer keeps its state
                ckpt.check_compatible(last, abstract)
                # drop the fresh policy and optimizer state before the restored one arrives (for `small` that is
                # ~15 GB of device memory less at the peak, and no fragmented allocator for the first update)
                self.state = None
                state, data, meta = ckpt.restore(last, abstract)
                # without reference refreshes the reference is the initial policy, i.e. this trainer's own
                self.state = state if self.cfg.ref_update_every else dataclasses.replace(state,
                                                                                          ref_params=initial_ref)
                history = list(meta.get("history", []))
                for _ in range(int(data["examples_drawn"])):
                    next(stream)
                start = last
                log_fn(f"resumed GRPO from {checkpoint_dir} at step {last} ({drawn[0]} examples skipped)")
        t0 = time.perf_counter()
        self.finished = True
        for step in range(start, total):
            metrics, samples = self.step(stream, step)
            metrics["step"] = step + 1
            history.append(metrics)
            if on_step:
                on_step(step + 1, metrics)
            acc = metrics.get("reward/accuracy", float("nan"))
            log_fn(f"grpo step {step + 1}: reward {metrics.get('reward_mean', float('nan')):.3f} "
                   f"acc {acc:.3f} len {metrics.get('completion_len_mean', 0):.0f} "
                   f"kl {metrics.get('kl', 0.0):.4f} ({metrics.get('step_time_s', 0):.1f}s)")
            for prompt, text, r in samples:
                log_fn(f"  sample (reward {r:.2f}): {prompt!r} -> {text[:160]!r}")
            out_of_time = time_limit_s is not None and time.perf_counter() - t0 > time_limit_s and step + 1 < total
            if ckpt is not None:
                ckpt.save(step + 1, self._saved(self.state), {"examples_drawn": drawn[0]}, {"history": history},
                          force=out_of_time or step + 1 == total)
            if out_of_time:
                self.finished = False
                log_fn(f"time limit ({time_limit_s:.0f}s) reached after step {step + 1} of {total}"
                       + (f"; resume with the same checkpoint_dir ({checkpoint_dir})" if ckpt is not None else ""))
                break
        if ckpt is not None:
            ckpt.close()
        return history
