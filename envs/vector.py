"""Batched envs: N rows of music in one `MusicBatch`, so each frame is one backbone forward pass for all of them.

    envs = MusicVectorEnv(num_envs=64, checkpoint="drums")          # a gymnasium VectorEnv (NEXT_STEP autoreset)
    envs = gymnasium.make_vec("melodjinn/DrumWorld-v0", num_envs=64, vectorization_mode="vector_entry_point")
    venv = SB3VecEnv(num_envs=64, checkpoint="drums")               # stable-baselines3 VecEnv: PPO("MultiInputPolicy", venv)

Seeds: reset(seed=s) seeds row i with s + i (gymnasium's convention), reset(seed=[s0, s1, ...]) row by row; row i
then replays a single env reset with that seed and given the same actions. Later episodes continue each row's
own generators, as a single env's reset() without a seed does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from stable_baselines3.common.vec_env import VecEnv

from melodjinn.envs.core import EnvError, MusicBatch, env_config


def _seeds(seed: Any, n: int) -> list[Optional[int]]:
    if seed is None:
        return [None] * n
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n:
        raise EnvError(f"give one seed per env: {n} envs, {len(seeds)} seeds")
    return [None if s is None else int(s) for s in seeds]


def _vector_info(info: dict) -> dict:
    # gymnasium's vector info convention: every key batched, with a "_key" mask of the rows that have it
    out = {}
    for key, value in info.items():
        out[key] = value
        out[f"_{key}"] = np.ones(len(value), dtype=bool)
    return out


class MusicVectorEnv(VectorEnv):
    """N music envs stepping in lockstep (see the module docstring). Autoreset: NEXT_STEP (gymnasium's default):
    the step after an episode truncates resets every row and ignores its actions."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, reward: Any = None, render_mode: Optional[str] = None, **config: Any):
        if render_mode is not None:
            raise EnvError("the batched env does not render; render one MusicWorldEnv instead")
        self.config = env_config(config)
        self.core = MusicBatch(self.config, num_envs, reward)
        self.num_envs = self.core.B
        self.single_observation_space = self.core.single_observation_space
        self.single_action_space = self.core.single_action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None
        self._needs_reset = False

    def reset(self, *, seed: Any = None, options: Optional[dict] = None):
        obs = self.core.reset(_seeds(seed, self.num_envs), options)
        self._needs_reset = False
        return obs, {}

    def step(self, actions):
        n = self.num_envs
        if self._needs_reset:
            obs, info = self.reset()
            return obs, np.zeros(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), info
        obs, rewards, truncated, info = self.core.step(actions)
        self._needs_reset = truncated
        return obs, rewards, np.zeros(n, dtype=bool), np.full(n, truncated), _vector_info(info)


class SB3VecEnv(VecEnv):
    """The batched envs as a stable-baselines3 VecEnv: same-step autoreset, `terminal_observation` and
    `TimeLimit.truncated` in the infos of the last step, per-row dict infos."""

    def __init__(self, num_envs: int = 1, reward: Any = None, **config: Any):
        self.config = env_config(config)
        self.core = MusicBatch(self.config, num_envs, reward)
        self.render_mode = None
        super().__init__(self.core.B, self.core.single_observation_space, self.core.single_action_space)
        self._actions = None

    def reset(self):
        obs = self.core.reset(self._seeds, self._options[0] or None)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        obs, rewards, truncated, info = self.core.step(self._actions)
        infos = [{key: value[i] for key, value in info.items()} for i in range(self.num_envs)]
        if truncated:
            for i, row in enumerate(infos):
                row["terminal_observation"] = {key: value[i] for key, value in obs.items()}
                row["TimeLimit.truncated"] = True
            obs = self.core.reset([None] * self.num_envs)
        return obs, rewards.astype(np.float32), np.full(self.num_envs, truncated), infos

    def close(self) -> None:
        pass

    def get_attr(self, attr_name: str, indices=None) -> list:
        return [getattr(self, attr_name)] * len(self._indices(indices))

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list:
        raise EnvError(f"SB3VecEnv rows are rows of one batch, not separate envs; no per-env method {method_name!r}")

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False] * len(self._indices(indices))

    def _indices(self, indices) -> Sequence[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else list(indices)
