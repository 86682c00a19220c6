"""`melodjinn play`: the world model as an instrument, in real time.

A generation thread steps a `MusicWorldEnv` (decoding each step) and keeps `buffer_seconds` of audio ahead of
playback; a sounddevice callback plays it. Keys 1..A inject latent codes 0..A-1 at the next step. While nobody
presses keys a policy drives (random over the codes the LAM uses, the rest code, a scripted loop, or any
`Policy` object from Python, e.g. an agent from agents/); a key press takes over, and the policy gets control
back after `idle_seconds` without a key (between presses the listener "plays" the rest code). The screen line
shows the current action, who drives, the section, the buffer and the real-time factor; `q` quits.

`headless=true out=FILE.wav seconds=S actions=[[t, code], ...]` generates S seconds without a sound card, the
scripted presses landing at music time t, and writes the WAV: the same Player, clocked by the music instead of
the wall. Without PortAudio or an output device the live mode stops with a message pointing there.

Timing: a code applied at step k conditions frame k·F + lag of the generated audio (F = frames_per_step, lag = the
arrangement's codebook delay span: the frame's first codebook is sampled lag frames before it completes).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from melodjinn.envs.audio_out import open_output
from melodjinn.envs.core import env_kwargs
from melodjinn.envs.music_env import MusicWorldEnv
from melodjinn.envs.policies import ConstantPolicy, Policy, RandomPolicy, ScriptedPolicy, as_policy
from melodjinn.world_model.audio_io import write_audio
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, SECTIONS

@dataclass
class Step:
    action: int
    driver: str  # "you" | "policy"
    audio: np.ndarray


@dataclass
class Player:
    """Decides each step's action (pending key press, listener idle time, policy) and generates it."""

    env: MusicWorldEnv
    policy: Policy
    idle_seconds: float = 2.0
    seed: Optional[int] = None
    pending: deque = field(default_factory=deque)  # (time, action) key presses not yet applied
    last_press: float = -math.inf
    steps: int = 0
    compute_seconds: float = 0.0
    action: Optional[int] = None
    driver: str = "policy"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.observation, _ = self.env.reset(seed=self.seed)
        self.policy.reset()

    @property
    def seconds_per_step(self) -> float:
        return self.env.config.frames_per_step / FRAME_RATE

    def press(self, action: int, at: float) -> None:
        """A key press of code `action` at time `at` (on the clock `step` is called with)."""
        if not 0 <= action < self.env.action_space.n:
            raise ConfigError(f"action {action} out of range: the world model has {self.env.action_space.n} codes")
        with self.lock:
            self.pending.append((at, int(action)))

    def step(self, now: float) -> Step:
        """Generate one step that starts at time `now`."""
        with self.lock:
            key = self.pending.popleft() if self.pending and self.pending[0][0] <= now else None
        if key is not None:
            self.last_press = key[0]
            action, driver = key[1], "you"
        elif now - self.last_press < self.idle_seconds:
            action, driver = self.env.rest_action, "you"
        else:
            action, driver = int(self.policy.act(self.observation)), "policy"
        start = time.perf_counter()
        self.observation, _, _, _, info = self.env.step(action)
        self.compute_seconds += time.perf_counter() - start
        self.steps += 1
        self.action, self.driver = action, driver
        return Step(action, driver, info["audio"])

    @property
    def realtime_factor(self) -> float:
        return self.steps * self.seconds_per_step / max(self.compute_seconds, 1e-9)

    @property
    def section(self) -> str:
        return SECTIONS[int(self.observation["section"])]

    def hit_frame(self, step_index: int) -> int:
        """The frame of the generated audio that the code applied at step `step_index` starts."""
        return step_index * self.env.config.frames_per_step + self.env.core.lag


def random_driver(env: MusicWorldEnv, cfg: DictConfig) -> Policy:
    return RandomPolicy(env.action_space.n, seed=int(cfg.seed), actions=env.used_actions)


def rest_driver(env: MusicWorldEnv, cfg: DictConfig) -> Policy:
    return ConstantPolicy(env.rest_action)


def scripted_driver(env: MusicWorldEnv, cfg: DictConfig) -> Policy:
    script = list(cfg.script)
    if not script:
        raise ConfigError("policy=scripted needs script=[code, code, ...] (one code per step, looped)")
    for a in script:
        if not 0 <= int(a) < env.action_space.n:
            raise ConfigError(f"script code {a} out of range [0, {env.action_space.n})")
    return ScriptedPolicy(script)


# policy=<name> → "module:function(env, cfg) -> Policy", imported when chosen. Agents register theirs here (they
# read cfg.policy_checkpoint), so envs/ never imports agents/ at import time.
POLICIES = {
    "random": "melodjinn.envs.player:random_driver",
    "rest": "melodjinn.envs.player:rest_driver",
    "scripted": "melodjinn.envs.player:scripted_driver",
    "prior": "melodjinn.agents.policies:prior_driver",
    "saved": "melodjinn.agents.policies:saved_driver",
}


def make_policy(env: MusicWorldEnv, cfg: DictConfig) -> Policy:
    name = str(cfg.policy)
    if name not in POLICIES:
        raise ConfigError(f"policy={name!r} unknown; choose one of {', '.join(POLICIES)} (from Python, pass any object "
                          "with act(observation) -> int and reset())")
    module, function = POLICIES[name].split(":")
    return as_policy(getattr(importlib.import_module(module), function)(env, cfg))


def parse_presses(actions: Any) -> list[tuple[float, int]]:
    """[[t, code], ...] or "t:code t:code" → sorted (seconds, code) pairs."""
    if actions is None or actions == "" or actions == []:
        return []
    items: list = []
    if isinstance(actions, str):
        for part in actions.replace(",", " ").split():
            t, sep, a = part.partition(":")
            if not sep:
                raise ConfigError(f"actions={actions!r}: write 'seconds:code' pairs, e.g. actions='0.5:0 1.0:5'")
            items.append((t, a))
    else:
        items = list(OmegaConf.to_container(actions) if isinstance(actions, ListConfig) else actions)
    presses = []
    for item in items:
        try:
            t, a = item
            presses.append((float(t), int(a)))
        except (TypeError, ValueError):
            raise ConfigError(f"actions: each press is [seconds, code], got {item!r}") from None
    if any(t < 0 for t, _ in presses):
        raise ConfigError("actions: press times must be >= 0 seconds")
    return sorted(presses)


def build_player(cfg: DictConfig, policy: Any = None) -> Player:
    kwargs = env_kwargs(cfg.env)
    kwargs.update(reward=None, decode_audio=True, max_steps=2**31 - 1)  # one endless episode: no prompt jumps
    env = MusicWorldEnv(**kwargs)
    chosen = as_policy(policy) if policy is not None else make_policy(env, cfg)
    return Player(env, chosen, float(cfg.idle_seconds), seed=int(cfg.seed))


def play(cfg: DictConfig, policy: Any = None) -> dict:
    if float(cfg.idle_seconds) < 0 or float(cfg.buffer_seconds) <= 0:
        raise ConfigError("idle_seconds must be >= 0 and buffer_seconds > 0")
    presses = parse_presses(cfg.actions)
    if cfg.headless:
        if not cfg.out:
            raise ConfigError("headless=true needs out=FILE.wav")
        if float(cfg.seconds) <= 0:
            raise ConfigError("headless=true needs seconds=S > 0")
        return _headless(cfg, presses, policy)
    return _live(cfg, presses, policy)


def _headless(cfg: DictConfig, presses: list, policy: Any) -> dict:
    player = build_player(cfg, policy)
    for t, a in presses:
        player.press(a, t)
    samples = int(round(float(cfg.seconds) * SAMPLE_RATE))
    steps = math.ceil(samples / (player.env.config.frames_per_step * HOP))
    chunks, injected, drivers = [], [], {"you": 0, "policy": 0}
    for k in range(steps):
        pending = len(player.pending)
        step = player.step(k * player.seconds_per_step)
        if len(player.pending) < pending:
            injected.append({"step": k, "action": step.action, "frame": player.hit_frame(k),
                             "seconds": player.hit_frame(k) / FRAME_RATE})
        drivers[step.driver] += 1
        chunks.append(step.audio)
    audio = np.concatenate(chunks)[:samples]
    path = write_audio(Path(str(cfg.out)), audio, SAMPLE_RATE)
    result = {"out": str(path), "seconds": samples / SAMPLE_RATE, "sample_rate": SAMPLE_RATE, "policy": str(cfg.policy),
              "injected": injected, "steps_by_driver": drivers, "realtime_factor": player.realtime_factor}
    print(json.dumps(result))
    return result


class _Ring:
    """Audio between the generation thread and the sound card's callback."""

    def __init__(self):
        self.chunks: deque = deque()
        self.lock = threading.Lock()
        self.played = 0  # samples handed to the device
        self.underruns = 0

    def push(self, audio: np.ndarray) -> None:
        with self.lock:
            self.chunks.append(audio)

    def callback(self, out, frames, _time, _status) -> None:
        filled = 0
        with self.lock:
            while filled < frames and self.chunks:
                chunk = self.chunks[0]
                n = min(frames - filled, len(chunk))
                out[filled : filled + n, 0] = chunk[:n]
                filled += n
                if n == len(chunk):
                    self.chunks.popleft()
                else:
                    self.chunks[0] = chunk[n:]
            self.played += filled
        if filled < frames:
            out[filled:, 0] = 0
            self.underruns += 1


def _live(cfg: DictConfig, presses: list, policy: Any) -> dict:
    player = build_player(cfg, policy)
    ring = _Ring()
    stream = open_output(SAMPLE_RATE, callback=ring.callback)  # fails with a pointer to headless mode
    A = player.env.action_space.n
    start = time.monotonic()
    generated = 0.0  # seconds of audio generated
    stop = threading.Event()
    errors: list = []

    def clock() -> float:  # playback position: the device's, but never ahead of the wall (a null device races)
        return min(ring.played / SAMPLE_RATE, time.monotonic() - start)

    def generate():
        nonlocal generated
        try:
            while not stop.is_set():
                if generated - clock() >= float(cfg.buffer_seconds):
                    time.sleep(0.005)
                    continue
                ring.push(player.step(time.monotonic() - start).audio)
                generated += player.seconds_per_step
        except Exception as exc:  # surfaced by the main thread
            errors.append(exc)
            stop.set()

    for t, a in presses:
        player.press(a, t)
    worker = threading.Thread(target=generate, name="melodjinn-generation", daemon=True)
    worker.start()
    keys = _Keys()
    out = sys.stdout
    out.write(f"melodjinn play: keys 1..{min(A, 9)} inject codes 0..{min(A, 9) - 1}, q quits; "
              f"the policy drives after {cfg.idle_seconds} s idle\n")
    try:
        while not stop.is_set():
            key = keys.read(0.05)
            if key == "q":
                break
            if key is not None and key.isdigit() and 1 <= int(key) <= min(A, 9):
                player.press(int(key) - 1, time.monotonic() - start)
            elapsed = time.monotonic() - start
            out.write(f"\r\x1b[K{elapsed:6.1f}s | action {player.action} | driver: {player.driver} | section: "
                      f"{player.section} | buffer {generated - clock():.2f}s | RTF {player.realtime_factor:.1f}x")
            out.flush()
            if float(cfg.seconds) > 0 and elapsed >= float(cfg.seconds):
                break
    finally:
        stop.set()
        worker.join(timeout=5)
        keys.close()
        stream.stop()
        stream.close()
        out.write("\n")
    if errors:
        raise errors[0]
    return {"seconds": time.monotonic() - start, "steps": player.steps, "underruns": ring.underruns,
            "realtime_factor": player.realtime_factor}


class _Keys:
    """Single key presses from a terminal (cbreak mode), restored on close; nothing when stdin is not a TTY."""

    def __init__(self):
        self.fd = None
        if sys.stdin.isatty():
            import termios
            import tty

            self.fd = sys.stdin.fileno()
            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)

    def read(self, timeout: float) -> Optional[str]:
        if self.fd is None:
            time.sleep(timeout)
            return None
        import os
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 1).decode(errors="ignore") if ready else None

    def close(self) -> None:
        if self.fd is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
