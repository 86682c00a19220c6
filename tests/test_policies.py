"""Policies: the env's Policy protocol, single and batched observations, the prior read from observations,
and save/load round-trips that give back the same actions. Codes come from the shipped model (its rest code, the
codes its LAM uses), never literals: a re-trained checkpoint numbers them differently."""

import numpy as np
import pytest

from melodjinn.agents.policies import PriorPolicy, PriorScorer, load_policy
from melodjinn.agents.ppo import PPOPolicy
from melodjinn.agents.prior import ActionPrior, PriorModelConfig
from melodjinn.envs import ConstantPolicy, MusicVectorEnv, MusicWorldEnv, RandomPolicy, ScriptedPolicy
from melodjinn.envs import Policy as EnvPolicy
from melodjinn.world_model.artifacts import resolve_checkpoint
from melodjinn.world_model.errors import CheckpointError, ConfigError



def _tiny_prior(num_actions):
    return ActionPrior.create(int(num_actions), PriorModelConfig(dim=16, layers=1, heads=2, mlp_dim=32, context=16), seed=3)


@pytest.fixture(scope="module")
def env():
    return MusicWorldEnv(checkpoint="drums", max_steps=3, frames_per_step=2, action_hold="first", action_history=4)


@pytest.fixture(scope="module")
def envs():
    return MusicVectorEnv(num_envs=3, checkpoint="drums", max_steps=6, frames_per_step=2, action_history=4)


@pytest.fixture(scope="module")
def tiny_prior(env):
    return _tiny_prior(env.action_space.n)


def _pattern(env):
    """Three distinct codes the LAM uses, the rest code in the middle (a hand-typed drum pattern)."""
    hits = [a for a in env.used_actions if a != env.rest_action]
    return [hits[0], env.rest_action, hits[-1]]


def _policies(env, envs, tiny_prior):
    scorer = PriorScorer.for_env(tiny_prior, envs)
    ppo = PPOPolicy(PPOPolicy.build(_ppo_space(envs), envs.single_action_space, [16]), ["progress", "actions"])
    A = env.action_space.n
    return [RandomPolicy(A, seed=1), RandomPolicy(A, seed=1, actions=env.used_actions), ConstantPolicy(env.rest_action),
            ScriptedPolicy(_pattern(env)), PriorPolicy(scorer, 1.0, seed=2), ppo]


def _ppo_space(envs):
    from gymnasium import spaces

    return spaces.Dict({k: envs.single_observation_space[k] for k in ("progress", "actions")})


def _play(policy, envs, seed=0):
    obs, _ = envs.reset(seed=seed)
    policy.reset(seed)
    actions = []
    for _ in range(envs.config.max_steps):
        a = policy.act(obs)
        actions.append(a)
        obs, *_ = envs.step(a)
    return np.stack(actions)  # (steps, B)


def test_every_policy_follows_the_env_protocol_single_and_batched(env, envs, tiny_prior):
    A = env.action_space.n
    for policy in _policies(env, envs, tiny_prior):
        assert isinstance(policy, EnvPolicy), policy
        obs, _ = env.reset(seed=0)
        policy.reset()
        for _ in range(3):
            action = policy.act(obs)
            assert isinstance(action, int) and 0 <= action < A, (policy, action)
            obs, *_ = env.step(action)
        batched = _play(policy, envs)
        assert batched.shape == (6, 3) and batched.dtype == np.int64 and batched.min() >= 0 and batched.max() < A


def test_scripted_constant_and_random_play_what_they_say(env, envs):
    pattern = _pattern(env)
    assert _play(ScriptedPolicy(pattern), envs)[:, 0].tolist() == pattern * 2
    assert (_play(ConstantPolicy(env.rest_action), envs) == env.rest_action).all()
    subset = env.used_actions[:2]
    assert set(_play(RandomPolicy(env.action_space.n, seed=0, actions=subset), envs).ravel()) <= set(subset)
    with pytest.raises(ConfigError, match="subset"):
        RandomPolicy(env.action_space.n, actions=[env.action_space.n])


def test_prior_scorer_reads_frame_history_from_the_observation():
    A = 8  # a synthetic prior over 8 codes, unrelated to any checkpoint; code 6 stands in for the rest code
    tiny_prior = _tiny_prior(A)
    scorer = PriorScorer(tiny_prior, frames_per_step=2, action_hold="first", rest_action=6)
    obs = {"actions": np.array([[A, A, 3, 0], [A, A, 1, 7]]), "section": np.array([1, 2])}
    actions, sections, nxt = scorer.history(obs)
    assert actions.tolist() == [[3, 6, 0, 6], [1, 6, 7, 6]]
    assert sections.tolist() == [[1] * 4, [2] * 4] and nxt.tolist() == [1, 2]
    held = PriorScorer(tiny_prior, frames_per_step=2, action_hold="all")
    assert held.history(obs)[0].tolist() == [[3, 3, 0, 0], [1, 1, 7, 7]]
    logp = scorer.log_probs(obs)
    assert logp.shape == (2, A) and np.allclose(np.exp(logp).sum(1), 1, atol=1e-5)
    start = {"actions": np.full((2, 4), A), "section": np.array([1, 1])}  # before the first step: an empty history
    assert scorer.history(start)[0].shape == (2, 0)
    with pytest.raises(ConfigError, match="rest_action"):
        PriorScorer(tiny_prior, frames_per_step=2, action_hold="first")


def test_policies_round_trip_through_save_and_load(env, envs, tiny_prior, tmp_path):
    for i, policy in enumerate(_policies(env, envs, tiny_prior)):
        directory = tmp_path / f"{i}-{policy.name}"
        policy.save(directory)
        loaded = load_policy(directory)
        assert type(loaded) is type(policy) and loaded.config() == policy.config()
        assert np.array_equal(_play(policy, envs, seed=i), _play(loaded, envs, seed=i)), policy.name
        assert not any(p.suffix in (".pkl", ".pt", ".pth", ".zip") for p in directory.rglob("*"))


def test_loading_a_non_policy_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no saved policy"):
        load_policy(tmp_path)
    with pytest.raises(CheckpointError, match="policy"):
        load_policy(resolve_checkpoint("drums"))


def test_player_takes_the_prior_and_saved_policies(env, tmp_path):
    from melodjinn.cli.main import run

    result = run("play", "headless=true", f"out={tmp_path / 'prior.wav'}", "seconds=1", "policy=prior")
    assert (tmp_path / "prior.wav").exists() and result is not None
    ScriptedPolicy(_pattern(env)).save(tmp_path / "scripted")
    run("play", "headless=true", f"out={tmp_path / 'saved.wav'}", "seconds=1", "policy=saved", f"policy_checkpoint={tmp_path / 'scripted'}")
    assert (tmp_path / "saved.wav").exists()
    with pytest.raises(ConfigError, match="policy_checkpoint"):
        run("play", "headless=true", f"out={tmp_path / 'x.wav'}", "seconds=1", "policy=saved")
