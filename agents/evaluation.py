"""`melodjinn eval-agent agent=DIR episodes=N seed=S`: is the agent better than doing nothing clever?

Every policy — the agent, a uniformly random one, a constant action (the rest code by default: the music runs
on by itself) and the action prior sampled at `prior_temperature` — plays the same N episodes: episode i
starts from the prompt and sampling generators of env seed S + i, and the env is the agent's own (same world
model, episode length, step length). Returns are the task reward only (no prior bonus), so agents trained with
different β compare on the task. Each policy's mean log π_prior(a | history) per step says how much the prior
would have chosen its actions. One JSON line; `*_vs_*_z` is the difference of mean returns in units of its
standard error, sqrt(se_a² + se_b²) (> 2: a difference beyond noise).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from omegaconf import DictConfig

from melodjinn.agents.policies import PriorPolicy, PriorScorer, load_policy
from melodjinn.agents.ppo import PPOPolicy
from melodjinn.agents.prior import load_prior
from melodjinn.envs.policies import BasePolicy, ConstantPolicy, RandomPolicy
from melodjinn.world_model.errors import ConfigError


def rollout(policy: BasePolicy, envs, seed: int, scorer: PriorScorer | None = None, policy_seed: int | None = None) -> dict[str, np.ndarray]:
    """One episode per row of `envs` (a MusicVectorEnv), row i seeded `seed + i`. Returns per-episode returns (N,)
    and, with a scorer, per-episode mean log π_prior of the actions taken (N,)."""
    obs, _ = envs.reset(seed=seed)
    policy.reset(policy_seed if policy_seed is not None else seed)
    n, steps = envs.num_envs, envs.config.max_steps
    returns, loglik = np.zeros(n), np.zeros(n)
    for _ in range(steps):
        actions = np.asarray(policy.act(obs)).reshape(n)
        if scorer is not None:
            loglik += scorer.log_probs(obs)[np.arange(n), actions]
        obs, rewards, _, truncated, _ = envs.step(actions)
        returns += rewards
    assert bool(np.all(truncated)), "an episode lasts max_steps steps"
    return {"returns": returns, "prior_log_likelihood": loglik / steps}


def summarise(result: dict[str, np.ndarray]) -> dict[str, float]:
    r = result["returns"]
    out = {"return_mean": float(r.mean()), "return_std": float(r.std(ddof=1)) if len(r) > 1 else 0.0}
    out["return_se"] = out["return_std"] / math.sqrt(len(r))
    if "prior_log_likelihood" in result:
        out["prior_log_likelihood"] = float(result["prior_log_likelihood"].mean())
    return out


def z_score(a: dict[str, float], b: dict[str, float]) -> float:
    se = math.hypot(a["return_se"], b["return_se"])
    return (a["return_mean"] - b["return_mean"]) / se if se > 0 else math.copysign(math.inf, a["return_mean"] - b["return_mean"])


def evaluate_policies(policies: dict[str, BasePolicy], envs, seed: int, scorer: PriorScorer | None = None) -> dict[str, dict[str, float]]:
    """Every policy on the same seeded episodes: one per row of `envs` (a MusicVectorEnv)."""
    return {name: summarise(rollout(policy, envs, seed, scorer)) for name, policy in policies.items()}


def eval_agent(cfg: DictConfig) -> dict:
    from melodjinn.envs import MusicVectorEnv

    episodes = int(cfg.episodes)
    if episodes < 2:
        raise ConfigError(f"episodes must be >= 2 (the standard error needs two), got {episodes}")
    agent = load_policy(cfg.agent)
    info = getattr(agent, "info", {})
    checkpoint = cfg.checkpoint or info.get("checkpoint")
    if not checkpoint:
        raise ConfigError(f"{cfg.agent} does not say which world model it plays; pass checkpoint=DIR")
    env_kwargs = {**info.get("env", {}), **dict(cfg.env or {})}
    env_kwargs.pop("num_envs", None)
    reward = {"name": cfg.reward or info.get("reward", "energy_curve"), **(info.get("reward_options") or {})}
    envs = MusicVectorEnv(num_envs=episodes, reward=reward, **{**env_kwargs, "checkpoint": str(checkpoint)})
    scorer = PriorScorer.for_env(load_prior(cfg.prior or checkpoint), envs)
    if isinstance(agent, PPOPolicy):
        agent.deterministic = bool(cfg.deterministic)
    rest = int(envs.core.rest[0])
    constant = rest if cfg.constant_action is None else int(cfg.constant_action)
    policies = {
        "agent": agent,
        "random": RandomPolicy(envs.core.A),
        "constant": ConstantPolicy(constant),
        "prior": PriorPolicy(scorer, float(cfg.prior_temperature)),
    }
    results = evaluate_policies(policies, envs, int(cfg.seed), scorer)
    summary: dict[str, Any] = {"agent_dir": str(cfg.agent), "episodes": episodes, "seed": int(cfg.seed), "reward": reward,
                               "constant_action": constant, "rest_action": rest, **results}
    for base in ("random", "constant", "prior"):
        summary[f"agent_vs_{base}_z"] = z_score(results["agent"], results[base])
    print(json.dumps(summary))
    return summary
