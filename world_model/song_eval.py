"""Song-world evaluation: does the section plan shape the music, and do the stems stay locked together?

`eval-world` calls `evaluate_songs` for a world model trained on the song world. It listens to decoded stems
with simple detectors and scores generated songs against the world's ground truth:

- **Detectors** (`StemListener`): drums — the kit-template hit detector of `events.py` with the song world's kit;
  bass and lead — a note starts where a stem's energy rises out of the dip that ends every synth note (the
  world's notes release to silence at their last frame's end) or out of silence, and for the lead also where a
  held pitch moves to another (`pitch.py`: a codec may not render the short dip between legato notes); its pitch
  is the median `frame_pitch` over the note's first frames; energy — per-frame RMS of each stem. Generated and true
  songs are measured with the same detectors on codec-decoded audio, so what the detectors miss cancels out;
  their F1 against the labels on that audio (`detector_f1`) says how far to trust them.
- **Protocol**: `song_clips` held-out whole songs (seed `eval_seed`, each `song_seconds` long, its own sampled
  form). The first `song_prompt_frames` frames of each are the prompt; the rest is generated with the song's
  section plan and the null action throughout (so the plan is the only cue for the form), by the model's own
  `generate` (past the training window, `window_frames`, the context rolls over).
  - `joint`: every stem in one pass (the multistream backbone);
  - `independent`: the same model run once per stem with a different seed, stem s taken from run s — each stem
    is a sample of its own part given the prompt and the plan, generated without seeing the other stems.
- **Per-section statistics** (`section_table`): per section and stem, onsets per second (density), mean frame
  RMS (energy) and mean onset pitch (register), generated vs true; `section_correlation`: Pearson r between
  generated and true values over sections, per statistic, averaged over stems (`within_stem`) and pooled over
  (section, stem) pairs (`pooled`; stems' levels differ, so this one is easier).
- **Coupling** (`coupling`): share of bass onsets within `coupling_tolerance` frames of a kick (in sections with
  kicks), share of lead onsets near a beat, and `bass_kick_lift` — bass-on-kick beyond what the beat grid alone
  gives two parts that never heard each other (`kick_lift`) — for the truth, joint and independent generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from melodjinn.world_model.events import DetectorConfig, DrumHitDetector, event_f1
from melodjinn.world_model.pitch import frame_pitch, hz
from melodjinn.world_model.song_world import (
    KIT,
    SongWorld,
    SongWorldConfig,
    coupling_from,
    frame_rms,
    section_statistics_from,
)
from melodjinn.world_model.drum_world import drum_sound
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.worlds import HOP, SAMPLE_RATE, SECTIONS

# MIDI registers the pitch tracker searches, per pitched stem (a little wider than the world's ranges)
PITCH_RANGE = {"bass": (28, 56), "lead": (55, 90)}
STATISTICS = ("onsets_per_second", "rms", "pitch_mean")
PITCH_VOICING = 0.7  # normalised autocorrelation a frame needs for a pitch (note pitches, pitch-change onsets)
NOTE_PITCH_FRAMES = 8  # a note's pitch is read from its first frames, at most this many
# Whether a stem's listener also hears a note where a held pitch moves to another (`with_pitch_changes`). Chosen on
# held-out truth (seed 1000) as the shipped song codec (additive) renders it: lead F1 0.51 → 0.69 with it (that
# codec does not render the short dip between legato lead notes), bass 0.90 → 0.86 (so off).
STEM_PITCH_CHANGE_ONSETS = {"bass": False, "lead": True}
# note_onsets' (window, skip, rise) per pitched stem, tuned on held-out songs (seed 1000) as the earlier (tiny,
# waveform) song codec rendered them (F1 bass 0.90, lead 0.39; 0.90 / 0.97 on the original audio). The window must
# span a period of the stem's lowest notes, or the measure follows the waveform's phase.
STEM_ONSET_WINDOWS = {"bass": (2 * HOP, HOP // 2, 1.5), "lead": (HOP // 2, HOP // 2, 1.5)}


@dataclass
class SongEvalConfig:
    song_clips: int = 16  # held-out whole songs generated and compared
    song_seconds: float = 12.0  # length of each song (a whole form, intro … outro)
    song_prompt_frames: int = 64  # prompt frames taken from the true song
    song_temperature: float = 0.7  # sampling temperature for the generated songs (chosen on seed 2000 songs)
    coupling_tolerance: int = 1  # frames between a bass onset and its kick (a lead onset and its beat)


# ---- listening --------------------------------------------------------------------------------------------------


class StemListener:
    """Per-frame onsets, onset pitches and energy of decoded song-world stems (see the module docstring)."""

    def __init__(self, stem_names: Sequence[str], drum_threshold: float = 0.12, floor: float = 0.01):
        self.stem_names = tuple(stem_names)
        # song-world drums are quieter than the drum world's (section gain × kit level), hence a lower threshold
        self.drums = DrumHitDetector([drum_sound(d) for d in range(len(KIT))], DetectorConfig(threshold=drum_threshold))
        self.floor = floor

    def listen(self, stems: np.ndarray) -> dict[str, np.ndarray]:
        """stems (B, S, N) audio → events (B, S, T) (drum id + 1 / 1 = a note starts), pitch (B, S, T) (MIDI at
        onsets, 0 elsewhere), rms (B, S, T)."""
        stems = np.asarray(stems, dtype=np.float32)
        B, S, N = stems.shape
        T = N // HOP
        events = np.zeros((B, S, T), dtype=np.int64)
        pitch = np.zeros((B, S, T), dtype=np.float64)
        for s, name in enumerate(self.stem_names):
            if name == "drums":
                events[:, s] = self.drums.detect(stems[:, s, : T * HOP])
                continue
            lo, hi = PITCH_RANGE[name]
            frame_midi = frame_pitch(torch.from_numpy(stems[:, s]), int(2.2 * SAMPLE_RATE / hz(lo)), (lo, hi),
                                     PITCH_VOICING).numpy()[:, :T]  # (B, T), NaN where nothing periodic sounds
            for b in range(B):
                window, skip, rise = STEM_ONSET_WINDOWS[name]
                onsets = note_onsets(stems[b, s], window, skip, rise, self.floor)
                if STEM_PITCH_CHANGE_ONSETS[name]:
                    onsets = with_pitch_changes(onsets, frame_midi[b])
                events[b, s] = onsets
                starts = np.flatnonzero(onsets)
                for t, end in zip(starts, [*starts[1:], T]):
                    pitch[b, s, t] = note_pitch(frame_midi[b, t : min(end, t + NOTE_PITCH_FRAMES)])
        return {"events": events, "pitch": pitch, "rms": frame_rms(stems)}


def note_onsets(audio: np.ndarray, window: int, skip: int = 0, rise: float = 1.5, floor: float = 0.01,
                min_gap: int = 4) -> np.ndarray:
    """(N,) audio of a monophonic synth stem → (T,) int64, 1 where a note starts.

    Every note of the world ends in a release to silence at a frame boundary and starts at full level, settling
    later; so at an onset the RMS of the `window` samples after the boundary (past `skip` samples of attack) is
    well above that of the `window` samples before it, and inside a note it is not. The window must span a
    period of the stem's lowest notes, or the measure follows the waveform's phase (`STEM_ONSET_WINDOWS`).
    Ratios above `rise` (with a level above `floor`) are onsets, the strongest first, none closer than
    `min_gap` frames.
    """
    x = np.asarray(audio, dtype=np.float64)
    T = len(x) // HOP
    power = np.concatenate([[0.0], np.cumsum(x**2)])

    def rms(starts: np.ndarray, length: int) -> np.ndarray:
        a = np.clip(starts, 0, len(x))
        b = np.clip(starts + length, 0, len(x))
        return np.sqrt((power[b] - power[a]) / length)

    bounds = np.arange(T) * HOP
    after = rms(bounds + skip, window)
    before = rms(bounds - window, window)
    ratio = after / (before + 0.1 * floor)
    candidates = np.flatnonzero((after > floor) & (ratio > rise))
    onsets = np.zeros(T, dtype=np.int64)
    for t in candidates[np.argsort(-ratio[candidates], kind="stable")]:
        if not onsets[max(0, t - min_gap + 1) : t + min_gap].any():
            onsets[t] = 1
    return onsets


def with_pitch_changes(onsets: np.ndarray, frame_midi: np.ndarray, min_gap: int = 4) -> np.ndarray:
    """(T,) energy onsets + the frames where a held pitch moves to another held pitch (legato: no dip to hear).

    A pitch change at t: frames t-1, t and t+1 are voiced, t and t+1 on the same note (nearest MIDI) and t-1 on
    another. Such a frame counts unless an energy onset is within `min_gap` frames (the same note start). (Requiring
    t-2 to hold t-1's note as well, so that the return from a one-frame blip is no note, cost the lead's listener
    F1 0.69 → 0.58 on the shipped codec's truth: a note's last frame often reads the release.)"""
    note = np.where(np.isfinite(frame_midi), np.round(np.nan_to_num(frame_midi)), np.nan)
    out = onsets.copy()
    for t in range(1, len(note) - 1):
        if note[t] == note[t + 1] and np.isfinite(note[t - 1]) and note[t - 1] != note[t]:
            if not out[max(0, t - min_gap + 1) : t + min_gap].any():
                out[t] = 1
    return out


def note_pitch(frame_midi: np.ndarray) -> float:
    """MIDI pitch of a note from its frames' `frame_pitch` (the median: robust to the attack and to the next note
    at the end of the last windows); NaN when none of them is voiced."""
    voiced = frame_midi[~np.isnan(frame_midi)]
    return float(np.median(voiced)) if len(voiced) else math.nan


# ---- statistics ---------------------------------------------------------------------------------------------------


def song_statistics(heard: dict[str, np.ndarray], sections: np.ndarray, stem_names: Sequence[str],
                    beat: np.ndarray | None, tolerance: int, from_frame: int = 0, bar_frames: int = 128) -> dict[str, Any]:
    """Per-section statistics and coupling of a batch of songs, pooled over songs; frames before `from_frame`
    (the prompt) are left out. heard: `StemListener.listen` output (B, S, T); sections (B, T); beat (B, T);
    bar_frames: the world's bar, for `kick_lift`."""
    ev, pitch, rms = (heard[k][..., from_frame:] for k in ("events", "pitch", "rms"))
    sec = np.asarray(sections)[:, from_frame:]
    B, S, T = ev.shape
    # songs side by side along time; a sentinel frame between songs keeps their section runs apart
    pad = lambda x, v: np.concatenate([np.concatenate([r, np.full(r.shape[:-1] + (1,), v, dtype=r.dtype)], -1) for r in x], -1)
    sec_cat = np.concatenate([np.append(r, -1) for r in sec])
    stats = section_statistics_from(pad(ev, 0), sec_cat, stem_names, pitch=pad(pitch, 0), rms=pad(rms, 0.0))
    # section_statistics_from counts the sentinel frames in no section; nothing to correct
    hits = {"bass_on_kick": [0.0, 0.0], "lead_on_beat": [0.0, 0.0]}
    for b in range(B):
        c = coupling_from(ev[b], sec[b], stem_names, beat=None if beat is None else np.asarray(beat)[b, from_frame:],
                          tolerance=tolerance)
        for key, count in (("bass_on_kick", "bass_onsets"), ("lead_on_beat", "lead_onsets")):
            if c[count] > 0:
                hits[key][0] += c[key] * c[count]
                hits[key][1] += c[count]
    coupling = {k: (h / n if n else math.nan) for k, (h, n) in hits.items()}
    coupling.update(bass_onsets=hits["bass_on_kick"][1], lead_onsets=hits["lead_on_beat"][1])
    masked = np.where(np.arange(np.asarray(sections).shape[-1]) >= from_frame, np.asarray(sections), -1)
    coupling["bass_kick_lift"] = kick_lift(heard["events"], masked, stem_names, bar_frames, tolerance)[0]
    return {"sections": stats, "coupling": coupling}


def kick_lift(events: np.ndarray, sections: np.ndarray, stem_names: Sequence[str], bar_frames: int,
              tolerance: int) -> tuple[float, float]:
    """How much more often bass onsets land on kicks than the beat grid alone explains, over songs (B, S, T).

    Bass and kicks both follow the section's pattern, so even parts that never heard each other meet on the
    grid's fixed kicks. Per cell (section, frame within the bar) the share of bass-on-kick expected from two
    independent parts is P(kick) · P(bass) over that cell's bars; the lift is the observed minus that expected
    count, over the bass onsets in cells that have kicks. Truth: clearly positive (bass follows the kicks the
    drummer chose to play); independent parts: about 0. Returns (lift, bass onsets counted).
    """
    names = list(stem_names)
    if "drums" not in names or "bass" not in names:
        return math.nan, 0.0
    from melodjinn.world_model.song_world import KICK, _dilate

    ev = np.asarray(events)
    kick = np.stack([_dilate(row == KICK, tolerance) for row in ev[:, names.index("drums")]]).astype(np.float64)
    bass = (ev[:, names.index("bass")] > 0).astype(np.float64)
    sec = np.asarray(sections)
    cell = (sec * bar_frames + np.arange(sec.shape[-1]) % bar_frames).ravel()
    valid = sec.ravel() >= 0
    cell, k, b = cell[valid], kick.ravel()[valid], bass.ravel()[valid]
    size = int(cell.max(initial=0)) + 1
    n, nk, nb, nkb = (np.bincount(cell, w, minlength=size) for w in (np.ones_like(k), k, b, k * b))
    has_kick = nk > 0
    counted = float(nb[has_kick].sum())
    if counted == 0:
        return math.nan, 0.0
    expected = nk[has_kick] * nb[has_kick] / n[has_kick]
    return float((nkb[has_kick] - expected).sum() / counted), counted


def section_correlation(generated: dict, truth: dict, stem_names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Pearson r of generated vs true per-section values, per statistic: averaged over stems (`within_stem`, r
    over the sections of one stem) and over all (section, stem) pairs (`pooled`)."""
    out = {}
    for stat in STATISTICS:
        pooled_g, pooled_t, per_stem = [], [], {}
        for stem in stem_names:
            g, t = [], []
            for name in SECTIONS:
                if name in generated and name in truth:
                    a = generated[name]["stems"][stem].get(stat, math.nan)
                    b = truth[name]["stems"][stem].get(stat, math.nan)
                    if np.isfinite(a) and np.isfinite(b):
                        g.append(a)
                        t.append(b)
            pooled_g += g
            pooled_t += t
            r = _pearson(g, t)
            if np.isfinite(r):
                per_stem[stem] = r
        if per_stem or len(pooled_g) >= 3:
            out[stat] = {"within_stem": float(np.mean(list(per_stem.values()))) if per_stem else math.nan,
                         "pooled": _pearson(pooled_g, pooled_t), **{f"r_{s}": r for s, r in per_stem.items()}}
    return out


def _rounded_correlation(r: dict) -> dict:
    """`section_correlation` output for the JSON line: rounded, NaN (too few sections) as null."""
    return {stat: _rounded(v) for stat, v in r.items()}




def _pearson(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _table(generated: dict, truth: dict, stem_names: Sequence[str]) -> dict:
    """{section: {stem: {stat: [generated, true]}}}, rounded for the JSON line."""
    table = {}
    for name in SECTIONS:
        if name not in truth:
            continue
        table[name] = {
            stem: {stat: [_round(generated.get(name, {}).get("stems", {}).get(stem, {}).get(stat, math.nan)),
                          _round(truth[name]["stems"][stem].get(stat, math.nan))]
                   for stat in STATISTICS if stat in truth[name]["stems"][stem]}
            for stem in stem_names
        }
    return table


def _round(x: float) -> float | None:
    return None if not np.isfinite(x) else round(float(x), 4)


# ---- generation -----------------------------------------------------------------------------------------------------


def generate_songs(model, prompt: torch.Tensor, sections: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """Continue prompts (B, S, K, P) to the length of `sections` (B, T) with the null action (the model's own
    generation: past its training window the context rolls over). Returns tokens (B, S, K, T)."""
    generator = torch.Generator().manual_seed(seed)
    return model.generate(prompt, sections.shape[-1] - prompt.shape[-1], None, sections, temperature=temperature,
                          generator=generator)["tokens"]


def _song_world(world_cfg: dict, seed: int, seconds: float) -> SongWorld:
    cfg = {k: v for k, v in world_cfg.items() if k in SongWorldConfig.__dataclass_fields__}
    cfg.update(clip_seconds=float(seconds), song_seconds=0.0, section_plan=None)  # whole songs, sampled forms
    return SongWorld(SongWorldConfig(**cfg), seed=seed)


@torch.no_grad()
def evaluate_songs(model, world_cfg: dict, cfg: SongEvalConfig, eval_seed: int, device="cpu") -> dict:
    """The song-world block of `eval-world` (see the module docstring), on held-out songs of seed `eval_seed`."""
    world = _song_world(world_cfg, eval_seed, cfg.song_seconds)
    stems = list(world.stem_names)
    n, P = cfg.song_clips, cfg.song_prompt_frames
    data = build_world_tensors(world, model.codec, n, progress=False)
    clips = [world.clip(i) for i in range(n)]
    beat = np.stack([c.extra["beat"] for c in clips])
    labels = np.stack([c.events for c in clips])
    tokens = data.tokens.to(device)  # (n, S, K, T)
    listener = StemListener(stems)

    def hear(tok: torch.Tensor) -> dict[str, np.ndarray]:
        return listener.listen(model.decode(tok).cpu().numpy())

    true_heard = hear(tokens)
    sections = data.sections.numpy()
    bar = world.bar_frames
    truth = song_statistics(true_heard, sections, stems, beat, cfg.coupling_tolerance, P, bar)
    true_labels = song_statistics({"events": labels, "pitch": np.stack([c.extra["pitch"] for c in clips]).astype(float),
                                   "rms": np.stack([c.extra["rms"] for c in clips])}, sections, stems, beat,
                                  cfg.coupling_tolerance, P, bar)
    joint = generate_songs(model, tokens[..., :P], data.sections.to(device), cfg.song_temperature, seed=0)
    joint_stats = song_statistics(hear(joint), sections, stems, beat, cfg.coupling_tolerance, P, bar)
    runs = [generate_songs(model, tokens[..., :P], data.sections.to(device), cfg.song_temperature, seed=1 + s)
            for s in range(len(stems))]
    independent = torch.stack([runs[s][:, s] for s in range(len(stems))], 1)
    indep_stats = song_statistics(hear(independent), sections, stems, beat, cfg.coupling_tolerance, P, bar)

    # how far to trust the detectors: their F1 against the labels on the codec's rendering of the true songs
    f1 = {stem: round(event_f1(true_heard["events"][:, s, P:], labels[:, s, P:], tolerance_frames=1), 3)
          for s, stem in enumerate(stems)}
    return {
        "songs": {"clips": n, "seconds": cfg.song_seconds, "prompt_frames": P, "window_frames": model.dynamics.cfg.window_frames,
                  "actions": "null", "temperature": cfg.song_temperature},
        "detector_f1": f1,
        "section_table": _table(joint_stats["sections"], truth["sections"], stems),
        "section_correlation": _rounded_correlation(section_correlation(joint_stats["sections"], truth["sections"], stems)),
        "section_correlation_independent": _rounded_correlation(
            section_correlation(indep_stats["sections"], truth["sections"], stems)),
        "coupling": {
            "truth_labels": _rounded(true_labels["coupling"]),
            "truth": _rounded(truth["coupling"]),
            "joint": _rounded(joint_stats["coupling"]),
            "independent": _rounded(indep_stats["coupling"]),
        },
    }


def _rounded(d: dict) -> dict:
    return {k: _round(v) for k, v in d.items()}
