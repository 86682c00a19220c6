"""The drum world: N one-shot drum sounds at random frames over silence (the source write-up's toy world).

Every hit starts exactly on a frame boundary, so the ground truth is one label per frame: 0 when nothing starts,
d + 1 when drum d starts. The ideal latent-action model finds N + 1 actions (N hits and NOOP).

The kit is fixed by the world definition, not by the seed: drum d always sounds the same, only timing and gain
vary. The sounds are chosen for clearly distinct onsets (the write-up: similar onsets get merged into one action).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.signal import butter, sosfilt

from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.worlds import HOP, SAMPLE_RATE, SECTION_INDEX, Clip, clip_rng

DRUM_NAMES = ("kick", "snare", "hihat", "tom", "clap", "cowbell", "rim", "shaker")


@dataclass
class DrumWorldConfig:
    name: str = "drums"
    num_drums: int = 3  # how many distinct drums (1..8): kick, snare, hihat, tom, clap, cowbell, rim, shaker
    clip_seconds: float = 2.0  # length of one clip; rounded down to whole frames
    hits_per_second: float = 3.0  # mean onset rate (each frame starts a hit with probability rate / 75)
    min_gap_frames: int = 2  # no two onsets closer than this many frames
    gain_min: float = 0.6  # per-hit gain drawn uniformly in [gain_min, gain_max]
    gain_max: float = 1.0


def _decay(seconds: float, length: int) -> np.ndarray:
    t = np.arange(length) / SAMPLE_RATE
    return np.exp(-t / seconds)


def _band(signal: np.ndarray, low: float | None, high: float | None, order: int = 4) -> np.ndarray:
    nyq = SAMPLE_RATE / 2
    if low and high:
        sos = butter(order, [low / nyq, high / nyq], btype="band", output="sos")
    elif low:
        sos = butter(order, low / nyq, btype="high", output="sos")
    else:
        sos = butter(order, high / nyq, btype="low", output="sos")
    return sosfilt(sos, signal)


def _sweep(f_start: float, f_end: float, sweep_seconds: float, length: int) -> np.ndarray:
    t = np.arange(length) / SAMPLE_RATE
    freq = f_end + (f_start - f_end) * np.exp(-t / sweep_seconds)
    return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


@lru_cache(maxsize=None)
def drum_sound(index: int) -> np.ndarray:
    """The one-shot waveform of drum `index` (float32, peak 0.5, at most 0.4 s)."""
    rng = np.random.default_rng(1000 + index)  # fixed noise: the kit never changes
    n = int(0.4 * SAMPLE_RATE)
    noise = rng.standard_normal(n)
    name = DRUM_NAMES[index]
    if name == "kick":
        x = _sweep(160.0, 48.0, 0.03, n) * _decay(0.12, n)
    elif name == "snare":
        x = 0.5 * np.sin(2 * np.pi * 190 * np.arange(n) / SAMPLE_RATE) * _decay(0.05, n)
        x += _band(noise, 1200, 6000) * _decay(0.09, n)
    elif name == "hihat":
        x = _band(noise, 7500, None) * _decay(0.03, n)
    elif name == "tom":
        x = _sweep(330.0, 210.0, 0.05, n) * _decay(0.16, n)
    elif name == "clap":
        env = np.zeros(n)
        for start in (0, 240, 480):  # three 10 ms bursts, the clap's flam
            env[start:] += _decay(0.012, n - start)
        env[720:] += _decay(0.08, n - 720)
        x = _band(noise, 900, 2600) * env
    elif name == "cowbell":
        t = np.arange(n) / SAMPLE_RATE
        x = np.sign(np.sin(2 * np.pi * 562 * t)) + np.sign(np.sin(2 * np.pi * 845 * t))
        x = _band(x, 450, 3000) * _decay(0.1, n)
    elif name == "rim":
        t = np.arange(n) / SAMPLE_RATE
        x = (np.sin(2 * np.pi * 1650 * t) + 0.6 * np.sin(2 * np.pi * 420 * t)) * _decay(0.012, n)
    else:  # shaker: band noise with a soft 15 ms attack, no sharp click
        attack = np.minimum(1.0, np.arange(n) / (0.015 * SAMPLE_RATE))
        x = _band(noise, 3500, 7000) * attack * _decay(0.05, n)
    x = x / np.max(np.abs(x)) * 0.5
    return x.astype(np.float32)


class DrumWorld:
    """Clip `i` under seed `s`: a mono drum track and its per-frame onset labels."""

    stem_names = ("drums",)

    def __init__(self, config: DrumWorldConfig | None = None, seed: int = 0):
        self.config = config or DrumWorldConfig()
        c = self.config
        if not 1 <= c.num_drums <= len(DRUM_NAMES):
            raise ConfigError(f"world.num_drums={c.num_drums}: must be between 1 and {len(DRUM_NAMES)}")
        if c.clip_seconds * SAMPLE_RATE < HOP:
            raise ConfigError(f"world.clip_seconds={c.clip_seconds}: must hold at least one frame ({HOP / SAMPLE_RATE:.4f} s)")
        if not 0 < c.gain_min <= c.gain_max:
            raise ConfigError(f"world.gain_min/gain_max: need 0 < gain_min <= gain_max, got {c.gain_min}, {c.gain_max}")
        if c.hits_per_second < 0 or c.min_gap_frames < 1:
            raise ConfigError("world.hits_per_second must be >= 0 and world.min_gap_frames >= 1")
        self.name = c.name
        self.seed = seed
        self.drum_names = DRUM_NAMES[: c.num_drums]
        self.sounds = [drum_sound(d) for d in range(c.num_drums)]

    @property
    def clip_frames(self) -> int:
        return int(self.config.clip_seconds * SAMPLE_RATE) // HOP

    @property
    def num_events(self) -> int:
        """Event labels including 0 (no onset)."""
        return self.config.num_drums + 1

    def sample_events(self, rng: np.random.Generator, num_frames: int) -> np.ndarray:
        """(T,) onset labels: 0 or drum + 1, respecting min_gap_frames."""
        c = self.config
        p = min(1.0, c.hits_per_second * HOP / SAMPLE_RATE)
        events = np.zeros(num_frames, dtype=np.int64)
        last = -c.min_gap_frames
        starts = rng.random(num_frames) < p
        drums = rng.integers(0, c.num_drums, size=num_frames)
        for t in range(num_frames):
            if starts[t] and t - last >= c.min_gap_frames:
                events[t] = drums[t] + 1
                last = t
        return events

    def render(self, events: np.ndarray, gains: np.ndarray | None = None) -> np.ndarray:
        """(N,) float32 audio for per-frame onset labels `events` (T,), one gain per frame (default 0.8)."""
        num_frames = len(events)
        audio = np.zeros(num_frames * HOP, dtype=np.float32)
        for t in np.flatnonzero(events):
            sound = self.sounds[int(events[t]) - 1]
            start = t * HOP
            end = min(len(audio), start + len(sound))
            gain = 0.8 if gains is None else float(gains[t])
            audio[start:end] += gain * sound[: end - start]
        return audio

    def clip(self, index: int) -> Clip:
        rng = clip_rng(self.name, self.seed, index)
        c = self.config
        events = self.sample_events(rng, self.clip_frames)
        gains = rng.uniform(c.gain_min, c.gain_max, size=self.clip_frames)
        audio = self.render(events, gains)
        return Clip(
            stems=audio[None],
            events=events[None],
            sections=np.full(self.clip_frames, SECTION_INDEX["verse"], dtype=np.int64),
            stem_names=self.stem_names,
            event_names=(("none", *self.drum_names),),
        )
