"""Rejection sampling: generate N completions per prompt, keep those the rewards accept, write SFT JSONL.

This is the R1 recipe's data step between RL stages: sample from the current policy, keep the correct,
well-formatted answers, and fine-tune on them (``source="sft"`` reads the file this writes).

Acceptance of a completion:

* every reward named in ``required`` scores at least its threshold (default: ``accuracy >= 1`` when an
  ``accuracy`` reward is used, and ``format >= 1`` when a ``format`` reward is used); a reward that returns None
  (not applicable) fails its requirement;
* the weighted total is at least ``min_total`` (default: no bound);
* with ``drop_truncated`` (default), the completion ended with a stop token within ``max_new_tokens``.

Per prompt, identical completions are counted once and at most ``keep_per_prompt`` are kept, shortest first (R1
filtered long, mixed or unreadable chains of thought; shortest-first is the simple stand-in). The JSONL is written
to a temporary name and renamed into place: a reader never sees half a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.inference import SamplingConfig, generate_tokens, pad_prompts
from dsjax.rl.rewards import score_batch

__all__ = ["RejectionStats", "rejection_sample"]


@dataclasses.dataclass(frozen=True)
class RejectionStats:
    """What :func:`rejection_sample` did: prompts seen, completions generated / accepted, prompts with at least
    one kept completion, rows written, and the mean of each reward over all generated completions."""

    prompts: int
    generated: int
    accepted: int
    prompts_kept: int
    written: int
    reward_means: dict[str, float]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.generated, 1)


def _default_required(rewards: Sequence[Any]) -> dict[str, float]:
    names = {r.name for r in rewards}
    return {n: 1.0 for n in ("accuracy", "format") if n in names}


def rejection_sample(model, tokenizer, examples: Sequence[Mapping[str, Any]], rewards: Sequence[Any], *,
                     num_samples: int = 8, temperature: float = 0.7, top_p: float = 1.0,
                     max_new_tokens: int = 128, required: Mapping[str, float] | None = None,
                     min_total: float | None = None, keep_per_prompt: int = 1, out_path: str | os.PathLike | None = None,
                     prompts_per_batch: int = 32, drop_truncated: bool = True, seed: int = 0) -> tuple[list[dict[str, Any]], RejectionStats]:
    """Samples ``num_samples`` completions per example and keeps the accepted ones (see the module docstring).

    Args:
      model: a :class:`dsjax.Transformer`.
      tokenizer: a dsjax tokenizer.
      examples: dicts with ``"prompt"`` and whatever the rewards read (e.g. ``"answer"``).
      rewards: :class:`dsjax.rl.rewards.Reward` list (``make_rewards([...])``).
      required: ``{reward name: minimum score}``; None = the default above. Unknown names raise ``ValueError``.
      out_path: when given, the kept rows are written there as JSONL (``prompt``, ``completion``, the example's
        other fields, and ``reward``).

    Returns:
      ``(rows, stats)``: the kept rows (dicts) and a :class:`RejectionStats`.
    """
    if num_samples < 1 or keep_per_prompt < 1 or prompts_per_batch < 1:
        raise ValueError(f"num_samples={num_samples}, keep_per_prompt={keep_per_prompt}, prompts_per_batch="
                         f"{prompts_per_batch}: all must be >= 1")
    names = {r.name for r in rewards}
    required = dict(_default_required(rewards) if required is None else required)
    unknown = set(required) - names
    if unknown:
        raise ValueError(f"required={required}: no reward named {sorted(unknown)} (rewards: {sorted(names)}). Fix: "
                         "pass required={...} with names from make_rewards([...])")
    for ex in examples:
        if "prompt" not in ex:
            raise ValueError(f"example {dict(ex)!r} has no 'prompt' field")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, length_bucket=64)
    stops = set(model.cfg.eos_token_ids)
    graphdef, state = nnx.split(model)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    rows: list[dict[str, Any]] = []
    generated = accepted = prompts_kept = 0
    sums: dict[str, list[float]] = {}
    for b0 in range(0, len(examples), prompts_per_batch):
        chunk = list(examples[b0:b0 + prompts_per_batch])
        # every batch has prompts_per_batch * num_samples rows (the last one padded with repeats): one shape
        padded = chunk + [chunk[-1]] * (prompts_per_batch - len(chunk))
        prompts = [bos + tokenizer.encode(ex["prompt"]) for ex in padded for _ in range(num_samples)]
        tokens, lengths = pad_prompts(prompts, cfg.length_bucket)
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), b0), len(prompts))
        out = generate_tokens(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), keys, cfg=cfg)
        comp, clen = np.asarray(out.tokens), np.asarray(out.lengths)
        n_real = len(chunk) * num_samples
        comp, clen = comp[:n_real], clen[:n_real]
        texts = [tokenizer.decode(comp[i, :clen[i]].tolist()) for i in range(n_real)]
        exs = [{**chunk[i // num_samples], "num_tokens": int(clen[i])} for i in range(n_real)]
        scores = score_batch(list(rewards), texts, exs)
        for k, v in scores.items():
            if isinstance(v, np.ndarray):
                sums.setdefault(k, []).extend(v.tolist())
        finished = np.array([clen[i] > 0 and int(comp[i, clen[i] - 1]) in stops for i in range(n_real)])
        ok = finished.copy() if drop_truncated else np.ones(n_real, bool)
        for name, thr in required.items():
            ok &= np.nan_to_num(scores[name], nan=-np.inf) >= thr
        if min_total is not None:
            ok &= scores["total"] >= min_total
        generated += n_real
        accepted += int(ok.sum())
        for j, ex in enumerate(chunk):
            idx = [i for i in range(j * num_samples, (j + 1) * num_samples) if ok[i]]
            seen, kept = set(), []
            for i in sorted(idx, key=lambda i: (len(texts[i]), i)):
                if texts[i] not in seen:
                    seen.add(texts[i])
                    kept.append(i)
            kept = kept[:keep_per_prompt]
            prompts_kept += bool(kept)
            rows += [{**ex, "completion": texts[i], "reward": float(scores["total"][i])} for i in kept]
    if out_path is not None:
        path = os.fspath(out_path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    means = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in sums.items()}
    return rows, RejectionStats(prompts=len(examples), generated=generated, accepted=accepted,
                                prompts_kept=prompts_kept, written=len(rows), reward_means=means)
