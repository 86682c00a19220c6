"""`melodjinn play`: headless WAVs with scripted presses, the no-device message, and the live player end to end
(a pseudo-terminal for the keys, an ALSA null device for the sound card)."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from melodjinn.cli.main import compose, main
from melodjinn.envs import MusicWorldEnv
from melodjinn.envs.core import load_world_model
from melodjinn.envs.player import build_player, parse_presses
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.evaluation import action_meanings, lam_actions
from melodjinn.world_model.events import DrumHitDetector
from melodjinn.world_model.training import action_targets
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.worlds import make_world

MELODJINN = str(Path(sys.executable).parent / "melodjinn")


def _code_meanings(model):
    held = build_world_tensors(make_world(model.world, seed=1000), model.codec, 16, progress=False)
    actions = lam_actions(model, held, "cpu")
    return action_meanings(actions, action_targets(held.events, model.stride, actions.shape[1]), model.num_actions, 0.002)


def test_headless_writes_seconds_of_audio_with_hits_where_injected(tmp_path, capsys):
    model = load_world_model("drums", "cpu")
    meanings = _code_meanings(model)
    drums = [a for a, label in sorted(meanings.items()) if label > 0]
    assert len(drums) == 3  # kick, snare, hi-hat codes of the shipped model
    presses = [[1.0 + 0.5 * i, drums[i % 3]] for i in range(12)]
    out = tmp_path / "x.wav"
    overrides = ["headless=true", f"out={out}", "seconds=10", "policy=rest", f"actions={json.dumps(presses)}"]
    assert main(["play", *overrides]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 24_000 and audio.shape == (240_000,)
    assert [p["action"] for p in result["injected"]] == [a for _, a in presses]
    hits = DrumHitDetector.for_world(make_world(model.world)).detect(audio)
    found = [any(hits[f] == meanings[p["action"]] for f in range(p["frame"] - 1, p["frame"] + 2)) for p in result["injected"]]
    assert np.mean(found) >= 0.9, (found, result["injected"])


def test_player_override_and_hand_back_in_music_time():
    probe = MusicWorldEnv(checkpoint="drums", max_steps=1)
    key, scripted = [a for a in probe.used_actions if a != probe.rest_action][:2]  # two hit codes, neither the rest
    cfg = compose("play", ["headless=true", "idle_seconds=1.0", "policy=scripted", f"script=[{scripted}]"])
    player = build_player(cfg)
    assert player.env.rest_action == probe.rest_action
    player.press(key, at=0.5)
    drivers = [(k * player.seconds_per_step, player.step(k * player.seconds_per_step)) for k in range(40)]
    first_you = next(t for t, s in drivers if s.driver == "you")
    assert [s.action for t, s in drivers if t < 0.5] == [scripted] * sum(t < 0.5 for t, _ in drivers)  # policy before
    assert first_you >= 0.5 and next(s for t, s in drivers if s.driver == "you").action == key  # the key, at once
    between = [s for t, s in drivers if first_you < t < 0.5 + 1.0]
    assert between and all(s.driver == "you" and s.action == player.env.rest_action for s in between)
    assert all(s.driver == "policy" and s.action == scripted for t, s in drivers if t >= 0.5 + 1.0)  # handed back


def test_bad_play_options_are_clear():
    with pytest.raises(ConfigError, match="seconds:code"):
        parse_presses("1.0-3")
    assert parse_presses("0.5:1 1.0:3") == [(0.5, 1), (1.0, 3)]
    assert main(["play", "headless=true", "seconds=1"]) == 2
    assert main(["play", "headless=true", "out=x.wav", "seconds=1", "policy=smart"]) == 2


def _alsa_home(tmp_path, pcm: str) -> dict:
    (tmp_path / ".asoundrc").write_text(f"pcm.!default {{ {pcm} }}\n")
    return {**os.environ, "HOME": str(tmp_path), "MELODJINN_TEST_THREADS": "1"}


def test_no_output_device_points_to_headless(tmp_path):
    env = _alsa_home(tmp_path, "type hw card 99")  # a sound card that does not exist
    result = subprocess.run([MELODJINN, "play", "seconds=1"], capture_output=True, text=True, env=env, timeout=120,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert "headless=true" in result.stderr and "Traceback" not in result.stderr


def test_live_player_in_a_terminal_hands_over_and_back(tmp_path):
    env = _alsa_home(tmp_path, "type null")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([MELODJINN, "play", "seconds=5", "idle_seconds=1.0", "threads=1"], stdin=terminal,
                            stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    screen = ""

    def read_until(pattern: str, timeout: float) -> bool:  # in what arrives from now on
        nonlocal screen
        start, end = len(screen), time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([controller], [], [], 0.1)
            if ready:
                try:
                    screen += os.read(controller, 4096).decode(errors="ignore")
                except OSError:
                    return bool(re.search(pattern, screen[start:]))
                if re.search(pattern, screen[start:]):
                    return True
        return False

    try:
        assert read_until(r"action \d+ \| driver: policy", 60), screen
        mark = len(screen)
        os.write(controller, b"2")  # key 2 = code 1
        assert read_until(r"driver: you", 10), screen[mark:]  # the code itself: test_player_override_...
        after_key = len(screen)
        assert read_until(r"action \d+ \| driver: policy", 10), screen[after_key:]  # handed back after 1 s idle
        handed_back = screen[after_key:]
        assert proc.wait(timeout=30) == 0, screen[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    status = [line for line in re.split(r"[\r\n]", screen) if "driver:" in line]
    assert all(re.search(r"section: \w+ \| buffer -?\d+\.\d\ds \| RTF \d+\.\dx", line) for line in status[-3:]), status[-3:]
    assert "driver: you" in screen[mark:after_key] and "driver: policy" in handed_back


def test_render_human_plays_through_the_sound_card(tmp_path):
    env = _alsa_home(tmp_path, "type null")
    code = ("import gymnasium as gym, melodjinn.envs\n"
            "env = gym.make('melodjinn/DrumWorld-v0', render_mode='human', max_steps=5)\n"
            "env.reset(seed=0)\n"
            "for t in range(5): env.step(t)\n"
            "env.close(); print('played', env.unwrapped.config.decode_audio)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "played True" in result.stdout
