"""PPO on the music env: a short seeded run learns a task random play cannot do, a killed run resumes to the same
agent, and eval-agent compares against the baselines on the same seeds."""


import numpy as np
import pytest
import torch

from melodjinn.agents.ppo import AgentTrainer, PPOPolicy
from melodjinn.cli.main import run
from melodjinn.envs import MusicWorldEnv
from melodjinn.world_model.errors import CheckpointError, ConfigError

# A tiny task on the shipped drum model, 8 steps of 4 frames: keep it quiet (loudness of the last 4 frames near the
# world's quiet level). Random play hits most of the time; the agent has to find the rest code among 8.
QUIET = ["reward_options.curve=[[0,0.05],[1,0.05]]", "+reward_options.window_frames=4"]
TINY = ["checkpoint=drums", *QUIET, "env.num_envs=8", "env.max_steps=8", "env.frames_per_step=4",
        "train.n_steps=16", "train.batch_size=64", "train.n_epochs=4", "train.learning_rate=3e-3",
        "train.observation_keys=[progress]", "train.net_arch=[16]", "progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("agent")
    summary = run("train-agent", f"out={out}", "train.total_timesteps=3072", *TINY)
    return out, summary


def test_short_ppo_run_beats_random_play(trained):
    out, summary = trained
    assert summary["timesteps"] == 3072 and summary["env_steps_per_second"] > 0
    result = run("eval-agent", f"agent={out}", "episodes=16", "seed=0")
    agent, random = result["agent"], result["random"]
    # measured: agent -2.34 ± 0.44, random -5.92 ± 0.16 (z = 7.6) after 3 072 steps; an untrained PPO plays like random
    assert agent["return_mean"] > random["return_mean"] + 0.8, result
    assert result["agent_vs_random_z"] > 4, result
    assert set(result) >= {"constant", "prior", "agent_vs_prior_z", "agent_vs_constant_z"}
    assert all(np.isfinite(result[k]["prior_log_likelihood"]) for k in ("agent", "random", "constant", "prior"))


def test_agent_is_saved_without_pickles_and_loads_as_a_policy(trained):
    out, _ = trained
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "policy.safetensors", "train_state.safetensors", "tb"} <= files
    assert not any(p.suffix in (".zip", ".pkl", ".pt", ".pth") for p in out.rglob("*"))
    agent = PPOPolicy.load(out, deterministic=True)
    assert agent.observation_keys == ["progress"]
    env = MusicWorldEnv(checkpoint="drums", max_steps=1)
    hits = set(env.used_actions) - {env.rest_action}  # the shipped drum model's snare, kick and hi-hat codes
    assert len(hits) == 3
    observations = [{"progress": np.array([p], dtype=np.float32), "section": np.int64(1)} for p in (0.0, 0.5, 0.875)]
    assert not {agent.act(obs) for obs in observations} & hits  # it keeps quiet: the rest code or an unused one


def test_killed_run_resumes_to_the_same_agent(tmp_path, monkeypatch):
    args = [*TINY, "train.total_timesteps=512", "train.checkpoint_every=128"]
    run("train-agent", f"out={tmp_path / 'straight'}", *args)
    real = AgentTrainer.on_rollout_start

    def dies_after_the_second_checkpoint(self, model):
        real(self, model)
        if model.num_timesteps == 256:
            raise KeyboardInterrupt

    monkeypatch.setattr(AgentTrainer, "on_rollout_start", dies_after_the_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run("train-agent", f"out={tmp_path / 'killed'}", *args)
    monkeypatch.setattr(AgentTrainer, "on_rollout_start", real)
    with pytest.raises(ConfigError, match="resume=true"):
        run("train-agent", f"out={tmp_path / 'killed'}", *args)
    with pytest.raises(CheckpointError, match="env"):
        run("train-agent", f"out={tmp_path / 'killed'}", *args, "resume=true", "env.max_steps=4")
    run("train-agent", f"out={tmp_path / 'killed'}", *args, "resume=true")
    a, b = PPOPolicy.load(tmp_path / "straight"), PPOPolicy.load(tmp_path / "killed")
    for (name, x), y in zip(a.sb3_policy.state_dict().items(), b.sb3_policy.state_dict().values()):
        assert torch.equal(x, y), name


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="multiple of env.max_steps"):
        run("train-agent", f"out={tmp_path}", *TINY, "train.n_steps=12")
    with pytest.raises(ConfigError, match="observation_keys"):
        run("train-agent", f"out={tmp_path}", *TINY, "train.observation_keys=[nope]")
