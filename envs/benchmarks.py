"""`melodjinn bench env`: env throughput, one env and batched, with and without decoding audio every step.

Figures count sub-env steps: a batch of N stepping once is N steps and N·frames_per_step frames. Wall time on
this process, and its CPU time beside it (on a shared machine the wall figure also measures the neighbours).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from omegaconf import DictConfig

from melodjinn.envs.core import env_kwargs
from melodjinn.envs.vector import MusicVectorEnv
from melodjinn.world_model.worlds import FRAME_RATE


def time_env(kwargs: dict, num_envs: int, steps: int, decode_audio: bool, seed: int = 0, episodes: int = 1) -> dict:
    """Times `episodes` episodes of `steps` steps (after 2 untimed warm-up steps each, random actions); the figures
    are the median episode's, `realtime_factor_per_episode` lists them all (one episode is a fraction of a second,
    so a neighbour's burst moves a single figure)."""
    warmup = 2
    envs = MusicVectorEnv(num_envs=num_envs, **{**kwargs, "decode_audio": decode_audio, "max_steps": steps + warmup})
    frames = num_envs * steps * envs.config.frames_per_step
    walls, cpus = [], []
    for episode in range(episodes):
        rng = np.random.default_rng(seed + episode)
        actions = rng.integers(0, envs.single_action_space.n, (steps + warmup, num_envs))
        envs.reset(seed=seed + episode)
        for a in actions[:warmup]:
            envs.step(a)
        wall, cpu = time.perf_counter(), time.process_time()
        for a in actions[warmup:]:
            envs.step(a)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    wall, cpu = float(np.median(walls)), float(np.median(cpus))
    return {"num_envs": num_envs, "decode_audio": decode_audio, "steps": steps, "episodes": episodes,
            "wall_seconds": wall, "steps_per_second": num_envs * steps / wall, "frames_per_second": frames / wall,
            "realtime_factor": frames / FRAME_RATE / wall, "cpu_frames_per_second": frames / max(cpu, 1e-9),
            "realtime_factor_per_episode": [round(frames / FRAME_RATE / w, 2) for w in walls]}


@torch.inference_mode()
def bench_env(cfg: DictConfig) -> dict:
    b = cfg.env_bench
    kwargs = env_kwargs(cfg.env)
    runs = []
    for num_envs in b.num_envs:
        for decode in (False, True):
            runs.append(time_env(kwargs, int(num_envs), int(b.decode_steps if decode else b.steps), decode, int(cfg.seed),
                                  int(b.episodes)))
    return {"env": {k: kwargs[k] for k in ("checkpoint", "frames_per_step", "prompt_frames", "reward")}, "runs": runs}
