"""The interfaces the envs accept from outside (agents/ and feedback/ implement them), and the two minimal drivers
the player needs. Data flows agents → envs: this module imports nothing from agents/ or feedback/.

    class Policy(Protocol):          act(observation) -> int ; reset()    what drives the player / a rollout
    class ActionPrior(Protocol):     log_probs(observation) -> (B, A)      what ActionPriorBonus scores with
    class PreferenceModel(Protocol): score(tokens (B, S, K, T)) -> (B,)    what PreferenceReward scores with

An observation passed to `act` is one env's (unbatched) observation dict; `log_probs` takes a batched one (every
array with a leading B). A plain function `f(observation) -> int` becomes a Policy with `as_policy(f)`.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from melodjinn.world_model.errors import ConfigError


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


class RandomPolicy:
    """Uniform over `actions` (default: every code), from its own seeded generator."""

    def __init__(self, num_actions: int, seed: int = 0, actions: Sequence[int] | None = None):
        self.choices = list(actions) if actions is not None else list(range(num_actions))
        if not self.choices:
            raise ConfigError("RandomPolicy needs at least one action")
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def act(self, observation: dict) -> int:
        return int(self.choices[self.rng.integers(len(self.choices))])


class ScriptedPolicy:
    """Plays `actions` in order, one per step, looping."""

    def __init__(self, actions: Sequence[int]):
        self.actions = [int(a) for a in actions]
        if not self.actions:
            raise ConfigError("ScriptedPolicy needs at least one action")
        self.reset()

    def reset(self) -> None:
        self.index = 0

    def act(self, observation: dict) -> int:
        action = self.actions[self.index % len(self.actions)]
        self.index += 1
        return action


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
