"""The song world: multi-stem synthetic songs arranged in sections, with per-frame ground truth.

A clip is a short "song" of up to three stems — `drums` (kick, snare, hi-hat), `bass` (a low, dark synth) and
`lead` (a bright synth in a higher register) — at a fixed tempo, arranged in sections (intro, verse, chorus,
bridge, outro). Sections differ in a known direction, so a model's output can be scored against the truth:

| section | drums                      | bass                    | lead                         | energy        |
|---------|----------------------------|-------------------------|------------------------------|---------------|
| intro   | sparse kick + hi-hat       | few long low notes      | one or two notes a bar, low  | quiet         |
| verse   | kick, backbeat, 8th hats   | on most kicks           | on beats, middle register    | medium        |
| chorus  | busy kick, 16th hats       | on every kick, higher   | every beat, highest register | loudest       |
| bridge  | none                       | two long notes a bar    | sparse, middle register      | medium        |
| outro   | like the intro             | few long notes          | sparse, low                  | fades to ~0.1 |

Stems are coupled the way a band is: bass notes start on kicks (a share `bass_off_kick` of them is pushed an
8th late on purpose, so the coupling statistic is high but not trivially 1) and lead notes mostly start on beats.

Timing: every onset starts exactly on a frame boundary (frame = 320 samples at 24 kHz); a beat is
`frames_per_beat` frames, a bar 4 beats of 16 sixteenth-steps. The beat grid runs from frame 0 through the
whole clip, whatever the section boundaries, as a band keeps time across sections.

Per-frame ground truth (`Clip`):
- `events` (S, T): drums: 0 = nothing starts, 1 kick, 2 snare, 3 hi-hat (drum id + 1, one hit per frame:
  kick beats snare beats hi-hat when patterns collide); bass and lead: 0 = nothing starts, 1 = a note starts
  (its pitch is `extra["pitch"]` at that frame). Pitched stems are monophonic.
- `sections` (T,): index into SECTIONS.
- `extra`, each with time as the last axis:
  - `pitch` (S, T) int64: MIDI pitch sounding in the frame, 0 when the stem is silent (always 0 for drums);
  - `gain` (S, T) float32: the gain (0..1, before the stem's fixed mix level) of the note or hit that starts in
    the frame, 0 where nothing starts;
  - `sounding` (S, T) int8: 1 in every frame that a note or hit of the stem covers; outside them the stem's
    audio is exactly zero;
  - `rms` (S, T) float32: RMS of the stem's rendered audio per frame;
  - `beat` (T,) int8: 2 on bar starts, 1 on the other beats, 0 elsewhere;
  - `chord` (T,) int8: pitch class (0 = C) of the root of the chord the band plays in the frame.

Structure: by default each clip is a whole song (intro first, outro last, whole bars, the last section takes
the leftover frames). With `song_seconds` > `clip_seconds` a clip is a bar-aligned window of a longer song, so
short training clips still see every section. A section plan ([(section, frames), ...], from the config or per
`clip(index, plan=...)` call) fixes the structure and the clip length instead, in any order the caller wants.

Clip `i` under seed `s` is a pure function of (config, s, i). The arrangement is always drawn for all stems,
then only the selected ones are rendered, so `stems=[bass]` gives the same bass as the full song.

Statistics for evaluation (`section_statistics`, `coupling`, and their `*_from` forms over plain arrays) sit at
the end of this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, List, Optional, Sequence

import numpy as np

from melodjinn.world_model.drum_world import drum_sound
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, SECTION_INDEX, SECTIONS, Clip, clip_rng

STEM_NAMES = ("drums", "bass", "lead")
KIT = ("kick", "snare", "hihat")  # drum_sound(0..2); listed in collision priority
KICK = 1  # event id of the kick in the drums stem
EVENT_NAMES = {"drums": ("none", *KIT), "bass": ("none", "note"), "lead": ("none", "note")}

STEPS_PER_BAR = 16
BEATS_PER_BAR = 4

# How a song may move from one section to the next (self-transitions are merged into one longer section).
# intro only opens and outro only closes a song.
SECTION_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "intro": ("verse", "chorus", "outro"),
    "verse": ("chorus", "bridge", "outro"),
    "chorus": ("verse", "bridge", "outro"),
    "bridge": ("chorus", "verse", "outro"),
    "outro": (),
}
# Weights the sampler uses among the non-outro successors, and each section's length choices in bars.
_NEXT_WEIGHTS = {
    "intro": {"verse": 0.8, "chorus": 0.2},
    "verse": {"chorus": 0.8, "bridge": 0.2},
    "chorus": {"verse": 0.5, "bridge": 0.5},
    "bridge": {"chorus": 0.8, "verse": 0.2},
}
_BARS = {"intro": (1, 2), "verse": (1, 2), "chorus": (2,), "bridge": (1,), "outro": (1, 2)}

# Pattern letters: the probability that a step of a 16-step bar carries the event.
_P = {".": 0.0, "r": 0.2, "o": 0.5, "x": 1.0}

# Fixed mix level per stem (peak of a gain-1 note), chosen so a chorus mix stays below full scale.
_LEVEL = {"drums": 1.2, "bass": 0.28, "lead": 0.2}  # drum_sound peaks at 0.5, so drums peak at 0.6
_DRUM_LEVEL = {"kick": 1.0, "snare": 0.9, "hihat": 0.55}
_OUTRO_END_GAIN = 0.15


@dataclass(frozen=True)
class SectionStyle:
    kick: str
    snare: str
    hihat: str
    lead: str  # lead onset pattern
    gain: tuple[float, float, float]  # drums, bass, lead
    bass_range: tuple[int, int]  # MIDI register (inclusive); spans at least an octave
    lead_range: tuple[int, int]
    bass_keep: float  # probability that a kick that is not a downbeat carries a bass note
    bass_free: str  # bass pattern used where the section has no kicks
    bass_beats: float  # longest bass note, in beats
    lead_beats: float  # longest lead note, in beats


STYLES: dict[str, SectionStyle] = {
    "intro": SectionStyle(
        kick="x.......o.......", snare="................", hihat="....x.......x...", lead="o.......o.......",
        gain=(0.45, 0.45, 0.4), bass_range=(36, 47), lead_range=(60, 71),
        bass_keep=0.5, bass_free="x...............", bass_beats=4, lead_beats=4,
    ),
    "verse": SectionStyle(
        kick="x.....o.x.o.....", snare="....x.......x...", hihat="..x...x...x...x.", lead="x...o...x...o...",
        gain=(0.7, 0.65, 0.6), bass_range=(36, 47), lead_range=(62, 74),
        bass_keep=0.8, bass_free="x.......x.......", bass_beats=2, lead_beats=2,
    ),
    "chorus": SectionStyle(
        kick="x..o..x.x..o..x.", snare="....x.......x...", hihat=".x.x.x.x.x.x.x.x", lead="x.r.x.r.x.r.x.r.",
        gain=(1.0, 0.9, 0.9), bass_range=(40, 52), lead_range=(72, 86),
        bass_keep=1.0, bass_free="x...x...x...x...", bass_beats=1, lead_beats=1,
    ),
    "bridge": SectionStyle(
        kick="................", snare="................", hihat="................", lead="x.......o...o...",
        gain=(0.0, 0.6, 0.7), bass_range=(31, 43), lead_range=(65, 77),
        bass_keep=0.0, bass_free="x.......x.......", bass_beats=4, lead_beats=4,
    ),
    "outro": SectionStyle(
        kick="x.......o.......", snare="................", hihat="....x.......x...", lead="x.......o.......",
        gain=(0.6, 0.55, 0.5), bass_range=(36, 47), lead_range=(60, 71),
        bass_keep=0.5, bass_free="x...............", bass_beats=4, lead_beats=4,
    ),
}

_MINOR = (0, 2, 3, 5, 7, 8, 10)  # natural minor scale, semitones above the key
_PROGRESSIONS = ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 3, 4))  # scale degrees, one chord per bar


@dataclass
class SongWorldConfig:
    name: str = "songs"
    stems: List[str] = field(default_factory=lambda: list(STEM_NAMES))  # which stems, in this order
    clip_seconds: float = 12.0  # clip length when no section_plan is given; rounded down to whole frames
    song_seconds: float = 0.0  # > clip_seconds: each clip is a bar-aligned window of a song this long
    frames_per_beat: int = 32  # tempo: 75 * 60 / frames_per_beat BPM (32 → 140.6 BPM); a multiple of 4
    bass_off_kick: float = 0.1  # share of bass notes pushed an 8th off their kick
    gain_jitter: float = 0.15  # each note's gain is scaled by U(1 - gain_jitter, 1)
    section_plan: Optional[List[Any]] = None  # fixed structure: [[section, frames], ...]; sets the clip length


@dataclass(frozen=True)
class Note:
    """One onset of one stem. For drums `event` is the drum id + 1 and `pitch` is 0."""

    start: int  # frame
    frames: int  # frames the note or hit covers (clipped to the clip)
    event: int
    pitch: int
    gain: float


@dataclass
class Arrangement:
    """What every stem plays in one clip, before rendering."""

    sections: np.ndarray  # (T,) int64
    notes: dict[str, list[Note]]  # per stem name, sorted by start
    chord: np.ndarray  # (T,) int8 pitch class of the chord root
    beat: np.ndarray  # (T,) int8


def parse_plan(plan: Sequence[Any], where: str = "world.section_plan") -> list[tuple[str, int]]:
    """Normalise a section plan to [(section, frames), ...].

    Entries may be pairs `[section, frames]` or strings `"section:frames"`. Any order of sections is accepted:
    a caller asking for a structure gets that structure (see `is_valid_order` for what the sampler produces).
    """
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence) or len(plan) == 0:
        raise ConfigError(f"{where}: must be a non-empty list of [section, frames] pairs, got {plan!r}")
    out = []
    for i, entry in enumerate(plan):
        if isinstance(entry, str) and ":" in entry:
            entry = entry.split(":", 1)
        if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 2:
            raise ConfigError(f"{where}[{i}]: expected [section, frames] or 'section:frames', got {entry!r}")
        name, frames = str(entry[0]).strip(), entry[1]
        if name not in SECTION_INDEX:
            raise ConfigError(f"{where}[{i}]: unknown section {name!r}; use one of {', '.join(SECTIONS)}")
        try:
            count = int(frames)
        except (TypeError, ValueError):
            count = -1
        if count < 1 or (not isinstance(frames, str) and count != frames):
            raise ConfigError(f"{where}[{i}]: frames must be a positive whole number, got {frames!r}")
        out.append((name, count))
    return out


def plan_sections(plan: Sequence[tuple[str, int]]) -> np.ndarray:
    """(T,) int64 per-frame section labels of a parsed plan."""
    return np.concatenate([np.full(f, SECTION_INDEX[n], dtype=np.int64) for n, f in plan])


def section_runs(sections: np.ndarray) -> list[tuple[int, int, int]]:
    """Contiguous runs of one section label: [(section index, start frame, stop frame), ...]."""
    sections = np.asarray(sections)
    if sections.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(sections)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [sections.size]])
    return [(int(sections[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def is_valid_order(names: Sequence[str]) -> bool:
    """Whether a sequence of section names (one per run) is a plausible song form: intro only first, outro only
    last, every step allowed by SECTION_TRANSITIONS."""
    names = list(names)
    if not names or any(n not in SECTION_INDEX for n in names):
        return False
    if "intro" in names[1:] or "outro" in names[:-1]:
        return False
    return all(b in SECTION_TRANSITIONS[a] for a, b in zip(names, names[1:]))


class SongWorld:
    """Clip `i` under seed `s`: a multi-stem song in sections and its per-frame ground truth."""

    def __init__(self, config: SongWorldConfig | None = None, seed: int = 0):
        self.config = config or SongWorldConfig()
        c = self.config
        stems = list(c.stems)
        if not stems or any(s not in STEM_NAMES for s in stems) or len(set(stems)) != len(stems):
            raise ConfigError(f"world.stems={stems}: pick distinct names among {', '.join(STEM_NAMES)}")
        if not isinstance(c.frames_per_beat, int) or c.frames_per_beat < 4 or c.frames_per_beat % 4:
            raise ConfigError(f"world.frames_per_beat={c.frames_per_beat}: must be a multiple of 4 (16th notes on frames), at least 4")
        if not 0.0 <= c.bass_off_kick <= 1.0:
            raise ConfigError(f"world.bass_off_kick={c.bass_off_kick}: must be in [0, 1]")
        if not 0.0 <= c.gain_jitter < 1.0:
            raise ConfigError(f"world.gain_jitter={c.gain_jitter}: must be in [0, 1)")
        self.plan = parse_plan(c.section_plan) if c.section_plan is not None else None
        if c.song_seconds < 0:
            raise ConfigError(f"world.song_seconds={c.song_seconds}: must be >= 0 (0 = each clip is a whole song)")
        if self.plan is None and c.clip_seconds * SAMPLE_RATE < HOP:
            raise ConfigError(f"world.clip_seconds={c.clip_seconds}: must hold at least one frame ({HOP / SAMPLE_RATE:.4f} s)")
        self.name = c.name
        self.seed = seed
        self.stem_names = tuple(stems)
        self.frames_per_beat = c.frames_per_beat
        self.step_frames = c.frames_per_beat * BEATS_PER_BAR // STEPS_PER_BAR
        self.bar_frames = c.frames_per_beat * BEATS_PER_BAR
        self.tempo_bpm = 60.0 * FRAME_RATE / c.frames_per_beat

    @property
    def clip_frames(self) -> int:
        if self.plan is not None:
            return sum(frames for _, frames in self.plan)
        return int(self.config.clip_seconds * SAMPLE_RATE) // HOP

    @property
    def event_names(self) -> tuple[tuple[str, ...], ...]:
        return tuple(EVENT_NAMES[s] for s in self.stem_names)

    # ---- structure -------------------------------------------------------------------------------------------

    def sample_plan(self, rng: np.random.Generator, num_frames: int) -> list[tuple[str, int]]:
        """A plausible form covering exactly `num_frames`: whole bars, the last section takes the leftover frames."""
        full_bars, leftover = divmod(num_frames, self.bar_frames)
        outro = int(rng.choice(_BARS["outro"]))
        current, used = "intro", min(int(rng.choice(_BARS["intro"])), max(full_bars, 1))
        bars = [["intro", used]]
        while used < full_bars - outro:
            options = _NEXT_WEIGHTS[current]
            if not any(name == "chorus" for name, _ in bars) and current == "verse":
                options = {"chorus": 1.0}  # a song reaches its chorus before anything else happens
            current = str(rng.choice(list(options), p=np.array(list(options.values())) / sum(options.values())))
            length = min(int(rng.choice(_BARS[current])), full_bars - outro - used)
            bars.append([current, length])
            used += length
        if used < full_bars:
            bars.append(["outro", full_bars - used])
        plan = [(name, n * self.bar_frames) for name, n in bars]
        name, frames = plan[-1]
        plan[-1] = (name, frames + leftover)
        total = sum(f for _, f in plan)
        while total > num_frames:  # a clip shorter than one bar: cut from the end
            name, frames = plan.pop()
            total -= frames
            if total < num_frames:
                plan.append((name, num_frames - total))
                total = num_frames
        return plan

    # ---- arrangement -----------------------------------------------------------------------------------------

    def arrange(self, index: int, plan: Sequence[Any] | None = None) -> Arrangement:
        """The notes every stem plays in clip `index` (all stems, selected or not)."""
        if index < 0:
            raise IndexError(f"clip index must be >= 0, got {index}")
        rng = clip_rng(self.name, self.seed, index)
        # One independent stream per concern, so a fixed plan changes the structure and nothing else's draws.
        r_form, r_harmony, r_drums, r_bass, r_lead = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**62, size=5))
        if plan is not None:
            sections = plan_sections(parse_plan(plan, where="plan"))
        elif self.plan is not None:
            sections = plan_sections(self.plan)
        else:
            T = self.clip_frames
            song = max(T, int(self.config.song_seconds * SAMPLE_RATE) // HOP)
            sections = plan_sections(self.sample_plan(r_form, song))
            if song > T:  # a window that starts on a bar, so the beat grid still starts at frame 0
                start = self.bar_frames * int(r_form.integers(0, (song - T) // self.bar_frames + 1))
                sections = sections[start : start + T]
        T = len(sections)

        key = int(r_harmony.integers(0, 12))
        progression = _PROGRESSIONS[int(r_harmony.integers(0, len(_PROGRESSIONS)))]
        frames = np.arange(T)
        bar_of = frames // self.bar_frames
        degree = np.array(progression)[bar_of % len(progression)]
        chord = ((key + np.array(_MINOR)[degree]) % 12).astype(np.int8)
        beat = np.where(frames % self.frames_per_beat == 0, 1, 0).astype(np.int8)
        beat[frames % self.bar_frames == 0] = 2

        fade = np.ones(T)
        for sec, a, b in section_runs(sections):
            if SECTIONS[sec] == "outro":
                fade[a:b] = 1.0 - (1.0 - _OUTRO_END_GAIN) * np.arange(b - a) / max(b - a, 1)

        grid = frames[frames % self.step_frames == 0]  # every 16th step of the clip
        drums = self._arrange_drums(r_drums, grid, sections, fade, T)
        kicks = {n.start for n in drums if n.event == KICK}
        bass = self._arrange_bass(r_bass, grid, sections, fade, kicks, chord, T)
        lead = self._arrange_lead(r_lead, grid, sections, fade, key, progression, T)
        return Arrangement(sections=sections, notes={"drums": drums, "bass": bass, "lead": lead}, chord=chord, beat=beat)

    def _step(self, t: int) -> int:
        return (t % self.bar_frames) // self.step_frames

    def _jitter(self, u: float) -> float:
        return 1.0 - self.config.gain_jitter * u

    def _accent(self, step: int) -> float:
        return 1.0 if step == 0 else 0.9 if step % 4 == 0 else 0.8

    def _arrange_drums(self, rng, grid, sections, fade, T) -> list[Note]:
        hit_frames = -(-len(drum_sound(0)) // HOP)
        notes = []
        for t in grid:
            step = self._step(int(t))
            style = STYLES[SECTIONS[sections[t]]]
            draws = rng.random(2 * len(KIT))  # a fixed number of draws per step keeps later steps stable
            for d, drum in enumerate(KIT):
                if draws[d] < _P[getattr(style, drum)[step]]:
                    gain = style.gain[0] * _DRUM_LEVEL[drum] * self._accent(step) * self._jitter(draws[len(KIT) + d]) * fade[t]
                    notes.append(Note(int(t), min(hit_frames, T - int(t)), d + 1, 0, float(gain)))
                    break
        return notes

    def _arrange_bass(self, rng, grid, sections, fade, kicks, chord, T) -> list[Note]:
        c = self.config
        starts: dict[int, float] = {}  # onset frame → the uniform draw that shapes its pitch
        eighth = 2 * self.step_frames
        for t in grid:
            t = int(t)
            step = self._step(t)
            sec = sections[t]
            style = STYLES[SECTIONS[sec]]
            keep, shift, shape = rng.random(3)
            if "x" in style.kick or "o" in style.kick:
                if t not in kicks or not (step == 0 or keep < style.bass_keep):
                    continue
                late = t + eighth
                if shift < c.bass_off_kick and late < T and sections[late] == sec and late not in kicks and self._step(late) != 0:
                    t = late  # deliberately off the kick: the coupling is strong, not perfect
            elif style.bass_free[step] != "x":
                continue
            starts[t] = shape
        notes = []
        onsets = sorted(starts)
        for i, t in enumerate(onsets):
            step = self._step(t)
            style = STYLES[SECTIONS[sections[t]]]
            u = starts[t]
            pc = int(chord[t])
            if step != 0 and u < 0.3:
                pc = (pc + 7) % 12  # the fifth
            lo, hi = style.bass_range
            pitch = lo + (pc - lo) % 12
            if step != 0 and 0.3 <= u < 0.45 and pitch + 12 <= hi:
                pitch += 12
            end = onsets[i + 1] if i + 1 < len(onsets) else T
            length = min(end - t, int(style.bass_beats * self.frames_per_beat))
            gain = style.gain[1] * self._accent(step) * self._jitter(rng.random()) * fade[t]
            notes.append(Note(t, length, 1, int(pitch), float(gain)))
        return notes

    def _arrange_lead(self, rng, grid, sections, fade, key, progression, T) -> list[Note]:
        onsets = []
        for t in grid:
            t = int(t)
            style = STYLES[SECTIONS[sections[t]]]
            if rng.random() < _P[style.lead[self._step(t)]]:
                onsets.append(t)
        notes = []
        prev, prev_sec = 0, -1
        for i, t in enumerate(onsets):
            step = self._step(t)
            sec = int(sections[t])
            style = STYLES[SECTIONS[sec]]
            lo, hi = style.lead_range
            if sec != prev_sec:
                prev, prev_sec = (lo + hi) // 2, sec
            deg = progression[(t // self.bar_frames) % len(progression)]
            if step % 4 == 0:  # on beats: a tone of the bar's chord
                pcs = {(key + _MINOR[(deg + k) % 7]) % 12 for k in (0, 2, 4)}
            else:  # between beats: any note of the scale
                pcs = {(key + s) % 12 for s in _MINOR}
            cands = np.array([p for p in range(lo, hi + 1) if p % 12 in pcs])
            weights = np.exp(-np.abs(cands - prev) / 3.0) * np.where(cands == prev, 0.3, 1.0)
            pitch = int(rng.choice(cands, p=weights / weights.sum()))
            prev = pitch
            end = onsets[i + 1] if i + 1 < len(onsets) else T
            length = min(end - t, int(style.lead_beats * self.frames_per_beat))
            gain = style.gain[2] * self._accent(step) * self._jitter(rng.random()) * fade[t]
            notes.append(Note(t, length, 1, pitch, float(gain)))
        return notes

    # ---- rendering -------------------------------------------------------------------------------------------

    def render_stem(self, stem: str, notes: Sequence[Note], num_frames: int) -> np.ndarray:
        """(N,) float32 audio of one stem's notes. Pitched notes never overlap and end in silence."""
        audio = np.zeros(num_frames * HOP, dtype=np.float64)
        level = _LEVEL[stem]
        for n in notes:
            start = n.start * HOP
            if stem == "drums":
                sound = drum_sound(n.event - 1)
                end = min(len(audio), start + len(sound))
                audio[start:end] += level * n.gain * sound[: end - start]
            else:
                audio[start : start + n.frames * HOP] += level * n.gain * _synth_note(stem, n.pitch, n.frames * HOP)
        return audio.astype(np.float32)

    def clip(self, index: int, plan: Sequence[Any] | None = None) -> Clip:
        """Clip `index`; `plan` ([(section, frames), ...]) fixes its structure and length for this call."""
        arr = self.arrange(index, plan)
        T = len(arr.sections)
        S = len(self.stem_names)
        stems = np.zeros((S, T * HOP), dtype=np.float32)
        events = np.zeros((S, T), dtype=np.int64)
        pitch = np.zeros((S, T), dtype=np.int64)
        gain = np.zeros((S, T), dtype=np.float32)
        sounding = np.zeros((S, T), dtype=np.int8)
        for s, name in enumerate(self.stem_names):
            notes = arr.notes[name]
            stems[s] = self.render_stem(name, notes, T)
            for n in notes:
                events[s, n.start] = n.event
                gain[s, n.start] = n.gain
                sounding[s, n.start : n.start + n.frames] = 1
                if n.pitch:
                    pitch[s, n.start : n.start + n.frames] = n.pitch
        return Clip(
            stems=stems,
            events=events,
            sections=arr.sections,
            stem_names=self.stem_names,
            event_names=self.event_names,
            extra={
                "pitch": pitch,
                "gain": gain,
                "sounding": sounding,
                "rms": frame_rms(stems),
                "beat": arr.beat,
                "chord": arr.chord,
            },
        )


# ---- synthesis -------------------------------------------------------------------------------------------------

_TABLE = 4096
_RELEASE = int(0.008 * SAMPLE_RATE)  # shorter than a frame, so a note is silent again by its last frame's end


@lru_cache(maxsize=None)
def _wavetable(stem: str, pitch: int) -> np.ndarray:
    """One period of the stem's timbre at `pitch`, band-limited below Nyquist, peak 1.

    Bass: a saw through a steep lowpass near 700 Hz (dark, round). Lead: odd-heavy pulse-like spectrum, gently
    rolled off above 4.5 kHz (bright, reedy). Additive synthesis stands in for a filter so that a note's audio
    stops exactly when its envelope does (an IIR filter would ring past the note's last frame).
    """
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    phase = 2 * np.pi * np.arange(_TABLE) / _TABLE
    wave = np.zeros(_TABLE)
    top = 5000.0 if stem == "bass" else 11000.0
    for k in range(1, int(min(top, 0.45 * SAMPLE_RATE) / f0) + 1):
        if stem == "bass":
            w = 1.0 / k / math.sqrt(1.0 + (k * f0 / 700.0) ** 4)
        else:
            w = (1.0 if k % 2 else 0.35) / k / math.sqrt(1.0 + (k * f0 / 4500.0) ** 2)
        wave += w * np.sin(k * phase)
    return wave / np.max(np.abs(wave))


@lru_cache(maxsize=None)
def _envelope(stem: str, n: int) -> np.ndarray:
    attack, sustain, decay = (0.003, 0.5, 0.15) if stem == "bass" else (0.005, 0.6, 0.25)
    t = np.arange(n) / SAMPLE_RATE
    env = sustain + (1.0 - sustain) * np.exp(-t / decay)
    a = max(1, min(int(attack * SAMPLE_RATE), n // 4))
    env[:a] *= np.arange(a) / a
    r = max(2, min(_RELEASE, n // 4))
    env[-r:] *= np.linspace(1.0, 0.0, r)  # ends on an exact zero: the stem is silent after the note
    return env


def _synth_note(stem: str, pitch: int, n: int) -> np.ndarray:
    """(n,) samples of one note at gain 1 (peak <= 1), starting from silence and ending in silence."""
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    pos = (np.arange(n) * (f0 / SAMPLE_RATE) % 1.0) * _TABLE
    i0 = pos.astype(np.int64)
    frac = pos - i0
    table = _wavetable(stem, pitch)
    wave = table[i0] * (1.0 - frac) + table[(i0 + 1) % _TABLE] * frac
    return wave * _envelope(stem, n)


def frame_rms(audio: np.ndarray) -> np.ndarray:
    """(..., T) RMS per frame of (..., T * HOP) audio."""
    audio = np.asarray(audio, dtype=np.float64)
    frames = audio.shape[-1] // HOP
    shaped = audio[..., : frames * HOP].reshape(*audio.shape[:-1], frames, HOP)
    return np.sqrt(np.mean(shaped**2, axis=-1)).astype(np.float32)


# ---- statistics ----------------------------------------------------------------------------------------------
# Pure functions of per-frame labels. The `*_from` forms take arrays, so the same statistic can be computed from
# onsets and pitches detected in generated audio and compared with the world's truth.


def section_statistics_from(
    events: np.ndarray,
    sections: np.ndarray,
    stem_names: Sequence[str],
    pitch: np.ndarray | None = None,
    gain: np.ndarray | None = None,
    rms: np.ndarray | None = None,
    frame_rate: float = FRAME_RATE,
) -> dict[str, dict[str, Any]]:
    """Per section name present: `seconds`, `onsets_per_second` (all stems) and per stem
    `onsets_per_second` (density), `gain` (mean onset gain), `rms` (mean frame RMS: energy) and
    `pitch_mean` / `pitch_low` / `pitch_high` (register, over onsets with a pitch).

    events (S, T), sections (T,), pitch / gain / rms (S, T) or None. A value with nothing to average is NaN.
    All runs of a section are pooled.
    """
    events = np.asarray(events)
    sections = np.asarray(sections)
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(SECTIONS):
        mask = sections == k
        if not mask.any():
            continue
        seconds = float(mask.sum()) / frame_rate
        stems = {}
        for s, stem in enumerate(stem_names):
            onset = mask & (events[s] > 0)
            row: dict[str, float] = {"onsets_per_second": float(onset.sum()) / seconds}
            if gain is not None:
                row["gain"] = _mean(np.asarray(gain)[s][onset])
            if rms is not None:
                row["rms"] = _mean(np.asarray(rms)[s][mask])
            if pitch is not None:
                p = np.asarray(pitch)[s][onset]
                p = p[p > 0]
                row["pitch_mean"] = _mean(p)
                row["pitch_low"] = float(p.min()) if p.size else math.nan
                row["pitch_high"] = float(p.max()) if p.size else math.nan
            stems[stem] = row
        total = sum(r["onsets_per_second"] for r in stems.values())
        out[name] = {"seconds": seconds, "onsets_per_second": total, "stems": stems}
    return out


def section_statistics(clip: Clip) -> dict[str, dict[str, Any]]:
    """`section_statistics_from` on a clip's labels (pitch, gain and rms from `clip.extra` when present)."""
    return section_statistics_from(
        clip.events,
        clip.sections,
        clip.stem_names,
        pitch=clip.extra.get("pitch"),
        gain=clip.extra.get("gain"),
        rms=clip.extra.get("rms"),
    )


def coupling_from(
    events: np.ndarray,
    sections: np.ndarray,
    stem_names: Sequence[str],
    beat: np.ndarray | None = None,
    tolerance: int = 0,
) -> dict[str, float]:
    """How tightly the stems lock together.

    - `bass_on_kick`: share of bass onsets with a kick within `tolerance` frames, counting only bass onsets in
      section runs that have at least one kick (a bridge without drums cannot couple);
    - `lead_on_beat`: share of lead onsets within `tolerance` frames of a beat (`beat` (T,) > 0), when given;
    - `bass_onsets` / `lead_onsets`: how many onsets each share is over.
    A share with no onsets to count, or a stem that is missing, is NaN.
    """
    events = np.asarray(events)
    names = list(stem_names)
    out = {"bass_on_kick": math.nan, "bass_onsets": 0.0, "lead_on_beat": math.nan, "lead_onsets": 0.0}
    if "drums" in names and "bass" in names:
        kick = events[names.index("drums")] == KICK
        bass = events[names.index("bass")] > 0
        near_kick = _dilate(kick, tolerance)
        counted = hit = 0
        for _, a, b in section_runs(sections):
            if kick[a:b].any():
                counted += int(bass[a:b].sum())
                hit += int((bass[a:b] & near_kick[a:b]).sum())
        out["bass_onsets"] = float(counted)
        out["bass_on_kick"] = hit / counted if counted else math.nan
    if "lead" in names and beat is not None:
        lead = events[names.index("lead")] > 0
        n = int(lead.sum())
        out["lead_onsets"] = float(n)
        out["lead_on_beat"] = int((lead & _dilate(np.asarray(beat) > 0, tolerance)).sum()) / n if n else math.nan
    return out


def coupling(clip: Clip, tolerance: int = 0) -> dict[str, float]:
    """`coupling_from` on a clip's labels."""
    return coupling_from(clip.events, clip.sections, clip.stem_names, beat=clip.extra.get("beat"), tolerance=tolerance)


def _dilate(mask: np.ndarray, width: int) -> np.ndarray:
    if width <= 0:
        return mask.copy()
    out = mask.copy()
    for d in range(1, width + 1):
        out[d:] |= mask[:-d]
        out[:-d] |= mask[d:]
    return out


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if np.size(values) else math.nan
