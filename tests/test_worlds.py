"""Synthetic worlds: determinism, labels that agree with the audio, song structure and coupling, render-world.

The label checks look at the rendered audio itself (energy, silence, drum templates, pitch), so a label
scheme that drifted from what is actually heard fails here.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import pytest
import soundfile as sf

from melodjinn.world_model.drum_world import DrumWorld, DrumWorldConfig, drum_sound
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.song_world import (
    KICK,
    SongWorld,
    SongWorldConfig,
    coupling,
    is_valid_order,
    section_runs,
    section_statistics,
)
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, SECTION_INDEX, SECTIONS, make_world

SONG_CLIPS = range(6)


@lru_cache(maxsize=None)
def song_clip(index: int, seed: int = 0):
    return SongWorld(SongWorldConfig(), seed=seed).clip(index)


def drum_clip(index: int, seed: int = 0, **kw):
    return DrumWorld(DrumWorldConfig(**kw), seed=seed).clip(index)


def band_energy(audio: np.ndarray) -> np.ndarray:
    """(T, 3) energy per frame in a low (<300 Hz), mid (300-3000 Hz) and high (>3 kHz) band."""
    T = len(audio) // HOP
    spec = np.abs(np.fft.rfft(audio[: T * HOP].reshape(T, HOP).astype(np.float64), axis=1)) ** 2
    freq = np.fft.rfftfreq(HOP, 1 / SAMPLE_RATE)
    bands = [(0, 300), (300, 3000), (3000, SAMPLE_RATE)]
    return np.stack([spec[:, (freq >= lo) & (freq < hi)].sum(axis=1) for lo, hi in bands], axis=1)


def hit_matrix(events: np.ndarray, num_samples: int) -> np.ndarray:
    """(N, hits) one column per labelled hit: the drum's template placed at its frame."""
    cols = []
    for t in np.flatnonzero(events):
        col = np.zeros(num_samples)
        sound = drum_sound(int(events[t]) - 1)
        end = min(num_samples, t * HOP + len(sound))
        col[t * HOP : end] = sound[: end - t * HOP]
        cols.append(col)
    return np.stack(cols, axis=1)


def template_residual(audio: np.ndarray, events: np.ndarray) -> tuple[float, np.ndarray]:
    """Relative residual of the best fit of the labelled hits to the audio, and the fitted gains."""
    A = hit_matrix(events, len(audio))
    gains, *_ = np.linalg.lstsq(A, audio.astype(np.float64), rcond=None)
    resid = audio - A @ gains
    return float(np.linalg.norm(resid) / np.linalg.norm(audio)), gains


# ---- determinism -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["drums", "songs"])
def test_same_seed_and_index_give_identical_clips_and_other_seeds_differ(kind):
    cfg = {"name": kind, "clip_seconds": 3.0}
    a, b = make_world(cfg, seed=0).clip(2), make_world(cfg, seed=0).clip(2)
    np.testing.assert_array_equal(a.stems, b.stems)
    np.testing.assert_array_equal(a.events, b.events)
    np.testing.assert_array_equal(a.sections, b.sections)
    assert a.extra.keys() == b.extra.keys()
    for key in a.extra:
        np.testing.assert_array_equal(a.extra[key], b.extra[key])
    other_seed = make_world(cfg, seed=1).clip(2)
    other_index = make_world(cfg, seed=0).clip(3)
    assert not np.array_equal(a.events, other_seed.events)
    assert not np.array_equal(a.stems, other_seed.stems)
    assert not np.array_equal(a.events, other_index.events)


# ---- drum world labels ------------------------------------------------------------------------------------------


def test_drum_onsets_raise_energy_in_their_band_and_silence_has_no_labels():
    band_of = {1: 0, 2: 1, 3: 2}  # kick low, snare mid, hi-hat high
    for index in range(8):
        clip = drum_clip(index)
        audio, events = clip.stems[0], clip.events[0]
        energy = band_energy(audio)
        onsets = np.flatnonzero(events)
        assert len(onsets) > 0
        for t in onsets:
            before = energy[t - 1, band_of[int(events[t])]] if t > 0 else 0.0
            assert energy[t, band_of[int(events[t])]] > 1.5 * before + 1e-9, (index, t, int(events[t]))
        silent = energy.sum(axis=1) == 0
        assert not events[silent].any(), "a silent frame carries an onset label"
        # nothing sounds that was not labelled: audio before the first onset is exact silence,
        # and every frame with sound lies within a labelled hit's length
        assert not np.any(audio[: onsets[0] * HOP])
        hit_frames = -(-len(drum_sound(0)) // HOP)
        since = np.arange(len(events)) - np.maximum.accumulate(np.where(events > 0, np.arange(len(events)), -(10**9)))
        assert np.all(silent | (since < hit_frames))


@pytest.mark.parametrize("num_drums", [3, 8])
def test_each_drum_sound_is_exactly_where_labelled(num_drums):
    cfg = DrumWorldConfig(num_drums=num_drums, hits_per_second=5.0)
    for index in range(3):
        clip = DrumWorld(cfg).clip(index)
        audio, events = clip.stems[0], clip.events[0]
        resid, gains = template_residual(audio, events)
        assert resid < 1e-5
        assert np.all((gains >= cfg.gain_min - 1e-4) & (gains <= cfg.gain_max + 1e-4))
        # the check can fail: one frame late, or the wrong drum, leaves a large residual
        t = int(np.flatnonzero(events)[0])
        late = events.copy()
        late[t], late[t + 1] = 0, events[t]
        assert template_residual(audio, late)[0] > 0.05
        swapped = events.copy()
        swapped[t] = events[t] % num_drums + 1
        assert template_residual(audio, swapped)[0] > 0.05


# ---- song world structure ---------------------------------------------------------------------------------------


def test_sections_cover_every_frame_in_a_plausible_order():
    world = SongWorld()
    for index in SONG_CLIPS:
        clip = song_clip(index)
        assert clip.sections.shape == (world.clip_frames,) == (clip.num_frames,)
        runs = section_runs(clip.sections)
        names = [SECTIONS[k] for k, _, _ in runs]
        assert runs[0][1] == 0 and runs[-1][2] == clip.num_frames
        assert names[0] == "intro" and names[-1] == "outro" and "chorus" in names, names
        assert is_valid_order(names), names
        assert all(a % world.bar_frames == 0 for _, a, _ in runs), "sections start on bars"
    assert not is_valid_order(["verse", "intro"]) and not is_valid_order(["outro", "chorus"])
    assert not is_valid_order(["intro", "bridge"])


def test_windows_of_longer_songs_keep_a_valid_order():
    world = SongWorld(SongWorldConfig(clip_seconds=3.0, song_seconds=40.0))
    seen = set()
    for index in range(8):
        clip = world.clip(index)
        names = [SECTIONS[k] for k, _, _ in section_runs(clip.sections)]
        assert clip.num_frames == 225 and is_valid_order(names), names
        seen.update(names)
    assert {"verse", "chorus"} <= seen


def pooled_statistics():
    """Per section and stem, statistics pooled over SONG_CLIPS (weighted by section length)."""
    acc: dict = {}
    for index in SONG_CLIPS:
        for sec, row in section_statistics(song_clip(index)).items():
            for stem, values in row["stems"].items():
                for key, value in values.items():
                    if not math.isnan(value):
                        acc.setdefault((sec, stem, key), []).append((value, row["seconds"]))
    return {k: float(np.average([v for v, _ in vs], weights=[w for _, w in vs])) for k, vs in acc.items()}


def test_sections_differ_in_density_energy_and_register_as_documented():
    s = pooled_statistics()
    for stem in ("drums", "bass", "lead"):
        assert s["chorus", stem, "onsets_per_second"] > 1.5 * s["intro", stem, "onsets_per_second"], stem
        assert s["chorus", stem, "rms"] > 1.5 * s["intro", stem, "rms"], stem
        assert s["chorus", stem, "gain"] > s["verse", stem, "gain"] > s["intro", stem, "gain"], stem
    assert s["chorus", "drums", "onsets_per_second"] > s["verse", "drums", "onsets_per_second"]
    assert s["bridge", "drums", "onsets_per_second"] == 0.0
    assert s["chorus", "lead", "pitch_mean"] > s["verse", "lead", "pitch_mean"] + 5
    assert s["chorus", "lead", "pitch_low"] >= 72 and s["intro", "lead", "pitch_high"] <= 71
    assert s["chorus", "bass", "pitch_mean"] > s["verse", "bass", "pitch_mean"]
    assert s["bridge", "bass", "pitch_mean"] < s["verse", "bass", "pitch_mean"]


def test_outro_fades():
    for index in SONG_CLIPS:
        clip = song_clip(index)
        (_, a, b), = [r for r in section_runs(clip.sections) if SECTIONS[r[0]] == "outro"]
        for s, stem in enumerate(clip.stem_names):
            g = clip.extra["gain"][s, a:b]
            onset = clip.events[s, a:b] > 0
            first, last = g[: (b - a) // 2][onset[: (b - a) // 2]], g[(b - a) // 2 :][onset[(b - a) // 2 :]]
            if len(first) and len(last):
                assert last.mean() < first.mean(), (index, stem)


def test_bass_lands_on_kicks_and_lead_on_beats():
    counts = {"bass": [0, 0], "lead": [0, 0]}
    for index in SONG_CLIPS:
        c = coupling(song_clip(index))
        counts["bass"][0] += round(c["bass_on_kick"] * c["bass_onsets"])
        counts["bass"][1] += int(c["bass_onsets"])
        counts["lead"][0] += round(c["lead_on_beat"] * c["lead_onsets"])
        counts["lead"][1] += int(c["lead_onsets"])
    bass = counts["bass"][0] / counts["bass"][1]
    lead = counts["lead"][0] / counts["lead"][1]
    assert 0.8 <= bass < 1.0, bass  # strong by design, and not perfect (bass_off_kick=0.1)
    assert lead >= 0.8, lead
    tight = SongWorld(SongWorldConfig(bass_off_kick=0.0)).clip(0)
    assert coupling(tight)["bass_on_kick"] == 1.0
    loose = SongWorld(SongWorldConfig(bass_off_kick=1.0)).clip(0)
    assert coupling(loose)["bass_on_kick"] < 0.5
    # the statistic reads the labels: bass moved off the kicks scores lower
    clip = song_clip(0)
    b, d = clip.stem_names.index("bass"), clip.stem_names.index("drums")
    moved = clip.events.copy()
    moved[b] = np.roll(moved[b], 1)
    from melodjinn.world_model.song_world import coupling_from

    assert coupling_from(moved, clip.sections, clip.stem_names)["bass_on_kick"] < 0.2
    assert coupling_from(moved, clip.sections, clip.stem_names, tolerance=1)["bass_on_kick"] >= bass - 0.15
    assert np.all(moved[d] == clip.events[d])


# ---- song world labels against the audio ------------------------------------------------------------------------


def test_pitched_stems_sound_exactly_where_labelled():
    for index in SONG_CLIPS[:3]:
        clip = song_clip(index)
        for s, stem in enumerate(clip.stem_names):
            audio = clip.stems[s].reshape(clip.num_frames, HOP)
            sounding = clip.extra["sounding"][s].astype(bool)
            assert not np.any(audio[~sounding]), f"{stem} sounds where no note is labelled"
            onsets = np.flatnonzero(clip.events[s])
            assert np.all(sounding[onsets])
            assert np.all(clip.extra["rms"][s][onsets] > 1e-3), stem
            if stem == "drums":
                assert not clip.extra["pitch"][s].any()
                continue
            assert np.array_equal(clip.extra["pitch"][s] > 0, sounding), stem
            # every note starts from silence: the sample before each onset is zero
            starts = onsets[onsets > 0] * HOP
            assert np.all(clip.stems[s][starts - 1] == 0.0), stem
            # and a note covers its frames without gaps: each sounding frame after an onset has sound
            assert np.all(np.abs(audio[sounding]).max(axis=1) > 0), stem


def test_drum_stem_is_the_labelled_hits_at_the_labelled_gains():
    clip = song_clip(1)
    d = clip.stem_names.index("drums")
    events, gain, audio = clip.events[d], clip.extra["gain"][d], clip.stems[d].astype(np.float64)
    template = hit_matrix(events, len(audio)) @ gain[events > 0]
    level = float(audio @ template / (template @ template))  # the stem's fixed mix level
    assert np.linalg.norm(audio - level * template) < 1e-5 * np.linalg.norm(audio)
    assert set(np.unique(events)) <= {0, 1, 2, 3} and (events == KICK).any()


PITCH_WINDOW = 16 * HOP  # 213 ms: enough to tell neighbouring semitones apart through the 8th harmonic


@lru_cache(maxsize=None)
def harmonic_basis(pitch: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed complex exponentials at the first 8 harmonics (below Nyquist) of each pitch within 2 semitones."""
    candidates = np.arange(pitch - 2, pitch + 3)
    freqs = 440.0 * 2 ** ((candidates[:, None] - 69) / 12) * np.arange(1, 9)  # (5, 8)
    t = np.arange(PITCH_WINDOW) / SAMPLE_RATE
    phase = 2 * np.pi * freqs.reshape(-1, 1) * t  # (40, n)
    keep = (freqs.reshape(-1, 1) < 0.45 * SAMPLE_RATE) * np.hanning(PITCH_WINDOW)
    return candidates, np.concatenate([np.cos(phase) * keep, np.sin(phase) * keep])  # real matmuls are fast


def estimated_pitch(segment: np.ndarray, near: int) -> int:
    """The pitch within 2 semitones of `near` whose harmonics carry the most energy in the segment."""
    candidates, basis = harmonic_basis(near)
    re, im = np.split(basis @ segment, 2)
    return int(candidates[np.argmax(np.hypot(re, im).reshape(len(candidates), -1).sum(axis=1))])


def test_pitch_labels_match_the_heard_pitch():
    checked = 0
    for index in SONG_CLIPS[:3]:
        clip = song_clip(index)
        for s, stem in enumerate(clip.stem_names):
            if stem == "drums":
                continue
            for t in np.flatnonzero(clip.events[s]):
                pitch = int(clip.extra["pitch"][s, t])
                frames = int(np.argmin(np.append(clip.extra["pitch"][s, t:] == pitch, False)))
                if frames * HOP < PITCH_WINDOW:
                    continue  # too short to tell neighbouring semitones apart at the bottom of the bass
                segment = clip.stems[s][t * HOP : t * HOP + PITCH_WINDOW].astype(np.float64)
                assert estimated_pitch(segment, pitch) == pitch, (stem, t, pitch)
                checked += 1
    assert checked > 20


def test_mix_is_the_sum_of_stems_and_stays_below_full_scale():
    for index in SONG_CLIPS:
        clip = song_clip(index)
        np.testing.assert_array_equal(clip.mix, clip.stems.sum(axis=0))
        assert np.abs(clip.mix).max() < 1.0


def test_stem_subset_plays_the_same_parts():
    full = song_clip(0)
    sub = SongWorld(SongWorldConfig(stems=["lead", "bass"])).clip(0)
    assert sub.stem_names == ("lead", "bass") and sub.stems.shape[0] == 2
    for s, name in enumerate(sub.stem_names):
        f = full.stem_names.index(name)
        np.testing.assert_array_equal(sub.stems[s], full.stems[f])
        np.testing.assert_array_equal(sub.events[s], full.events[f])
    assert math.isnan(coupling(sub)["bass_on_kick"])


def test_section_plan_is_respected():
    plan = [["intro", 64], ["chorus", 128], ["bridge", 100], ["outro", 48]]
    world = make_world({"name": "songs", "section_plan": plan})
    clip = world.clip(0)
    assert world.clip_frames == clip.num_frames == 340
    assert [(SECTIONS[k], b - a) for k, a, b in section_runs(clip.sections)] == [tuple(p) for p in plan]
    d = clip.stem_names.index("drums")
    assert not clip.events[d, 192:292].any(), "the bridge has no drums"
    assert (clip.events[d, 64:192] > 0).sum() > (clip.events[d, :64] > 0).sum()
    # a plan per call overrides the sampled form; the string form works too
    other = SongWorld().clip(0, plan=["chorus:96", ("verse", 32)])
    assert other.num_frames == 128
    assert list(other.sections) == [SECTION_INDEX["chorus"]] * 96 + [SECTION_INDEX["verse"]] * 32


# ---- configuration errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ({"stems": ["drums", "piano"]}, "world.stems"),
        ({"stems": []}, "world.stems"),
        ({"frames_per_beat": 30}, "world.frames_per_beat"),
        ({"frames_per_beat": "fast"}, "world.frames_per_beat"),
        ({"bass_off_kick": 1.5}, "world.bass_off_kick"),
        ({"gain_jitter": 1.0}, "world.gain_jitter"),
        ({"clip_seconds": 0.0}, "world.clip_seconds"),
        ({"song_seconds": -1.0}, "world.song_seconds"),
        ({"section_plan": [["solo", 64]]}, "world.section_plan[0]"),
        ({"section_plan": [["verse", 64], ["chorus", 0]]}, "world.section_plan[1]"),
        ({"section_plan": [["verse"]]}, "world.section_plan[0]"),
        ({"tempo": 120}, "world.tempo"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        make_world({"name": "songs", **override})


def test_drum_world_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="world.num_drums"):
        make_world({"name": "drums", "num_drums": 9})
    with pytest.raises(ConfigError, match="world.name"):
        make_world({"name": "orchestra"})


# ---- render-world -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, overrides", [("songs", ["world.clip_seconds=3"]), ("drums", [])])
def test_render_world_writes_audio_and_labels_matching_the_world(tmp_path, capsys, kind, overrides):
    from melodjinn.cli.main import run

    out = tmp_path / "rendered"
    run("render-world", f"world={kind}", f"out={out}", "clips=2", "seed=3", *overrides)
    assert str(out.resolve()) in capsys.readouterr().out
    meta = json.loads((out / "world.json").read_text())
    assert meta["seed"] == 3 and meta["clips"] == 2 and meta["world"]["name"] == kind
    world = make_world(meta["world"], seed=meta["seed"])
    for index in range(2):
        clip = world.clip(index)
        folder = out / f"clip_{index:03d}"
        labels = json.loads((folder / "labels.json").read_text())
        scale = labels["scale"]
        assert 0 < scale <= 1.0
        stems = []
        for s, name in enumerate(clip.stem_names):
            audio, sr = sf.read(folder / f"{name}.wav", dtype="float32")
            assert sr == SAMPLE_RATE and audio.shape == (clip.num_frames * HOP,)
            np.testing.assert_allclose(audio, clip.stems[s] * scale, atol=1e-7)
            stems.append(audio)
        mix, sr = sf.read(folder / "mix.wav", dtype="float32")
        assert sr == SAMPLE_RATE and np.abs(mix).max() < 1.0
        np.testing.assert_array_equal(mix, np.sum(stems, axis=0, dtype=np.float32))
        assert labels["frame_rate"] == FRAME_RATE and labels["stem_names"] == list(clip.stem_names)
        assert labels["sections"] == clip.sections.tolist()
        assert [labels["section_names"][k] for k in labels["sections"]] == [SECTIONS[k] for k in clip.sections]
        for s, name in enumerate(clip.stem_names):
            assert labels["events"][name] == clip.events[s].tolist()
            assert labels["event_names"][name] == list(clip.event_names[s])
        for key, value in clip.extra.items():
            got = labels["extra"][key]
            if value.ndim == 2:
                got = np.array([got[n] for n in clip.stem_names])
            expected = value * scale if key == "rms" else value
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, atol=1e-5)
    assert not list(out.rglob("*.tmp")), "temporary files left behind"


def test_render_world_rejects_bad_arguments(tmp_path):
    from melodjinn.cli.main import run

    with pytest.raises(ConfigError, match="out"):
        run("render-world", "world=songs")
    with pytest.raises(ConfigError, match="clips"):
        run("render-world", f"out={tmp_path}", "clips=-1")
    with pytest.raises(ConfigError, match="world.stems"):
        run("render-world", "world=songs", f"out={tmp_path}", "world.stems=[bass,piano]")
