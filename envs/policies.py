"""Policies, and the interfaces the envs accept from outside (agents/ and feedback/ implement them). Data flows
agents → envs: this module imports nothing from agents/ or feedback/.

    class Policy(Protocol):          act(observation) -> int ; reset()    what drives the player / a rollout
    class ActionPrior(Protocol):     log_probs(observation) -> (B, A)      what ActionPriorBonus scores with
    class PreferenceModel(Protocol): score(tokens (B, S, K, T)) -> (B,)    what PreferenceReward scores with

An observation passed to `act` is one env's (unbatched) observation dict; `log_probs` takes a batched one (every
array with a leading B). A plain function `f(observation) -> int` becomes a Policy with `as_policy(f)`.

`BasePolicy` widens the protocol for the policies shipped here and in agents/: `act` also takes a vector env's
batched observation (→ (B,) int64), `reset(seed)` reseeds a stochastic policy, and `save(directory)` writes a
`config.json` that `melodjinn.agents.policies.load_policy` reads back (nothing is pickled).

- `RandomPolicy`: uniform over the codes (or a subset, e.g. the ones the LAM uses): the baseline to beat;
- `ConstantPolicy`: always one code (e.g. the rest code: the music runs on by itself);
- `ScriptedPolicy`: a fixed sequence of codes, looped (a drum pattern typed in by hand).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from melodjinn.world_model.artifacts import save_artifact
from melodjinn.world_model.errors import ConfigError

ARTIFACT_KIND = "policy"


@runtime_checkable
class Policy(Protocol):
    def act(self, observation: dict) -> int: ...

    def reset(self) -> None: ...


@runtime_checkable
class ActionPrior(Protocol):
    def log_probs(self, observation: dict) -> np.ndarray: ...


@runtime_checkable
class PreferenceModel(Protocol):
    def score(self, tokens: Any) -> np.ndarray: ...


def batch_size_of(observation: dict) -> int | None:
    """B for a vector env's batched observation, None for a single env's."""
    section = np.asarray(observation["section"])
    return None if section.ndim == 0 else int(section.shape[0])


class BasePolicy:
    """Base class: subclasses implement `_act(observation, B) -> (B,) actions`; `act` handles single vs batched."""

    name = "policy"

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode; `seed` makes a stochastic policy's draws reproducible."""

    def act(self, observation: dict):
        batch = batch_size_of(observation)
        obs = observation if batch is not None else {k: np.asarray(v)[None] for k, v in observation.items()}
        actions = np.asarray(self._act(obs, batch or 1))
        return int(actions[0]) if batch is None else actions.astype(np.int64)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str | Path) -> Path:
        return save_artifact(directory, ARTIFACT_KIND, {"policy": self.name, **self.config()}, {})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class RandomPolicy(BasePolicy):
    """Uniform over `actions` (default: all `num_actions` codes), from its own seeded generator."""

    name = "random"

    def __init__(self, num_actions: int, seed: int | None = None, actions: Sequence[int] | None = None):
        if num_actions < 1:
            raise ConfigError(f"num_actions must be >= 1, got {num_actions}")
        self.num_actions = int(num_actions)
        self.actions = None if actions is None else [int(a) for a in actions]
        if self.actions is not None and (not self.actions or not all(0 <= a < self.num_actions for a in self.actions)):
            raise ConfigError(f"RandomPolicy needs a non-empty subset of the codes [0, {self.num_actions}), got {list(actions)}")
        self.choices = np.arange(self.num_actions) if self.actions is None else np.asarray(self.actions)
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        return self.choices[self.rng.integers(len(self.choices), size=batch)]

    def config(self) -> dict[str, Any]:
        return {"num_actions": self.num_actions, "actions": self.actions}


class ConstantPolicy(BasePolicy):
    name = "constant"

    def __init__(self, action: int):
        if action < 0:
            raise ConfigError(f"a constant policy's action must be >= 0, got {action}")
        self.action = int(action)

    def _act(self, observation: dict, batch: int) -> np.ndarray:
        return np.full(batch, self.action)

    def config(self) -> dict[str, Any]:
        return {"action": self.action}


class ScriptedPolicy(BasePolicy):
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


class _FunctionPolicy:
    def __init__(self, fn: Callable[[dict], int]):
        self.fn = fn

    def act(self, observation: dict) -> int:
        return int(self.fn(observation))

    def reset(self) -> None:
        pass


def as_policy(obj: Any) -> Policy:
    """A Policy as is; a function `f(observation) -> int` wrapped into one."""
    if isinstance(obj, Policy):
        return obj
    if callable(obj):
        return _FunctionPolicy(obj)
    raise ConfigError(f"a policy needs act(observation) -> int and reset(), or is a function; got {type(obj).__name__}")
