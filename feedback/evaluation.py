"""Personalisation metrics (DESIGN §9): does the personalised policy win under the listener's hidden preference?

    melodjinn eval-personal policy=DIR [base=drums] preference=drum:snare contexts=64
    melodjinn eval-personal store=DIR ratings=[16,32,64] preference=drum:snare     (the ratings curve)

`win_rate` continues fresh contexts with both policies (`ContinuationSampler.pair`: one prompt, the same sampling
draws until their actions differ) and scores each clip with the hidden utility itself — the preference a simulated
listener answers by, not its noisy answers. A context is a win when the policy's clip has the higher utility, a tie
(counted 1/2) when they are equal (e.g. both clips identical).

Fresh contexts: the rating sessions draw their context seeds from `np.random.default_rng(seed)`; evaluation draws
from `np.random.default_rng([EVALUATION_STREAM, seed])`, a different seed sequence, so no session seed is reused by
chance of construction. (Prompts come from the env's prompt clips, of which there are few; a fresh context is a fresh
draw of prompt, sampling and policy randomness.)

`ratings_curve` answers "how many ratings does it take": for each N, DPO on N of the listener's decided pairs (the
first N, or the mean over `subsets` disjoint sets of N), then the win rate of the tuned prior over the base on the
same fresh contexts.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from omegaconf import DictConfig

from melodjinn.agents.prior import ActionPrior, load_prior
from melodjinn.feedback.dpo import DPORecipe, personalise_prior
from melodjinn.feedback.listeners import make_utility
from melodjinn.feedback.sessions import ContinuationSampler, prior_policy, session_policy
from melodjinn.feedback.store import Clip, listener_pairs
from melodjinn.world_model.errors import ConfigError, DataError
from melodjinn.world_model.runtime import resolve_device, to_dataclass
from melodjinn.world_model.worlds import make_world

EVALUATION_STREAM = 0x5EED_E7A1  # first entry of the evaluation's seed sequence; see the module docstring


def evaluation_contexts(seed: int, contexts: int) -> list[int]:
    """The context seeds evaluation uses for `seed`: never the stream a rating session draws from."""
    if contexts < 1:
        raise ConfigError(f"contexts must be >= 1, got {contexts}")
    rng = np.random.default_rng([EVALUATION_STREAM, int(seed)])
    return [int(s) for s in rng.integers(2**31 - 1, size=int(contexts))]


def win_rate(sampler: ContinuationSampler, policy, baseline, utility: Callable[[Clip], float], contexts: int,
             seed: int = 0) -> dict[str, Any]:
    """`policy` against `baseline` on `contexts` fresh contexts under the hidden `utility` (see the module docstring)."""
    policy_utility, baseline_utility = [], []
    for context_seed in evaluation_contexts(seed, contexts):
        _, clip, base_clip = sampler.pair(context_seed, policy, baseline, ("policy", "baseline"))
        policy_utility.append(utility(clip))
        baseline_utility.append(utility(base_clip))
    gap = np.asarray(policy_utility) - np.asarray(baseline_utility)  # (contexts,)
    wins, ties, losses = int((gap > 0).sum()), int((gap == 0).sum()), int((gap < 0).sum())
    rate = (wins + 0.5 * ties) / len(gap)
    return {"win_rate": rate, "win_rate_se": math.sqrt(rate * (1 - rate) / len(gap)), "wins": wins, "ties": ties,
            "losses": losses, "policy_utility": float(np.mean(policy_utility)),
            "baseline_utility": float(np.mean(baseline_utility)), "contexts": len(gap), "seed": int(seed)}


def ratings_curve(store: str | Path, base: ActionPrior, sampler: ContinuationSampler, utility: Callable[[Clip], float],
                  ratings: Sequence[int], recipe: DPORecipe, contexts: int, seed: int = 0,
                  listener: Optional[str] = None, temperature: float = 1.0, device: str = "cpu",
                  subsets: int = 1) -> list[dict[str, Any]]:
    """For each N in `ratings`: DPO on N of the listener's decided pairs (all of them train: the win rate is the
    held-out measure), then the tuned prior's win rate over the base on the same fresh contexts.

    One set of N answers says as much about which answers the listener happened to give as about N, so with
    `subsets` k the point averages k disjoint sets (pairs [0, N), [N, 2N), ...; as many as the store holds, up to k)."""
    if subsets < 1:
        raise ConfigError(f"subsets must be >= 1, got {subsets}")
    recipe = replace(recipe, eval_share=0.0)
    baseline = prior_policy(base, sampler, temperature)
    name, every = listener_pairs(store, listener, None)
    if max(int(r) for r in ratings) > len(every):
        raise DataError(f"ratings={max(int(r) for r in ratings)} asked, but {store} holds only {len(every)} decided "
                        f"pairs of listener {name!r}; pass ratings up to {len(every)} or record more comparisons")
    curve = []
    for n in sorted(int(r) for r in ratings):
        runs = []
        for part in range(min(subsets, len(every) // n)):
            tuned, metrics = personalise_prior(base, every[part * n : (part + 1) * n], recipe, seed, device)
            result = win_rate(sampler, prior_policy(tuned, sampler, temperature), baseline, utility, contexts, seed)
            runs.append({**result, "dpo_seconds": metrics["seconds"], "train_accuracy": metrics["train_accuracy"]})
        rates = [run["win_rate"] for run in runs]
        curve.append({"ratings": n, "listener": name, "subsets": len(runs), "win_rate": float(np.mean(rates)),
                      "win_rates": rates, "runs": runs})
    return curve


def eval_personal(cfg: DictConfig) -> dict:
    """The `eval-personal` command: one personalised policy against the base prior, or the ratings curve of a store."""
    if (cfg.policy is None) == (cfg.store is None):
        raise ConfigError("pass policy=DIR (a personalised prior, or a PPO agent trained on a reward model, against the "
                          "base prior) or store=DIR (the ratings curve), not both")
    device = resolve_device(cfg.device)
    base = load_prior(cfg.base, device)
    checkpoint = cfg.checkpoint or (base.info.get("world_model") or {}).get("checkpoint")
    if not checkpoint:
        raise ConfigError("the base prior does not say which world model it plays; pass checkpoint=DIR")
    sampler = ContinuationSampler(checkpoint, steps=int(cfg.steps))
    utility = make_utility(cfg.preference, make_world(sampler.core.model.world))
    summary: dict[str, Any] = {"preference": cfg.preference, "base": str(cfg.base), "checkpoint": str(checkpoint),
                               "steps": int(cfg.steps), "temperature": float(cfg.temperature)}
    baseline = prior_policy(base, sampler, float(cfg.temperature))
    if cfg.policy is not None:
        policy, _ = session_policy(str(cfg.policy), sampler, float(cfg.temperature))
        summary.update(policy=str(cfg.policy), **win_rate(sampler, policy, baseline, utility, int(cfg.contexts), int(cfg.seed)))
    else:
        recipe = to_dataclass(DPORecipe, cfg.train, "train").validate()
        summary.update(store=str(cfg.store), curve=ratings_curve(cfg.store, base, sampler, utility, list(cfg.ratings),
                                                                 recipe, int(cfg.contexts), int(cfg.seed), cfg.listener,
                                                                 float(cfg.temperature), device, int(cfg.subsets)))
    print(json.dumps(summary))
    return summary
