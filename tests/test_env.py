"""The Gymnasium envs: API conformance, determinism, batching equality, errors, rewards, the SB3 adapter."""

import re
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.logger import Logger

from melodjinn.envs import (ActionPriorBonus, EnvError, MusicVectorEnv, MusicWorldEnv, PreferenceReward, SB3VecEnv,
                            make_reward)
from melodjinn.envs.core import load_world_model
from melodjinn.envs.rewards import loudness_probe
from melodjinn.world_model.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("env_id, kwargs", [("melodjinn/DrumWorld-v0", {}),
                                            ("melodjinn/MusicWorld-v0", {"checkpoint": "checkpoints/drums"})])
def test_gymnasium_and_sb3_checkers_pass_without_warnings(env_id, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env = gym.make(env_id, max_steps=6, render_mode="rgb_array", **kwargs)
        check_env(env.unwrapped)  # includes reset determinism and the rgb_array render
        sb3_check_env(env.unwrapped)
        env.reset(seed=0)
        env.step(0)
        image = env.render()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def _rollout(env, seed, steps):
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, env.action_space.n, steps)
    trace = [obs["tokens"]]
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        trace += [info["tokens"].ravel(), obs["state"], [reward]]
    return trace, truncated


def test_same_seed_same_rollout_and_episode_truncates():
    env = gym.make("melodjinn/DrumWorld-v0", max_steps=50)
    first, truncated = _rollout(env, 7, 50)
    second, _ = _rollout(env, 7, 50)
    other, _ = _rollout(env, 8, 50)
    assert truncated
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    with pytest.raises(EnvError, match="reset"):
        env.step(0)


def test_batched_rows_replay_single_envs_across_autoreset():
    seeds, steps = [3, 14, 15, 92], 12
    actions = np.random.default_rng(0).integers(0, 8, (2 * steps + 1, len(seeds)))
    venv = gym.make_vec("melodjinn/DrumWorld-v0", num_envs=len(seeds), vectorization_mode="vector_entry_point",
                        max_steps=steps)
    assert isinstance(venv.unwrapped, MusicVectorEnv)
    venv.reset(seed=seeds)
    batched = []
    for t in range(2 * steps + 1):
        _, _, _, truncated, info = venv.step(actions[t])
        if t == steps:  # NEXT_STEP autoreset: this step reset every row
            assert "tokens" not in info
            continue
        batched.append(info["tokens"])
        assert truncated.all() == (t in (steps - 1, 2 * steps))
    batched = np.stack(batched, 1)  # (N, 2·steps, S, K, F)
    for i, seed in enumerate(seeds):
        env = MusicWorldEnv(checkpoint="drums", max_steps=steps, reward="energy_curve")
        env.reset(seed=seed)
        single = []
        for t in range(2 * steps + 1):
            if t == steps:
                env.reset()
                continue
            single.append(env.step(actions[t, i])[4]["tokens"])
        agree = np.mean(batched[i] == np.stack(single))
        assert agree >= 0.99, (seed, agree)


def test_bad_actions_and_options_are_clear_errors():
    env = MusicWorldEnv(checkpoint="drums", max_steps=4)
    with pytest.raises(EnvError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    A = env.action_space.n
    for bad, match in [(A, rf"out of range.*\[0, {A}\)"), (-1, "out of range"), (1.5, "integer"), ([0, 1], "1 action")]:
        with pytest.raises(EnvError, match=match):
            env.step(bad)
    with pytest.raises(EnvError, match="unknown reset option"):
        env.reset(options={"promt": None})
    with pytest.raises(EnvError, match="unknown section 'drop'"):
        env.reset(options={"section": "drop"})
    with pytest.raises(EnvError, match=r"token prompt must be \(S=1, K=4, T\)"):
        env.reset(options={"prompt": np.zeros((2, 4, 30), dtype=np.int64)})
    with pytest.raises(EnvError, match="observation needs at least"):
        env.reset(options={"prompt": np.zeros((1, 4, 5), dtype=np.int64)})
    with pytest.raises(ConfigError, match="checkpoint"):
        gym.make("melodjinn/MusicWorld-v0")
    with pytest.raises(ConfigError, match="frames_per_step"):
        MusicWorldEnv(checkpoint="drums", frames_per_step=0)
    with pytest.raises(ConfigError, match="unknown reward 'loud'"):
        MusicWorldEnv(checkpoint="drums", reward="loud")


def test_prompt_and_section_options_and_decoded_audio():
    env = MusicWorldEnv(checkpoint="drums", max_steps=3, decode_audio=True, frames_per_step=4)
    prompt = env.world_model.encode(torch.zeros(1, 1, 24_000))[0]  # one second of silence, (S, K, T)
    obs, info = env.reset(seed=0, options={"prompt": prompt, "section": "chorus"})
    assert info["section"] == "chorus" or obs["section"] == 2
    obs, _, _, _, info = env.step(env.rest_action)
    assert info["audio"].shape == (4 * 320,) and info["audio"].dtype == np.float32
    assert info["tokens"].shape == (1, 4, 4)
    assert obs["section"] == 2  # the episode's section reached the newest frame
    audio = np.zeros(12_000, dtype=np.float32)
    obs, info = env.reset(seed=0, options={"prompt": audio})
    assert obs["tokens"].shape == (16 * 4,)


def test_loudness_probe_tracks_held_out_loudness():
    env = MusicWorldEnv(checkpoint="drums", max_steps=2)
    probe = loudness_probe(env.world_model)
    assert probe.r2 > 0.8, probe.r2  # a probe blind to loudness gives ~0


def test_energy_curve_reward_prefers_music_that_follows_the_curve():
    # a loud target: steady hits should beat silence (the rest code), and the reverse for a quiet target
    env = MusicWorldEnv(checkpoint="drums", max_steps=1)
    hits = [a for a in env.used_actions if a != env.rest_action]
    assert len(hits) == 3  # kick, snare, hi-hat
    usage = env.core.prompts.action_usage()
    assert usage[env.rest_action] == usage.max() > 0.5  # the rest code: the LAM's "nothing new"

    def episode_return(curve, policy):
        env = MusicWorldEnv(checkpoint="drums", max_steps=20, reward={"name": "energy_curve", "curve": curve})
        env.reset(seed=1)
        total = 0.0
        for t in range(20):
            total += env.step(policy(t, env))[1]
        return total
    busy = lambda t, env: hits[t % len(hits)] if t % 2 == 0 else env.rest_action
    quiet = lambda t, env: env.rest_action
    loud_curve, quiet_curve = [(0, 0.8), (1, 0.8)], [(0, 0.0), (1, 0.0)]
    assert episode_return(loud_curve, busy) > episode_return(loud_curve, quiet) + 1.0
    assert episode_return(quiet_curve, quiet) > episode_return(quiet_curve, busy) + 1.0


class _UniformPrior:
    def __init__(self, num_actions):
        self.num_actions = num_actions

    def log_probs(self, observation):
        return np.full((len(observation["section"]), self.num_actions), -np.log(self.num_actions))


class _CountHits:  # a stand-in preference model: likes tokens equal to 0 in codebook 0
    def score(self, tokens):
        return (tokens[:, :, 0] == 0).float().mean((1, 2)).numpy()


def test_prior_bonus_and_preference_reward_terms_add_up():
    A = load_world_model("drums", "cpu").num_actions
    reward = [ActionPriorBonus(_UniformPrior(A), beta=0.5), PreferenceReward(_CountHits(), every=2)]
    env = MusicWorldEnv(checkpoint="drums", max_steps=4, reward=reward)
    env.reset(seed=0)
    prefs = []
    for t in range(4):
        _, r, _, _, info = env.step(t)
        assert info["reward_prior"] == pytest.approx(-0.5 * np.log(A))
        assert r == pytest.approx(info["reward_prior"] + info["reward_preference"])
        prefs.append(info["reward_preference"])
    assert prefs[0] == 0 and prefs[2] == 0  # scored every 2 steps
    final = _CountHits().score(env.core.episode_tokens())[0]
    assert sum(prefs) == pytest.approx(final)  # the increments add up to the final score
    with pytest.raises(ConfigError, match="log_probs"):
        ActionPriorBonus(object())
    with pytest.raises(ConfigError, match="distinct names"):
        make_reward([ActionPriorBonus(_UniformPrior(A)), ActionPriorBonus(_UniformPrior(A))])


def test_sb3_vec_env_matches_vector_env_and_trains_ppo():
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    steps = 5
    venv = SB3VecEnv(num_envs=2, checkpoint="drums", max_steps=steps, reward="energy_curve")
    venv.seed(21)
    obs = venv.reset()
    ref = MusicVectorEnv(num_envs=2, checkpoint="drums", max_steps=steps, reward="energy_curve")
    ref_obs, _ = ref.reset(seed=21)
    assert np.array_equal(obs["tokens"], ref_obs["tokens"])
    A, rest = ref.single_action_space.n, int(ref.core.rest[0])
    for t in range(steps):  # row 0 cycles through every code, row 1 rests
        obs, rewards, dones, infos = venv.step(np.array([t % A, rest]))
        ref_obs, ref_rewards, _, _, _ = ref.step(np.array([t % A, rest]))
        np.testing.assert_allclose(rewards, ref_rewards, rtol=1e-6)
    assert dones.all() and infos[0]["TimeLimit.truncated"]
    assert np.array_equal(infos[1]["terminal_observation"]["tokens"], ref_obs["tokens"][1])
    model = PPO("MultiInputPolicy", VecMonitor(venv), n_steps=8, batch_size=16, n_epochs=1, seed=0, device="cpu")
    model.set_logger(Logger(folder=None, output_formats=[]))  # no /tmp/SB3-<time> folder
    model.learn(16)
    assert len(model.ep_info_buffer) >= 2  # episodes finished and were reported through the adapter


def test_readme_script_a_rollout_example_runs():
    text = README.read_text()
    match = re.search(r"<!-- script-a-rollout -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its 'script a rollout' example"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 12
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["audio"].shape[0] > 24_000  # the example writes/keeps more than a second of audio


def test_bench_env_reports_every_configuration(capsys):
    from melodjinn.cli.main import main

    assert main(["bench", "env", "env_bench.num_envs=[1,2]", "env_bench.steps=2", "env_bench.decode_steps=1", "env_bench.episodes=2"]) == 0
    import json

    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    runs = {(r["num_envs"], r["decode_audio"]): r for r in result["runs"]}
    assert set(runs) == {(1, False), (1, True), (2, False), (2, True)}
    for (n, _), r in runs.items():
        assert r["frames_per_second"] == pytest.approx(4 * r["steps_per_second"])
        assert r["steps_per_second"] == pytest.approx(n * r["steps"] / r["wall_seconds"])
        assert len(r["realtime_factor_per_episode"]) == r["episodes"] == 2
    assert result["threads"] == 1


@pytest.mark.parametrize("checkpoint", ["drums", "songs"])  # the tiny codec's streaming decoder, the additive one's
def test_step_audio_is_the_decode_of_the_whole_episode(checkpoint):
    env = MusicWorldEnv(checkpoint=checkpoint, max_steps=12, decode_audio=True)
    for seed in (5, 6):  # a second episode: the decoder starts over with the new prompt
        env.reset(seed=seed)
        audio = np.concatenate([env.step(t % env.action_space.n)[4]["audio"] for t in range(12)])
        whole = env.episode_audio()  # prompt + episode, decoded in one pass
        np.testing.assert_allclose(audio, whole[-len(audio):], atol=1e-5)


def test_long_episodes_roll_the_session_over():
    env = MusicWorldEnv(checkpoint="drums", max_steps=60, max_frames=120, decode_audio=True)
    env.reset(seed=0)
    for t in range(60):
        obs, _, _, truncated, info = env.step(t % env.action_space.n)
        assert env.observation_space.contains(obs) and info["audio"].shape == (1280,)
    assert truncated and env.core.session.offset > 0  # the buffer of 120 frames was rolled over
    assert info["frame"] == 75 + 1 + 60 * 4  # prompt, the lookahead step, 60 steps of 4 frames
