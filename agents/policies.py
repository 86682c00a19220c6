"""Policies: anything that, given the env's observation, returns an action.

    policy.reset(seed)          at the start of an episode (or a batch of them)
    policy.act(observation)     a single env's observation → an int; a vector env's (batched) → (B,) int64

The player and env rollouts take any of these; the player may also inject a listener's action between calls,
which a policy sees in the next observation's `actions` (the past step actions), as if it had chosen it.

- `RandomPolicy`: uniform over the A latent codes (the baseline a trained agent must beat);
- `ConstantPolicy`: always one code (e.g. the rest code: the music runs on by itself);
- `ScriptedPolicy`: a fixed sequence of codes, looped (a drum pattern typed in by hand);
- `PriorPolicy`: samples the action prior (agents/prior.py) at a temperature, from the actions played so far;
- `PPOPolicy` (agents/ppo.py): a stable-baselines3 PPO agent trained on the env.

Every policy saves to a directory (`config.json`, and safetensors / the prior's own files where it has weights)
and `load_policy(directory)` gives it back; nothing is pickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from melodjinn.world_model.artifacts import CONFIG_FILE, load_artifact_config, save_artifact
from melodjinn.world_model.errors import CheckpointError, ConfigError

ARTIFACT_KIND = "policy"


def batch_size_of(observation: dict) -> int | None:
    """B for a vector env's batched observation, None for a single env's."""
    section = np.asarray(observation["section"])
    return None if section.ndim == 0 else int(section.shape[0])


def _as_output(actions: np.ndarray, batch: int | None):
    return int(actions[0]) if batch is None else actions.astype(np.int64)


class Policy:
    """Base class: subclasses implement `_act(observation, B) -> (B,) actions`; `act` handles single vs batched."""

    name = "policy"

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; `seed` makes a stochastic policy's draws reproducible."""

    def act(self, observation: dict):
        batch = batch_size_of(observation)
        obs = observation if batch is not None else {k: np.asarray(v)[None] for k, v in observation.items()}
        return _as_output(np.asarray(self._act(obs, batch or 1)), batch)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str | Path) -> Path:
        return save_artifact(directory, ARTIFACT_KIND, {"policy": self.name, **self.config()}, {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, num_actions: int, seed: int | None = None):
        if num_actions < 1:
            raise ConfigError(f"num_actions must be >= 1, got {num_actions}")
        self.num_actions = int(num_actions)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        return self.rng.integers(self.num_actions, size=batch)

    def config(self) -> dict[str, Any]:
        return {"num_actions": self.num_actions}


class ConstantPolicy(Policy):
    name = "constant"

    def __init__(self, action: int):
        if action < 0:
            raise ConfigError(f"a constant policy's action must be >= 0, got {action}")
        self.action = int(action)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        return np.full(batch, self.action)

    def config(self) -> dict[str, Any]:
        return {"action": self.action}


class ScriptedPolicy(Policy):
    """Plays `sequence` step by step from the start of each episode, looping at its end."""

    name = "scripted"

    def __init__(self, sequence: Sequence[int]):
        self.sequence = [int(a) for a in sequence]
        if not self.sequence or min(self.sequence) < 0:
            raise ConfigError(f"a scripted policy needs a non-empty sequence of actions >= 0, got {list(sequence)}")
        self.position = 0

    def reset(self, seed: int | None = None) -> None:
        self.position = 0

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        action = self.sequence[self.position % len(self.sequence)]
        self.position += 1
        return np.full(batch, action)

    def config(self) -> dict[str, Any]:
        return {"sequence": self.sequence}


class PriorPolicy(Policy):
    """Samples the action prior given the actions played so far in the episode.

    The prior thinks in frames (one LAM action per `stride` frames of the audio it was cloned from); an env step
    spans `frames_per_step` frames. With `action_hold="first"` a step's action conditions its first frame and
    the rest code the others, so the history the prior sees is each step's action followed by
    `frames_per_step - 1` rest codes; with "all" the action repeats. Only the step's first frame is sampled:
    the others are the env's to fill. The history comes from the observation's past actions (the last entry
    is the previous step's, A = none at the start of an episode), so actions a listener injected count too.
    """

    name = "prior"

    def __init__(self, prior, temperature: float = 1.0, frames_per_step: int = 1, action_hold: str = "first",
                 rest_action: int | None = None, seed: int | None = None):
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {temperature}")
        if action_hold not in ("first", "all"):
            raise ConfigError(f"action_hold must be 'first' or 'all', got {action_hold!r}")
        if frames_per_step > 1 and action_hold == "first" and rest_action is None:
            raise ConfigError("a prior policy over multi-frame steps with action_hold='first' needs the env's rest_action")
        self.prior = prior
        self.temperature = float(temperature)
        self.frames_per_step = int(frames_per_step)
        self.action_hold = action_hold
        self.rest_action = rest_action
        self.generator = torch.Generator()
        self.reset(seed)

    @classmethod
    def for_env(cls, prior, env, temperature: float = 1.0, seed: int | None = None) -> "PriorPolicy":
        """A prior policy matched to `env`'s step length, hold rule and rest code (a Melodjinn env or vector env)."""
        core = getattr(env, "unwrapped", env)
        core = getattr(core, "batch", core)
        cfg = core.cfg
        return cls(prior, temperature, cfg.frames_per_step, cfg.action_hold, int(core.rest[0]), seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.generator.manual_seed(int(seed))
        self.actions: torch.Tensor | None = None  # (B, H) frame-level history
        self.sections: torch.Tensor | None = None

    def _record(self, observation: dict, batch: int) -> None:
        last = torch.as_tensor(np.asarray(observation["actions"])[:, -1]).long()  # (B,) previous step's action
        started = last >= self.prior.num_actions  # A = none: the episode just began
        section = torch.as_tensor(np.asarray(observation["section"])).long().reshape(batch)
        if self.actions is None or self.actions.shape[0] != batch or bool(started.all()):
            self.actions = torch.zeros(batch, 0, dtype=torch.long)
            self.sections = torch.zeros(batch, 0, dtype=torch.long)
        if bool(started.any()):
            if not bool(started.all()):
                raise ConfigError("rows of a batch started their episodes at different steps; a prior policy needs "
                                  "them in lockstep (Melodjinn vector envs step so)")
            return
        F = self.frames_per_step
        if self.action_hold == "first":
            frames = torch.cat([last[:, None], torch.full((batch, F - 1), int(self.rest_action or 0))], 1)
        else:
            frames = last[:, None].expand(batch, F)
        keep = self.prior.context  # older history than the prior reads is dropped
        self.actions = torch.cat([self.actions, frames], 1)[:, -keep:]
        self.sections = torch.cat([self.sections, section[:, None].expand(batch, F)], 1)[:, -keep:]

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        self._record(observation, batch)
        section = torch.as_tensor(np.asarray(observation["section"])).long().reshape(batch)
        return self.prior.sample(self.actions, self.sections, section, self.temperature, self.generator).numpy()

    def config(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "frames_per_step": self.frames_per_step,
                "action_hold": self.action_hold, "rest_action": self.rest_action}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        self.prior.save(directory / "prior")
        return super().save(directory)


def load_policy(directory: str | Path, device: str | torch.device = "cpu") -> Policy:
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

        return PriorPolicy(ActionPrior.load(directory / "prior", device), **cfg)
    if name == "ppo":
        from melodjinn.agents.ppo import PPOPolicy

        return PPOPolicy.load(directory, device)
    raise CheckpointError(f"{directory}: unknown policy type {name!r}; this code knows random, constant, scripted, prior, ppo")

