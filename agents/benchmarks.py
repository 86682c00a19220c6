"""`melodjinn bench ppo`: how fast PPO trains on the music env, beside the same SB3 PPO on CartPole.

Env steps per wall second on this process: the batched music env alone (random actions), SB3 PPO training on it
(rollouts + updates, train-agent's settings), and SB3 PPO training on CartPole-v1 twice — with SB3's default PPO
(one env, 2048-step rollouts, 10 epochs of 64-sample minibatches: the commonly quoted 600-1000 steps/s on one CPU
core) and with train-agent's settings (so the difference is the env's cost, not PPO's).
One env step of the music env generates `frames_per_step` frames: a transformer forward per frame for all rows.
"""

from __future__ import annotations

import time

import numpy as np
from omegaconf import DictConfig

from melodjinn.agents.ppo import PPOConfig


def _ppo(env, seed: int = 0, sb3_defaults: bool = False):
    from stable_baselines3 import PPO

    if sb3_defaults:
        return PPO("MlpPolicy", env, seed=seed, device="cpu")
    p = PPOConfig()
    policy = "MultiInputPolicy" if hasattr(env.observation_space, "spaces") else "MlpPolicy"
    return PPO(policy, env, n_steps=p.n_steps, batch_size=p.batch_size, n_epochs=p.n_epochs, learning_rate=p.learning_rate,
               gamma=p.gamma, gae_lambda=p.gae_lambda, ent_coef=p.ent_coef, policy_kwargs={"net_arch": list(p.net_arch)},
               seed=seed, device="cpu")


def _timed_learn(model, steps: int) -> float:
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))  # SB3's default logger makes a /tmp/SB3-<time> folder per call
    start = time.perf_counter()
    model.learn(steps)
    return model.num_timesteps / (time.perf_counter() - start)


def bench_ppo(cfg: DictConfig) -> dict:
    from stable_baselines3.common.env_util import make_vec_env

    from melodjinn.agents.ppo import _observation_keys_wrapper
    from melodjinn.envs import SB3VecEnv

    b = cfg.ppo
    venv = SB3VecEnv(num_envs=int(b.num_envs), checkpoint=str(b.checkpoint), reward="energy_curve",
                     max_steps=int(b.max_steps), frames_per_step=int(b.frames_per_step))
    venv.seed(0)
    venv.reset()
    venv.step(np.zeros(venv.num_envs, dtype=np.int64))  # warm-up
    rng = np.random.default_rng(0)
    n, steps = venv.num_envs, max(1, int(b.env_steps) // venv.num_envs)
    start = time.perf_counter()
    for _ in range(steps):
        venv.step(rng.integers(venv.action_space.n, size=n))
    env_sps = steps * n / (time.perf_counter() - start)
    music = _ppo(_observation_keys_wrapper()(venv, PPOConfig().observation_keys))
    music_sps = _timed_learn(music, int(b.ppo_steps))
    cartpole_sps = _timed_learn(_ppo(make_vec_env("CartPole-v1", n_envs=int(b.cartpole_envs), seed=0)), int(b.cartpole_steps))
    default_sps = _timed_learn(_ppo(make_vec_env("CartPole-v1", n_envs=1, seed=0), sb3_defaults=True), int(b.cartpole_steps))
    return {
        "music_env": {"num_envs": n, "frames_per_step": int(b.frames_per_step), "env_steps_per_second": env_sps,
                      "frames_per_second": env_sps * int(b.frames_per_step)},
        "ppo_music_env_steps_per_second": music_sps,
        "ppo_cartpole_sb3_defaults_steps_per_second": default_sps,
        "ppo_cartpole_same_settings_steps_per_second": cartpole_sps,
        "music_over_cartpole_sb3_defaults": music_sps / default_sps,
    }
