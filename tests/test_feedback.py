"""Listening sessions, listeners and the preference store (feedback/): what is asked, what is answered, what is kept."""

import math
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from melodjinn.agents.policies import frame_actions
from melodjinn.cli.main import main, run
from melodjinn.envs.policies import ConstantPolicy, ScriptedPolicy
from melodjinn.feedback.listeners import (Answer, ConsoleListener, DrumHitRate, EndSession, Loudness, SimulatedListener,
                                          ask, make_utility)
from melodjinn.feedback.sessions import ContinuationSampler, listening_session
from melodjinn.feedback.store import DATABASE, Clip, Comparison, PreferenceStore
from melodjinn.world_model.drum_world import DrumWorld
from melodjinn.world_model.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sampler():
    return ContinuationSampler("drums", steps=8)


def _clip(seed: int, policy: str = "p") -> Clip:
    g = torch.Generator().manual_seed(seed)
    return Clip(torch.randn(2560, generator=g).numpy() * 0.1, torch.randint(0, 16, (1, 4, 8), generator=g),
                torch.randint(0, 16, (32,), generator=g), torch.zeros(32, dtype=torch.long), [seed, 0], policy)


def _comparison(seed: int) -> Comparison:
    return Comparison("s", seed, {"context_seed": seed}, _clip(2 * seed, "base"), _clip(2 * seed + 1, "tuned"))


# ---- the store ---------------------------------------------------------------------------------------------------


def test_answers_come_back_as_chosen_and_rejected_clips(tmp_path):
    with PreferenceStore(tmp_path / "store") as store:
        for i, choice in enumerate(["A", "B", "tie", "skip", "B"]):
            store.record(_comparison(i), choice, "ann", "hash0", latency_s=0.5, replays=i)
        assert len(store) == 5 and store.listeners() == ["ann"]
        rows = store.answers()
        assert [r["choice"] for r in rows] == ["A", "B", "tie", "skip", "B"] and rows[3]["replays"] == 3
        pairs = store.pairs()
    assert [p.answer_id for p in pairs] == [1, 2, 5]  # ties and skips are not preferences
    first, second = _comparison(0), _comparison(1)
    assert pairs[0].chosen.hash == first.a.hash and pairs[0].rejected.hash == first.b.hash
    assert pairs[1].chosen.hash == second.b.hash and pairs[1].chosen.policy == "tuned"
    assert torch.equal(pairs[1].chosen.tokens, second.b.tokens) and torch.equal(pairs[1].chosen.actions, second.b.actions)
    assert pairs[1].chosen.step_actions == [3, 0] and pairs[0].context == {"context_seed": 0}
    import soundfile

    heard, rate = soundfile.read(pairs[0].chosen.audio_file, dtype="float32")
    assert rate == 24000 and np.array_equal(heard, first.a.audio.astype(np.float32))  # what was heard, bit for bit


def test_pairs_filter_by_listener_and_limit(tmp_path):
    with PreferenceStore(tmp_path) as store:
        for i in range(6):
            store.record(_comparison(i), "A", "ann" if i % 2 else "bob", "h")
        assert len(store.pairs("ann")) == 3 and len(store.pairs(limit=4)) == 4
        assert [p.listener for p in store.pairs("bob")] == ["bob"] * 3


def test_a_clip_heard_twice_is_stored_once(tmp_path):
    with PreferenceStore(tmp_path) as store:
        store.record(_comparison(0), "A", "ann", "h")
        store.record(_comparison(0), "B", "ann", "h")
    assert len(list((tmp_path / "clips").glob("*.wav"))) == 2


def test_a_bad_answer_writes_nothing(tmp_path):
    with PreferenceStore(tmp_path) as store:
        store.record(_comparison(0), "A", "ann", "h")
        with pytest.raises(DataError, match="one of A, B, tie, skip"):
            store.record(_comparison(1), "C", "ann", "h")
        assert len(store) == 1


def test_a_directory_that_is_not_a_store_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a preference store"):
        PreferenceStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_corrupt_database_is_a_clear_error_and_is_not_changed(tmp_path):
    (tmp_path / DATABASE).write_bytes(b"this is not sqlite" * 100)
    before = (tmp_path / DATABASE).read_bytes()
    with pytest.raises(DataError, match="not a readable SQLite database"):
        PreferenceStore(tmp_path)
    assert (tmp_path / DATABASE).read_bytes() == before


def test_a_store_from_another_schema_version_is_refused(tmp_path):
    PreferenceStore(tmp_path).close()
    with sqlite3.connect(tmp_path / DATABASE) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(DataError, match="schema version 99"):
        PreferenceStore(tmp_path)


def test_a_missing_clip_file_is_named(tmp_path):
    with PreferenceStore(tmp_path) as store:
        store.record(_comparison(0), "A", "ann", "h")
        next((tmp_path / "clips").glob("*.wav")).unlink()
        with pytest.raises(DataError, match="lost a clip file"):
            store.pairs()


def test_every_answer_survives_a_crash_mid_session(tmp_path):
    """The process is killed (SIGKILL, no clean-up) while the listener considers its fourth comparison: the three
    answers before it are on disk, with their clips, in a database that passes SQLite's integrity check."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_feedback import _comparison
from melodjinn.feedback.store import PreferenceStore
store = PreferenceStore({str(tmp_path)!r})
for i in range(10):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    store.record(_comparison(i), "A" if i % 2 else "B", "ann", "h")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr[-2000:]
    with sqlite3.connect(tmp_path / DATABASE) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with PreferenceStore(tmp_path) as store:
        assert [r["choice"] for r in store.answers()] == ["B", "A", "B"]
        assert len(store.pairs()) == 3  # every clip file is there


# ---- listeners ---------------------------------------------------------------------------------------------------


def _constant(value: float):
    return lambda clip: value if clip.policy == "tuned" else 0.0


def test_a_simulated_listener_follows_its_hidden_preference():
    comparison = _comparison(0)  # A is "base", B is "tuned"
    assert SimulatedListener(_constant(1.0), temperature=0)(comparison) == "B"
    assert SimulatedListener(_constant(-1.0), temperature=0)(comparison) == "A"
    assert SimulatedListener(_constant(0.2), tie_margin=0.3)(comparison) == "tie"
    # Bradley-Terry: a gap of T·ln 3 is preferred 3 times in 4
    listener = SimulatedListener(_constant(0.5 * math.log(3)), temperature=0.5, seed=1)
    share = np.mean([listener(comparison) == "B" for _ in range(4000)])
    assert abs(share - 0.75) < 0.03
    again = [SimulatedListener(_constant(0.1), seed=7)(comparison) for _ in range(2)]
    assert again[0] == again[1]  # seeded


def test_ask_times_bare_answers_and_refuses_nonsense():
    answer = ask(lambda c: "tie", _comparison(0))
    assert answer.choice == "tie" and answer.latency_s >= 0 and answer.replays == 0
    with pytest.raises(DataError, match="must answer one of"):
        ask(lambda c: "maybe", _comparison(0))


def test_drum_preference_hears_the_drum_and_not_the_others():
    world = DrumWorld()
    events = np.zeros(150, dtype=np.int64)  # 2 s: three snares and two kicks, all at gain 0.8
    events[[10, 60, 110]], events[[35, 85]] = 2, 1
    as_clip = lambda audio: Clip(audio, torch.zeros(1, 1, 1), torch.zeros(1), torch.zeros(1), [], "x")  # noqa: E731
    clip = as_clip(world.render(events))
    snare, kick, hihat = (DrumHitRate(world, name) for name in ("snare", "kick", "hihat"))
    assert snare(clip) == pytest.approx(3 * 0.8 / 2, rel=0.15)  # hits per second, each weighted by its gain
    assert kick(clip) == pytest.approx(2 * 0.8 / 2, rel=0.15)
    assert hihat(clip) == 0
    louder = as_clip(world.render(events, gains=np.full(150, 1.0)))
    assert snare(louder) > snare(clip)
    softer = as_clip(0.1 * clip.audio)
    assert Loudness(1.0)(clip) - Loudness(1.0)(softer) == pytest.approx(20, abs=0.5)  # 1/10 the amplitude: 20 dB
    assert Loudness(-1.0)(softer) > Loudness(-1.0)(clip)  # a listener who likes it quiet
    with pytest.raises(ConfigError, match="not in this world's kit"):
        DrumHitRate(world, "gong")
    with pytest.raises(ConfigError, match="unknown preference"):
        make_utility("jazz")


def test_console_listener_replays_and_writes_headless_clips(tmp_path):
    keys, said = iter(["x", "r", "B"]), []
    listener = ConsoleListener("ann", headless=True, clips_dir=tmp_path, read=lambda prompt: next(keys), write=said.append)
    comparison = _comparison(0)
    comparison.prompt_audio = np.zeros(320, dtype=np.float32)
    answer = listener(comparison)
    assert isinstance(answer, Answer) and answer.choice == "B" and answer.replays == 1
    assert any("unknown answer 'x'" in line for line in said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000-A.wav", "s-000-B.wav", "s-000-context.wav"]
    with pytest.raises(EndSession):
        ConsoleListener(headless=True, clips_dir=tmp_path, read=lambda prompt: "q", write=said.append)(comparison)

    def closed(prompt):
        raise EOFError

    with pytest.raises(EndSession):
        ConsoleListener(headless=True, clips_dir=tmp_path, read=closed, write=said.append)(comparison)


def test_console_listener_plays_through_the_sound_card(tmp_path):
    (tmp_path / ".asoundrc").write_text("pcm.!default { type null }\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from test_feedback import _comparison\n"
            "from melodjinn.feedback.listeners import ConsoleListener\n"
            "said = []\n"
            "answer = ConsoleListener(read=lambda p: 'a', write=said.append)(_comparison(0))\n"
            "print(answer.choice, [s.strip() for s in said if 'playing' in s])\n") % os.path.dirname(__file__)
    env = {**os.environ, "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "A ['playing A', 'playing B']" in result.stdout


# ---- sessions ----------------------------------------------------------------------------------------------------


def test_both_continuations_follow_one_context(sampler):
    rest = int(sampler.core.rest[0])
    same = ConstantPolicy(rest)
    prompt, a, b = sampler.pair(5, same, same)
    assert a.hash == b.hash  # same prompt, same sampling draws, same actions: the same music
    assert a.tokens.shape == (1, 4, 8 * 4) and a.audio.shape == (8 * 4 * 320,)
    assert len(prompt) % 320 == 0 and len(prompt) >= 75 * 320  # the prompt and the frame reset commits after it
    hits = ScriptedPolicy([3, rest])
    prompt2, a2, b2 = sampler.pair(5, same, hits, labels=("rest", "hits"))
    assert np.array_equal(prompt, prompt2) and a2.hash == a.hash and b2.hash != a.hash
    assert b2.step_actions == [3, rest] * 4 and b2.policy == "hits"
    cfg = sampler.env.config
    assert torch.equal(b2.actions, frame_actions(torch.tensor([b2.step_actions]), cfg.frames_per_step, cfg.action_hold, rest)[0])
    assert b2.sections.shape == b2.actions.shape
    _, other, _ = sampler.pair(6, same, same)
    assert other.hash != a.hash  # another context


def test_a_session_shows_each_policy_on_both_sides_and_stores_every_answer(sampler, tmp_path):
    rest = int(sampler.core.rest[0])
    quiet, busy = ConstantPolicy(rest), ScriptedPolicy([3])
    with PreferenceStore(tmp_path) as store:
        summary = listening_session(sampler, quiet, busy, lambda c: "A", store, comparisons=12, seed=3,
                                    labels=("quiet", "busy"), listener_name="ann")
        rows = store.answers()
    assert summary.answered == 12 and summary.counts["A"] == 12
    assert summary.wins["quiet"] > 0 and summary.wins["busy"] > 0  # "always A" favours neither policy
    assert {r["policy_a"] for r in rows} == {"quiet", "busy"} and all(r["listener"] == "ann" for r in rows)
    assert all(r["checkpoint_hash"] == sampler.checkpoint_hash for r in rows)
    seeds = [r["context"] for r in rows]
    with PreferenceStore(tmp_path / "again") as store:
        listening_session(sampler, quiet, busy, lambda c: "A", store, comparisons=12, seed=3, labels=("quiet", "busy"))
        assert [r["context"] for r in store.answers()] == seeds  # the same seed, the same contexts


def test_a_listener_can_end_the_session_early(sampler, tmp_path):
    answers = iter(["A", "B"])

    def listener(comparison):
        try:
            return next(answers)
        except StopIteration:
            raise EndSession("done") from None

    with PreferenceStore(tmp_path) as store:
        summary = listening_session(sampler, ConstantPolicy(0), ConstantPolicy(1),
                                    listener, store, comparisons=10, labels=("zero", "one"))
        assert summary.answered == 2 and len(store) == 2


def test_rate_runs_a_simulated_session_from_the_command_line(tmp_path):
    result = run("rate", f"store={tmp_path}", "listener.kind=simulated", "comparisons=3", "steps=4", "policy_b=random")
    assert result["answered"] == 3 and result["stored_answers"] == 3
    assert sum(result["wins"].values()) == 3 and set(result["wins"]) == {"prior", "random"}
    assert result["listener"] == "simulated-drum:snare"
    assert main(["rate", f"store={tmp_path}", "listener.kind=robot"]) == 2
    assert main(["rate", f"store={tmp_path}", "listener.kind=simulated", "listener.preference=drum:gong"]) == 2
    with PreferenceStore(tmp_path) as store:
        assert len(store) == 3  # the failed runs added nothing


def test_rate_without_a_sound_card_points_to_headless_listening(tmp_path):
    (tmp_path / ".asoundrc").write_text("pcm.!default { type hw card 99 }\n")  # a sound card that does not exist
    env = {**os.environ, "HOME": str(tmp_path), "MELODJINN_TEST_THREADS": "1"}
    melodjinn = os.path.join(os.path.dirname(sys.executable), "melodjinn")
    result = subprocess.run([melodjinn, "rate", f"store={tmp_path / 'store'}", "comparisons=1", "steps=2"],
                            capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "listener.headless=true" in result.stderr and "Traceback" not in result.stderr
    with PreferenceStore(tmp_path / "store") as store:
        assert len(store) == 0
