"""`MusicWorldEnv`: one stream of music as a Gymnasium env (`melodjinn/MusicWorld-v0`, `melodjinn/DrumWorld-v0`).

    env = gymnasium.make("melodjinn/DrumWorld-v0")
    obs, info = env.reset(seed=0)                 # a held-out drum clip as the prompt
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())

action       Discrete(A): the latent code for the next `frames_per_step` frames (see core.py for how it is held)
observation  Dict: "tokens"   the last `observation_frames` complete frames, flattened frame-major (W·S·K,)
                   "state"    the backbone's normalised output state (C,) at the newest position: a summary
                              of the whole context the dynamics sees, bounded by construction
                   "actions"  the last `action_history` actions taken (A = before the episode)
                   "section"  the current song section id
                   "progress" steps done / max_steps (the task rewards depend on it, so the agent sees it)
reward       `reward=` spec (rewards.py); DrumWorld-v0 defaults to following a build-then-drop energy curve
info         "tokens" (S, K, F) the new frames; "audio" (F·HOP,) with decode_audio=True; "frame"; "reward_<term>"
episode      truncates after `max_steps`; never terminates
reset        options={"prompt": tokens (S, K, T) or audio (S, N) / (N,), "section": name or id}
render       "rgb_array": waveform, spectrogram and actions of the episode so far; "human": plays each step
"""

from __future__ import annotations

from typing import Any, Optional

import gymnasium as gym
import numpy as np

from melodjinn.envs.core import EnvError, MusicBatch, env_config
from melodjinn.world_model.worlds import SAMPLE_RATE, SECTIONS


class MusicWorldEnv(gym.Env):
    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": 4}

    def __init__(self, reward: Any = None, render_mode: Optional[str] = None, **config: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise EnvError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        if render_mode == "human":
            config["decode_audio"] = True  # it plays every step's audio
        self.config = env_config(config)
        self.render_mode = render_mode
        self.core = MusicBatch(self.config, 1, reward)
        self.observation_space = self.core.single_observation_space
        self.action_space = self.core.single_action_space
        self.metadata = {**self.metadata, "render_fps": 75.0 / self.config.frames_per_step}
        self._speaker = None
        self._actions: list[int] = []

    @property
    def world_model(self):
        return self.core.model

    @property
    def rest_action(self) -> int:
        """The code for "nothing new" (what fills a step's frames after its first, with action_hold="first")."""
        return int(self.core.rest[0])

    @property
    def used_actions(self) -> list[int]:
        """The codes the LAM uses on the world's audio (every code without a world)."""
        return self.core.prompts.used_codes()

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        obs = self.core.reset([seed], options)
        self._np_random = self.core.rngs[0]  # env.np_random is the row's generator: one source of randomness
        self._actions = []
        return _row(obs), self._info()

    def step(self, action):
        obs, reward, truncated, info = self.core.step(action)
        self._actions.append(int(np.asarray(action).reshape(-1)[0]))
        info = {**self._info(), **{k: v[0] for k, v in info.items()}}
        if self.render_mode == "human":
            self._play(info["audio"])
        return _row(obs), float(reward[0]), False, bool(truncated), info

    def _info(self) -> dict:
        s = self.core.session
        return {"frame": s.absolute_frames, "section": SECTIONS[int(s.sec[0, s.frames - 1])]}

    def episode_audio(self) -> np.ndarray:
        """(N,) the mix of the episode so far (prompt included), decoded in one pass."""
        s = self.core.session
        start = max(self.core.episode_start - s.offset - self.config.prompt_frames, 0)
        # frames counted from the session's start, as the step decoder counts them
        return self.core.model.decode(s.tokens[:1, ..., start:], start_frame=s.offset + start).sum(1)[0].float().cpu().numpy()

    def render(self):
        if self.render_mode == "rgb_array":
            from melodjinn.envs.rendering import draw_episode

            prompt = min(self.config.prompt_frames, self.core.episode_start)
            return draw_episode(self.episode_audio(), self._actions, prompt, self.config.frames_per_step, self.core.A)
        if self.render_mode == "human":
            return None  # human mode plays as it steps
        gym.logger.warn("render() called without a render_mode; pass render_mode='rgb_array' or 'human'")
        return None

    def _play(self, audio: np.ndarray) -> None:
        from melodjinn.envs.audio_out import open_output

        if self._speaker is None:
            self._speaker = open_output(SAMPLE_RATE)
        self._speaker.write(np.ascontiguousarray(audio, dtype=np.float32))

    def close(self):
        if self._speaker is not None:
            self._speaker.stop()
            self._speaker.close()
            self._speaker = None


def _row(obs: dict) -> dict:
    return {key: value[0] for key, value in obs.items()}
