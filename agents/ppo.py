"""`melodjinn train-agent checkpoint=DIR reward=energy_curve prior_beta=B out=DIR`: PPO on the batched music env.

Read top to bottom:
  1. env: `env.num_envs` rows of the world model in one batch (envs.SB3VecEnv: one backbone pass per frame for
     all rows), the task reward (`reward`, e.g. follow an energy curve) plus `prior_beta` · log π_prior(a | the
     observed history) when `prior_beta` > 0, the observation cut to `train.observation_keys`;
  2. agent: stable-baselines3 PPO with an MLP actor-critic over those observation entries;
  3. loop: SB3's rollouts of `train.n_steps` steps per row, then `train.n_epochs` epochs of clipped-surrogate
     updates; rollouts hold whole episodes (n_steps is a multiple of env.max_steps), so every rollout starts
     new episodes, and the rows are re-seeded from (seed, rollout) at each one — which is what makes a resumed
     run replay an uninterrupted one;
  4. TensorBoard (`out/tb`): SB3's losses and episode returns, plus each reward term's mean per step;
     every `train.checkpoint_every` env steps the agent (safetensors weights + config.json, nothing pickled), the
     optimiser and RNG state are written atomically; `resume=true` continues from there.

Throughput (env steps/s) is printed at the end and logged; `melodjinn bench ppo` compares it with SB3 PPO on
CartPole on the same machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from omegaconf import DictConfig, OmegaConf

from melodjinn.envs.policies import ARTIFACT_KIND, BasePolicy, batch_size_of
from melodjinn.world_model.artifacts import load_artifact_config, load_tensors, read_json, save_artifact, save_tensors, write_json
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.runtime import to_dataclass
from melodjinn.world_model.optim import load_optimizer_state, optimizer_state

STATE_FILE = "train_state.safetensors"
PROGRESS_FILE = "train_progress.json"


@dataclass
class PPOConfig:
    total_timesteps: int = 200_000  # env steps (all rows together) to train for
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    n_steps: int = 64  # steps per row per rollout; a multiple of env.max_steps (whole episodes)
    batch_size: int = 256  # minibatch size of the updates
    n_epochs: int = 4  # passes over each rollout
    learning_rate: float = 3e-4  # Adam, constant (a schedule would tie the run to total_timesteps)
    gamma: float = 0.95  # discount: episodes are short and the reward dense
    gae_lambda: float = 0.9
    clip_range: float = 0.2
    ent_coef: float = 0.01  # entropy bonus: keeps exploring codes early
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    net_arch: list[int] = field(default_factory=lambda: [64, 64])  # hidden layers of the actor and the critic
    observation_keys: list[str] = field(default_factory=lambda: ["progress", "state", "actions", "section"])  # what the agent sees
    checkpoint_every: int = 20_480  # env steps between checkpoints (rounded up to whole rollouts)


# ---- spaces as JSON (a saved agent must rebuild its network without the env or a pickle) -------------------------


def space_to_json(space: spaces.Space) -> dict:
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: space_to_json(v) for k, v in space.spaces.items()}}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n)}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec.tolist()}
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": space.low.tolist(), "high": space.high.tolist(), "dtype": str(space.dtype)}
    raise ConfigError(f"cannot describe a {type(space).__name__} observation space")


def space_from_json(d: dict) -> spaces.Space:
    kind = d["type"]
    if kind == "Dict":
        return spaces.Dict({k: space_from_json(v) for k, v in d["spaces"].items()})
    if kind == "Discrete":
        return spaces.Discrete(d["n"])
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(np.asarray(d["nvec"], dtype=np.int64))
    if kind == "Box":
        return spaces.Box(np.asarray(d["low"], dtype=d["dtype"]), np.asarray(d["high"], dtype=d["dtype"]), dtype=d["dtype"])
    raise CheckpointError(f"unknown space type {kind!r} in a saved agent")


def select_observation(observation: dict, keys: list[str]) -> dict:
    return {k: observation[k] for k in keys}


def _observation_keys_wrapper():
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class SelectObservationKeys(VecEnvWrapper):
        """Show the agent only some entries of the env's Dict observation (terminal observations included)."""

        def __init__(self, venv, keys: list[str]):
            missing = sorted(set(keys) - set(venv.observation_space.spaces))
            if missing:
                raise ConfigError(f"train.observation_keys {missing} are not in the env's observation ({', '.join(venv.observation_space.spaces)})")
            self.keys = list(keys)
            super().__init__(venv, observation_space=spaces.Dict({k: venv.observation_space[k] for k in self.keys}))

        def reset(self):
            return select_observation(self.venv.reset(), self.keys)

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            for info in infos:
                if "terminal_observation" in info:
                    info["terminal_observation"] = select_observation(info["terminal_observation"], self.keys)
            return select_observation(obs, self.keys), rewards, dones, infos

    return SelectObservationKeys


# ---- the trained agent as a Policy ------------------------------------------------------------------------------


class PPOPolicy(BasePolicy):
    """A PPO actor-critic as a Policy: `act` picks the most likely action (deterministic=True) or samples."""

    name = "ppo"

    def __init__(self, sb3_policy, observation_keys: list[str], deterministic: bool = False, info: dict | None = None):
        self.sb3_policy = sb3_policy.eval()
        self.observation_keys = list(observation_keys)
        self.deterministic = deterministic
        self.info = dict(info or {})

    @staticmethod
    def build(observation_space: spaces.Dict, action_space: spaces.Space, net_arch: list[int], learning_rate: float = 3e-4):
        from stable_baselines3.common.policies import MultiInputActorCriticPolicy

        return MultiInputActorCriticPolicy(observation_space, action_space, lambda _: learning_rate, net_arch=list(net_arch))

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            torch.manual_seed(int(seed))  # SB3 samples with torch's global generator

    def act(self, observation: dict):
        batch = batch_size_of(observation)
        actions, _ = self.sb3_policy.predict(select_observation(observation, self.observation_keys), deterministic=self.deterministic)
        actions = np.asarray(actions).reshape(-1)
        return int(actions[0]) if batch is None else actions.astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {"observation_keys": self.observation_keys, "deterministic": self.deterministic}

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        config = {"policy": self.name, **self.config(),
                  "observation_space": space_to_json(self.sb3_policy.observation_space),
                  "action_space": space_to_json(self.sb3_policy.action_space),
                  "net_arch": list(self.sb3_policy.net_arch), **self.info}
        return save_artifact(directory, ARTIFACT_KIND, config, {"policy": self.sb3_policy.state_dict()}, extra)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu", deterministic: bool | None = None) -> "PPOPolicy":
        meta = load_artifact_config(directory, ARTIFACT_KIND)
        cfg = dict(meta["config"])
        if cfg.get("policy") != cls.name:
            raise CheckpointError(f"{directory} holds a {cfg.get('policy')!r} policy, not a PPO agent")
        net = cls.build(space_from_json(cfg.pop("observation_space")), space_from_json(cfg.pop("action_space")), cfg.pop("net_arch"))
        state = load_tensors(Path(directory) / "policy.safetensors")
        own = net.state_dict()
        if set(own) != set(state) or any(own[k].shape != state[k].shape for k in own):
            raise CheckpointError(f"{directory}/policy.safetensors does not match the agent's network; re-train it")
        net.load_state_dict(state)
        keys, det = cfg.pop("observation_keys"), cfg.pop("deterministic")
        cfg.pop("policy")
        policy = cls(net.to(device), keys, det if deterministic is None else deterministic, cfg)
        policy.meta = meta
        return policy


# ---- training ---------------------------------------------------------------------------------------------------


def make_train_env(cfg: DictConfig, prior_beta: float):
    """The batched env PPO trains on, its reward terms, and the prior scorer (None when prior_beta = 0)."""
    from melodjinn.agents.policies import PriorScorer
    from melodjinn.agents.prior import load_prior
    from melodjinn.envs import SB3VecEnv
    from melodjinn.envs.rewards import ActionPriorBonus, RewardSum

    env_kwargs = env_options(cfg)
    num_envs = env_kwargs.pop("num_envs")
    task = {"name": cfg.reward, **OmegaConf.to_container(cfg.reward_options, resolve=True)}
    venv = SB3VecEnv(num_envs=num_envs, reward=task, checkpoint=str(cfg.checkpoint), **env_kwargs)
    scorer = None
    if prior_beta > 0 or cfg.get("prior"):
        scorer = PriorScorer.for_env(load_prior(cfg.prior or cfg.checkpoint), venv)
    if prior_beta > 0:  # the scorer needs the built env (its rest code), so the bonus joins the reward after
        venv.core.reward_fn = RewardSum([*venv.core.reward_fn.terms, (1.0, ActionPriorBonus(scorer, beta=prior_beta))])
    return venv, scorer


def env_options(cfg: DictConfig) -> dict:
    options = OmegaConf.to_container(cfg.env, resolve=True)
    options.setdefault("num_envs", 1)
    return options


class _TrainingCallback:
    """Built lazily: SB3's BaseCallback is imported only when training runs."""

    @staticmethod
    def create(trainer: "AgentTrainer"):
        from stable_baselines3.common.callbacks import BaseCallback

        class TrainingCallback(BaseCallback):
            def __init__(self):
                super().__init__()
                self.terms: dict[str, list[float]] = {}

            def _on_rollout_start(self) -> None:
                trainer.on_rollout_start(self.model)

            def _on_step(self) -> bool:
                for info in self.locals["infos"]:
                    for key, value in info.items():
                        if key.startswith("reward_"):
                            self.terms.setdefault(key, []).append(float(value))
                return not trainer.out_of_time()

            def _on_rollout_end(self) -> None:
                for key, values in self.terms.items():
                    self.logger.record(f"reward_terms/{key[len('reward_'):]}_per_step", float(np.mean(values)))
                trainer.last_terms = {k: float(np.mean(v)) for k, v in self.terms.items()}
                self.terms = {}
                self.logger.record("time/env_steps_per_second", trainer.steps_per_second(self.model.num_timesteps))

        return TrainingCallback()


class AgentTrainer:
    """SB3 PPO plus what SB3 does not do here: safetensors checkpoints, exact resume, a wall-time limit."""

    def __init__(self, cfg: DictConfig):
        from stable_baselines3 import PPO
        from stable_baselines3.common.vec_env import VecMonitor

        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ppo_cfg = p = to_dataclass(PPOConfig, cfg.train, "train")
        self.seed = int(cfg.seed)
        max_steps = int(cfg.env.max_steps)
        if p.n_steps % max_steps:
            raise ConfigError(f"train.n_steps={p.n_steps} must be a multiple of env.max_steps={max_steps}: rollouts hold whole episodes")
        self.prior_beta = float(cfg.prior_beta)
        if self.prior_beta < 0:
            raise ConfigError(f"prior_beta must be >= 0, got {self.prior_beta}")
        venv, self.scorer = make_train_env(cfg, self.prior_beta)
        self.num_envs = venv.num_envs
        self.venv = VecMonitor(_observation_keys_wrapper()(venv, p.observation_keys))
        self.model = PPO(
            "MultiInputPolicy", self.venv, learning_rate=p.learning_rate, n_steps=p.n_steps, batch_size=p.batch_size,
            n_epochs=p.n_epochs, gamma=p.gamma, gae_lambda=p.gae_lambda, clip_range=p.clip_range, ent_coef=p.ent_coef,
            vf_coef=p.vf_coef, max_grad_norm=p.max_grad_norm, policy_kwargs={"net_arch": list(p.net_arch)},
            tensorboard_log=str(self.out / "tb"), seed=self.seed, device="cpu",
        )
        self.rollout_steps = p.n_steps * self.num_envs
        self.checkpoint_rollouts = max(1, -(-p.checkpoint_every // self.rollout_steps))
        self.history: list[dict] = []
        self.last_terms: dict[str, float] = {}
        self.started = time.time()
        self.start_timesteps = 0
        self.stopped_early = False

    # ---- hooks called by the callback ---------------------------------------------------------------------

    def on_rollout_start(self, model) -> None:
        rollout = model.num_timesteps // self.rollout_steps
        if rollout and rollout % self.checkpoint_rollouts == 0 and model.num_timesteps > self.start_timesteps:
            self.save()
        # every rollout starts new episodes; seeding them from (seed, rollout) makes a resumed run replay this one
        self.venv.seed(self.seed * 1_000_003 + rollout * self.num_envs)
        model._last_obs = self.venv.reset()
        model._last_episode_starts = np.ones(self.num_envs, dtype=bool)

    def out_of_time(self) -> bool:
        limit = self.ppo_cfg.max_minutes
        self.stopped_early = bool(limit) and time.time() - self.started > 60 * limit
        return self.stopped_early

    def steps_per_second(self, timesteps: int) -> float:
        return (timesteps - self.start_timesteps) / max(time.time() - self.started, 1e-9)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def policy(self) -> PPOPolicy:
        info = {"checkpoint": str(self.cfg.checkpoint), "reward": self.cfg.reward,
                "reward_options": OmegaConf.to_container(self.cfg.reward_options, resolve=True),
                "prior_beta": self.prior_beta, "env": env_options(self.cfg)}
        return PPOPolicy(self.model.policy, self.ppo_cfg.observation_keys, deterministic=False, info=info)

    def save(self) -> None:
        m = self.model
        np_state = np.random.get_state()
        state = {**optimizer_state(m.policy.optimizer), "rng.torch": torch.get_rng_state(),
                 "rng.numpy.keys": torch.from_numpy(np_state[1].astype(np.int64)),
                 "rng.numpy.pos": torch.tensor(np_state[2]), "num_timesteps": torch.tensor(m.num_timesteps),
                 "n_updates": torch.tensor(m._n_updates)}
        save_tensors(self.out / STATE_FILE, state)
        self.history.append({"timesteps": m.num_timesteps, "seconds": round(time.time() - self.started, 1),
                             "steps_per_second": round(self.steps_per_second(m.num_timesteps), 1), **self.last_terms})
        write_json(self.out / PROGRESS_FILE, {"history": self.history})
        extra = {"num_timesteps": m.num_timesteps, "train": asdict(self.ppo_cfg),
                 "resolved_config": OmegaConf.to_container(self.cfg, resolve=True)}
        self.policy().save(self.out, extra)  # config.json last: its num_timesteps names the state that belongs to it

    def resume(self) -> bool:
        if not (self.out / "config.json").exists():
            return False
        meta = read_json(self.out / "config.json")
        saved, now = meta.get("resolved_config", {}), OmegaConf.to_container(self.cfg, resolve=True)
        differs = [k for k in ("checkpoint", "reward", "reward_options", "prior", "prior_beta", "env", "seed") if saved.get(k) != now.get(k)]
        saved_ppo = {k: v for k, v in saved.get("train", {}).items() if k not in ("total_timesteps", "max_minutes")}
        if differs or saved_ppo != {k: v for k, v in now["train"].items() if k in saved_ppo}:
            raise CheckpointError(f"cannot resume {self.out}: its {', '.join(differs) or 'ppo'} config differs from this run's; use the same overrides or a new out=")
        state = load_tensors(self.out / STATE_FILE)
        if int(state["num_timesteps"]) != meta["num_timesteps"]:
            raise CheckpointError(f"{self.out}: training state ({int(state['num_timesteps'])} steps) does not match the agent ({meta['num_timesteps']}); the run was killed mid-save, re-run without resume")
        self.model.policy.load_state_dict(load_tensors(self.out / "policy.safetensors"))
        load_optimizer_state(self.model.policy.optimizer, state)
        torch.set_rng_state(state["rng.torch"])
        np.random.set_state(("MT19937", state["rng.numpy.keys"].numpy().astype(np.uint32), int(state["rng.numpy.pos"]), 0, 0.0))
        self.model.num_timesteps = self.start_timesteps = int(state["num_timesteps"])
        self.model._n_updates = int(state["n_updates"])
        progress = self.out / PROGRESS_FILE
        self.history = read_json(progress)["history"] if progress.exists() else []
        return True

    def train(self) -> dict:
        p = self.ppo_cfg
        remaining = p.total_timesteps - self.model.num_timesteps
        if remaining > 0:
            self.model.learn(remaining, callback=_TrainingCallback.create(self), tb_log_name="ppo",
                             reset_num_timesteps=self.start_timesteps == 0, progress_bar=bool(self.cfg.progress_bar))
        self.save()
        return {"timesteps": self.model.num_timesteps, "seconds": round(time.time() - self.started, 1),
                "env_steps_per_second": round(self.steps_per_second(self.model.num_timesteps), 1),
                "stopped_at_time_limit": self.stopped_early, **self.last_terms}


def train_agent(cfg: DictConfig) -> dict:
    """Train (or resume) a PPO agent; prints one JSON line with its throughput and last reward terms."""
    out = Path(cfg.out)
    if (out / "config.json").exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds an agent; pass resume=true to continue it or choose another out=")
    trainer = AgentTrainer(cfg)
    if cfg.resume:
        print(f"resuming {out} from {trainer.model.num_timesteps} steps" if trainer.resume() else f"nothing to resume in {out}; starting fresh")
    summary = {"out": str(out), **trainer.train()}
    print(json.dumps(summary))
    return summary
