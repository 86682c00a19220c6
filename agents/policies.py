"""Policies that need agents/: the action prior as a policy, loading any saved policy, and the player drivers.

    policy.reset(seed)          at the start of an episode (or a batch of them)
    policy.act(observation)     a single env's observation → an int; a vector env's (batched) → (B,) int64

The base class and the plain policies live with the env (envs/policies.py: `BasePolicy`, `RandomPolicy`,
`ConstantPolicy`, `ScriptedPolicy`); this module adds

- `PriorScorer`: the action prior's log π(a | history) read from an env observation (the env's `ActionPrior`);
- `PriorPolicy`: samples the action prior (agents/prior.py) at a temperature, from the actions in the observation;
- `load_policy(directory)`: any saved policy back, by the `policy` entry of its config.json;

and `PPOPolicy` (agents/ppo.py) is a stable-baselines3 PPO agent trained on the env. The player and env rollouts
take any of these; the player may inject a listener's action between calls, which a policy sees in the next
observation's `actions` (the past step actions) as if it had chosen it.

Every policy saves to a directory (`config.json`, and safetensors / the prior's own files where it has weights);
nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from melodjinn.envs.policies import ARTIFACT_KIND, BasePolicy, ConstantPolicy, RandomPolicy, ScriptedPolicy
from melodjinn.world_model.artifacts import CONFIG_FILE, load_artifact_config
from melodjinn.world_model.errors import CheckpointError, ConfigError

class PriorScorer:
    """The action prior read from an env observation: `log_probs(observation) -> (B, A)` (the env's `ActionPrior`
    protocol, what `ActionPriorBonus` and `PriorPolicy` use).

    The prior thinks in frames (one LAM action per `stride` frames of the audio it was cloned from); an env step
    spans `frames_per_step` frames. With `action_hold="first"` a step's action conditions its first frame and
    the rest code the others, so the history the prior sees is each past step's action followed by
    `frames_per_step - 1` rest codes ("all": the action repeated); it is scored at the step's first frame. The
    history is the observation's past step actions (A = none before the episode), so it is the same for any
    policy and for actions a listener injected; every history frame gets the current section.
    """

    def __init__(self, prior, frames_per_step: int = 1, action_hold: str = "first", rest_action: int | None = None):
        if action_hold not in ("first", "all"):
            raise ConfigError(f"action_hold must be 'first' or 'all', got {action_hold!r}")
        if frames_per_step > 1 and action_hold == "first" and rest_action is None:
            raise ConfigError("scoring multi-frame steps with action_hold='first' needs the env's rest_action")
        self.prior = prior
        self.frames_per_step = int(frames_per_step)
        self.action_hold = action_hold
        self.rest_action = rest_action

    @classmethod
    def for_env(cls, prior, env) -> "PriorScorer":
        """Matched to a Melodjinn env's (or vector env's) step length, hold rule and rest code."""
        core = getattr(getattr(env, "unwrapped", env), "core", None)
        if core is None:
            raise ConfigError(f"{type(env).__name__} is not a Melodjinn env (MusicWorldEnv, MusicVectorEnv, SB3VecEnv)")
        if core.A != prior.num_actions:
            raise ConfigError(f"the prior knows {prior.num_actions} actions, the env's world model {core.A}; train the prior on this world model")
        return cls(prior, core.cfg.frames_per_step, core.cfg.action_hold, int(core.rest[0]))

    def config(self) -> dict[str, Any]:
        return {"frames_per_step": self.frames_per_step, "action_hold": self.action_hold, "rest_action": self.rest_action}

    def history(self, observation: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched observation → frame-level history actions, sections (B, H·F) and the next section (B,)."""
        past = torch.as_tensor(np.asarray(observation["actions"])).long()  # (B, action_history), A = none
        section = torch.as_tensor(np.asarray(observation["section"])).long().reshape(-1)  # (B,)
        played = past[:, (past < self.prior.num_actions).all(0)]  # rows step in lockstep: "none" is column-wide
        actions = frame_actions(played, self.frames_per_step, self.action_hold, self.rest_action)
        return actions, section[:, None].expand_as(actions), section

    def log_probs(self, observation: dict) -> np.ndarray:
        return self.prior.next_log_probs(*self.history(observation)).numpy()


def frame_actions(step_actions: torch.Tensor, frames_per_step: int, action_hold: str, rest_action: int | None) -> torch.Tensor:
    """(B, H) env step actions → (B, H·F) the frame-level actions an env step plays and the prior reads:
    with action_hold="first" each step's action then F - 1 rest codes, with "all" the action F times."""
    B, F = step_actions.shape[0], int(frames_per_step)
    if action_hold == "first":
        rest = torch.full((*step_actions.shape, F - 1), int(rest_action or 0), dtype=step_actions.dtype)
        frames = torch.cat([step_actions[..., None], rest], -1)
    else:
        frames = step_actions[..., None].expand(*step_actions.shape, F)
    return frames.reshape(B, -1)


class PriorPolicy(BasePolicy):
    """Samples the action prior at `temperature` (0 = its most likely action) given the observed history."""

    name = "prior"

    def __init__(self, scorer: PriorScorer, temperature: float = 1.0, seed: int | None = None):
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        self.scorer = scorer
        self.temperature = float(temperature)
        self.generator = torch.Generator()
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.generator.manual_seed(int(seed))

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        logp = torch.from_numpy(self.scorer.log_probs(observation))
        if self.temperature == 0:
            return logp.argmax(-1).numpy()
        return torch.multinomial(torch.softmax(logp / self.temperature, -1), 1, generator=self.generator)[:, 0].numpy()

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, **self.scorer.config()}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.scorer.prior.save(directory / "prior")
        return super().save(directory)


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> BasePolicy:
    """Any saved policy, by the `policy` entry of its config.json."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).exists():
        raise CheckpointError(f"{directory} holds no saved policy ({CONFIG_FILE} missing); save one with policy.save(DIR) or `melodjinn train-agent`")
    cfg = dict(load_artifact_config(directory, ARTIFACT_KIND)["config"])
    name = cfg.pop("policy", None)
    if name == "random":
        return RandomPolicy(**cfg)
    if name == "constant":
        return ConstantPolicy(**cfg)
    if name == "scripted":
        return ScriptedPolicy(**cfg)
    if name == "prior":
        from melodjinn.agents.prior import ActionPrior

        temperature = cfg.pop("temperature")
        return PriorPolicy(PriorScorer(ActionPrior.load(directory / "prior", device), **cfg), temperature)
    if name == "ppo":
        from melodjinn.agents.ppo import PPOPolicy

        return PPOPolicy.load(directory, device)
    raise CheckpointError(f"{directory}: unknown policy type {name!r}; this code knows random, constant, scripted, prior, ppo")



# ---- drivers for `melodjinn play policy=prior|saved` (registered by name in envs/player.py POLICIES) ----------


def prior_driver(env, cfg) -> PriorPolicy:
    """The action prior of `policy_checkpoint` (default: the world model's own), sampled at temperature 1."""
    from melodjinn.agents.prior import load_prior

    prior = load_prior(cfg.policy_checkpoint or env.config.checkpoint)
    return PriorPolicy(PriorScorer.for_env(prior, env), 1.0, seed=int(cfg.seed))


def saved_driver(env, cfg) -> BasePolicy:
    """Any saved policy (`policy_checkpoint=DIR`: a train-agent output or a policy.save directory)."""
    if not cfg.policy_checkpoint:
        raise ConfigError("policy=saved needs policy_checkpoint=DIR (a train-agent out= or a policy.save directory)")
    return load_policy(cfg.policy_checkpoint)
