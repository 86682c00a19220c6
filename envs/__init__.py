"""Melodjinn as Gymnasium environments: the world model's latent codes are the actions.

Importing `melodjinn.envs` registers

    melodjinn/MusicWorld-v0   gymnasium.make(id, checkpoint=DIR, **EnvConfig fields, reward=..., render_mode=...)
    melodjinn/DrumWorld-v0    the same on the shipped drum world model (checkpoint="drums"), no argument needed

Public API (kept stable for agents/ and feedback/):

    MusicWorldEnv     one env (music_env.py): Discrete(A) actions, Dict observation
                      {"tokens", "state", "actions", "section", "progress"}, info["tokens"] / ["audio"]
    MusicVectorEnv    N envs batched into one backbone pass per frame (vector.py); also
                      gymnasium.make_vec(id, num_envs=N, vectorization_mode="vector_entry_point")
    SB3VecEnv         the batched envs as a stable-baselines3 VecEnv (same-step autoreset, terminal_observation)
    EnvConfig         every env option with its default and meaning (core.py)
    rewards           EnergyCurveReward, ActionPriorBonus, PreferenceReward, make_reward (rewards.py)
    Policy, ActionPrior, PreferenceModel   the protocols the envs and the player accept (policies.py)
    BasePolicy, RandomPolicy, ConstantPolicy, ScriptedPolicy, as_policy   policies (savable; batched or single obs)

Row i of a MusicVectorEnv seeded s_i replays a MusicWorldEnv seeded s_i (up to float rounding); episodes last
max_steps steps and truncate, so every row resets at the same step.
"""

from gymnasium.envs.registration import register, registry

from melodjinn.envs.core import EnvConfig, EnvError, StepBatch
from melodjinn.envs.music_env import MusicWorldEnv
from melodjinn.envs.policies import (ActionPrior, BasePolicy, ConstantPolicy, Policy, PreferenceModel, RandomPolicy,
                                     ScriptedPolicy, as_policy)
from melodjinn.envs.rewards import ActionPriorBonus, EnergyCurveReward, PreferenceReward, make_reward
from melodjinn.envs.vector import MusicVectorEnv, SB3VecEnv

ENV_IDS = ("melodjinn/MusicWorld-v0", "melodjinn/DrumWorld-v0")

if ENV_IDS[0] not in registry:
    register(id=ENV_IDS[0], entry_point="melodjinn.envs.music_env:MusicWorldEnv",
             vector_entry_point="melodjinn.envs.vector:MusicVectorEnv")
    register(id=ENV_IDS[1], entry_point="melodjinn.envs.music_env:MusicWorldEnv",
             vector_entry_point="melodjinn.envs.vector:MusicVectorEnv",
             kwargs={"checkpoint": "drums", "reward": "energy_curve"})

__all__ = [
    "ENV_IDS", "ActionPrior", "ActionPriorBonus", "BasePolicy", "ConstantPolicy", "EnergyCurveReward", "EnvConfig",
    "EnvError", "MusicVectorEnv", "MusicWorldEnv", "Policy", "PreferenceModel", "PreferenceReward", "RandomPolicy",
    "SB3VecEnv", "ScriptedPolicy", "StepBatch", "as_policy", "make_reward",
]
