"""Listeners: whoever answers an A/B comparison — a person at the console, or any Python callable.

    listener(comparison) -> "A" | "B" | "tie" | "skip"   (or an `Answer` with latency and replay count)

- `ConsoleListener`: plays the context, then A, then B (sounddevice), and reads a, b, t, s, r (replay) or q (end
  the session) from the keyboard. Headless (no sound card, or `headless=True`), it writes the three clips as WAV files and prints their
  paths instead, so a person can listen with any player and still answer here.
- `SimulatedListener`: a listener with a hidden preference — a utility of what it hears — answering by the
  Bradley-Terry rule P(A) = σ((u(A) - u(B)) / temperature). This is how the personalisation loop is tested
  without people: the preference is known, so a personalised policy's win rate under it can be measured.

Utilities (`make_utility`) read the clip's audio, as a person would, never the actions behind it:

    drum:<name>   hits per second of one drum of the world's kit, weighted by strength (the drum world's detector)
    loud / quiet  the clip's level (dB of its mean power), higher / lower preferred
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Union

import numpy as np

from melodjinn.feedback.store import CHOICES, Clip, Comparison
from melodjinn.world_model.errors import ConfigError, DataError
from melodjinn.world_model.worlds import SAMPLE_RATE


class EndSession(Exception):
    """Raised by a listener to end its session early (a person typed q, or input ran out); answers already given
    are stored."""


@dataclass
class Answer:
    choice: str  # one of CHOICES
    latency_s: float = 0.0  # from the end of playback to the answer
    replays: int = 0


class Listener(Protocol):
    def __call__(self, comparison: Comparison) -> Union[str, Answer]: ...


def ask(listener: Callable[[Comparison], Any], comparison: Comparison) -> Answer:
    """The listener's answer to one comparison, checked; a bare string answer is timed here."""
    started = time.perf_counter()
    answer = listener(comparison)
    if isinstance(answer, str):
        answer = Answer(answer, time.perf_counter() - started)
    if not isinstance(answer, Answer) or answer.choice not in CHOICES:
        raise DataError(f"a listener must answer one of {', '.join(CHOICES)} (or an Answer), got {answer!r}")
    return answer


# ---- simulated listeners --------------------------------------------------------------------------------------


class DrumHitRate:
    """Hits per second of one drum of the world's kit, detected in the clip's audio, each weighted by its strength
    (≈ the gain it was played at): a louder hit counts more, and two clips rarely tie."""

    def __init__(self, world: Any, drum: str):
        from melodjinn.world_model.events import DrumHitDetector

        names = list(getattr(world, "drum_names", ()))
        if drum not in names:
            raise ConfigError(f"drum {drum!r} is not in this world's kit ({', '.join(names) or 'no kit'}); "
                              f"pick one of them, e.g. listener.preference=drum:{names[0] if names else 'kick'}")
        self.index = names.index(drum) + 1  # detector labels: 0 = none, d + 1 = drum d
        self.detector = DrumHitDetector.for_world(world)
        self.name = f"drum:{drum}"

    def __call__(self, clip: Clip) -> float:
        labels, strength = self.detector.hit_strengths(np.asarray(clip.audio, dtype=np.float32))
        return float(strength[labels == self.index].sum() / (len(clip.audio) / SAMPLE_RATE))


class Loudness:
    """The clip's level, 10·log10 of its mean power (dB); `sign` -1 prefers quiet music."""

    def __init__(self, sign: float = 1.0):
        self.sign = float(sign)
        self.name = "loud" if sign > 0 else "quiet"

    def __call__(self, clip: Clip) -> float:
        power = float(np.mean(np.asarray(clip.audio, dtype=np.float64) ** 2))
        return self.sign * 10 * math.log10(power + 1e-10)


def make_utility(preference: str, world: Any = None) -> Callable[[Clip], float]:
    """A hidden preference by name (see the module docstring)."""
    kind, _, arg = preference.partition(":")
    if kind == "drum" and arg:
        if world is None:
            raise ConfigError("a drum preference needs the world whose kit it listens for")
        return DrumHitRate(world, arg)
    if kind in ("loud", "quiet") and not arg:
        return Loudness(1.0 if kind == "loud" else -1.0)
    raise ConfigError(f"unknown preference {preference!r}; use drum:<name> (e.g. drum:snare), loud or quiet")


class SimulatedListener:
    """Answers by a hidden utility (Bradley-Terry at `temperature`; 0 = always the better clip). `tie_margin`:
    utilities closer than this are a tie. Seeded: the same comparisons get the same answers."""

    def __init__(self, utility: Callable[[Clip], float], temperature: float = 0.5, tie_margin: float = 0.0,
                 seed: int = 0, name: Optional[str] = None):
        if temperature < 0 or tie_margin < 0:
            raise ConfigError(f"temperature and tie_margin must be >= 0, got {temperature} and {tie_margin}")
        self.utility, self.temperature, self.tie_margin = utility, float(temperature), float(tie_margin)
        self.rng = np.random.default_rng(seed)
        self.name = name or f"simulated-{getattr(utility, 'name', 'listener')}"

    def __call__(self, comparison: Comparison) -> str:
        gap = self.utility(comparison.a) - self.utility(comparison.b)
        if abs(gap) <= self.tie_margin:
            return "tie"
        if self.temperature == 0:
            return "A" if gap > 0 else "B"
        p_a = 1.0 / (1.0 + math.exp(-gap / self.temperature))
        return "A" if self.rng.random() < p_a else "B"


# ---- people ---------------------------------------------------------------------------------------------------

KEYS = {"a": "A", "b": "B", "t": "tie", "s": "skip"}


class ConsoleListener:
    """A person at the keyboard (see the module docstring). `read` and `write` default to input() and print();
    `clips_dir` is where headless mode writes the WAVs (default: a temporary directory per session)."""

    def __init__(self, name: str = "listener", headless: bool = False, clips_dir: Optional[str | Path] = None,
                 read: Callable[[str], str] = input, write: Callable[[str], None] = print):
        self.name, self.headless = name, bool(headless)
        self.clips_dir = Path(clips_dir) if clips_dir is not None else None
        self.read, self.write = read, write

    def __call__(self, comparison: Comparison) -> Answer:
        replays = 0
        self._present(comparison)
        heard = time.perf_counter()
        while True:
            try:
                key = self.read("[a] A better  [b] B better  [t] tie  [s] skip  [r] replay  [q] quit > ").strip().lower()
            except EOFError:
                raise EndSession("input ended") from None
            if key == "q":
                raise EndSession("the listener quit")
            if key == "r":
                replays += 1
                self._present(comparison)
                heard = time.perf_counter()
            elif key in KEYS:
                return Answer(KEYS[key], time.perf_counter() - heard, replays)
            else:
                self.write(f"unknown answer {key!r}; type a, b, t, s, r or q")

    def _present(self, comparison: Comparison) -> None:
        parts = [("context", comparison.prompt_audio), ("A", comparison.a.audio), ("B", comparison.b.audio)]
        self.write(f"comparison {comparison.index + 1}: the context, then A, then B")
        if self.headless:
            self._write_files(comparison, parts)
            return
        from melodjinn.envs.audio_out import open_output

        stream = open_output(comparison.sample_rate, hint="listen headless instead: `melodjinn rate listener.headless=true "
                                                          "...` writes the clips as WAV files and still asks for answers")
        try:
            gap = np.zeros(comparison.sample_rate // 2, dtype=np.float32)
            for label, audio in parts:
                if audio is None or len(audio) == 0:
                    continue
                self.write(f"  playing {label}")
                stream.write(np.ascontiguousarray(np.concatenate([audio, gap]), dtype=np.float32))
        finally:
            stream.stop()
            stream.close()

    def _write_files(self, comparison: Comparison, parts) -> None:
        import tempfile

        from melodjinn.world_model.audio_io import write_audio

        if self.clips_dir is None:
            self.clips_dir = Path(tempfile.mkdtemp(prefix="melodjinn-listen-"))
        for label, audio in parts:
            if audio is None or len(audio) == 0:
                continue
            path = write_audio(self.clips_dir / f"{comparison.session}-{comparison.index:03d}-{label}.wav",
                               np.asarray(audio, dtype=np.float32), comparison.sample_rate)
            self.write(f"  {label}: {path}")
