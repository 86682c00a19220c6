"""Song-world evaluation (world_model/song_eval.py): the stem listeners hear what the world played, and the
section and coupling statistics tell music that follows the form and locks its stems from music that does not."""


import numpy as np
import pytest

from melodjinn.world_model.events import event_f1
from melodjinn.world_model.song_eval import StemListener, section_correlation, song_statistics
from melodjinn.world_model.song_world import SongWorld, SongWorldConfig
from melodjinn.world_model.worlds import SECTIONS


@pytest.fixture(scope="module")
def songs():
    world = SongWorld(SongWorldConfig(clip_seconds=10.0), seed=7)
    clips = [world.clip(i) for i in range(3)]
    return world, clips


def _labels(clips):
    return {"events": np.stack([c.events for c in clips]), "pitch": np.stack([c.extra["pitch"] for c in clips]).astype(float),
            "rms": np.stack([c.extra["rms"] for c in clips])}


def test_listener_hears_onsets_and_pitches_of_every_stem(songs):
    world, clips = songs
    heard = StemListener(world.stem_names).listen(np.stack([c.stems for c in clips]))
    truth = _labels(clips)
    floors = {"drums": 0.95, "bass": 0.8, "lead": 0.95}  # measured 0.99 / 0.82 / 0.97 here
    for s, stem in enumerate(world.stem_names):
        f1 = event_f1(heard["events"][:, s], truth["events"][:, s], tolerance_frames=1)
        assert f1 >= floors[stem], (stem, f1)
        if stem != "drums":
            both = (heard["events"][:, s] > 0) & (truth["events"][:, s] > 0)
            error = np.abs(heard["pitch"][:, s][both] - truth["pitch"][:, s][both])
            assert both.sum() > 20 and np.mean(error < 1.0) > 0.95, stem
    np.testing.assert_allclose(heard["rms"], truth["rms"], rtol=1e-4, atol=1e-6)


def test_statistics_reward_the_form_and_the_coupling(songs):
    world, clips = songs
    stems = world.stem_names
    sections = np.stack([c.sections for c in clips])
    beat = np.stack([c.extra["beat"] for c in clips])
    truth = song_statistics(_labels(clips), sections, stems, beat, tolerance=1, bar_frames=world.bar_frames)
    assert truth["coupling"]["bass_on_kick"] > 0.8  # the world pushes a tenth of bass notes off the kick
    assert truth["coupling"]["bass_kick_lift"] > 0.05  # bass follows the kicks the drummer chose, not only the grid
    r = section_correlation(truth["sections"], truth["sections"], stems)
    assert r["onsets_per_second"]["within_stem"] == pytest.approx(1.0) and r["rms"]["pooled"] == pytest.approx(1.0)

    # the same stems, each from another song: parts that never heard each other
    shuffled = _labels(clips)
    bass = stems.index("bass")
    for key in shuffled:
        shuffled[key][:, bass] = np.roll(shuffled[key][:, bass], 1, axis=0)
    apart = song_statistics(shuffled, sections, stems, beat, tolerance=1, bar_frames=world.bar_frames)
    assert apart["coupling"]["bass_on_kick"] < truth["coupling"]["bass_on_kick"] - 0.1
    assert abs(apart["coupling"]["bass_kick_lift"]) < 0.03

    # music that plays the chorus where the plan says intro, and the intro where it says chorus
    swap = np.array([SECTIONS.index(n) for n in ("chorus", "verse", "intro", "bridge", "outro")])
    wrong = song_statistics(_labels(clips), swap[sections], stems, beat, tolerance=1, bar_frames=world.bar_frames)
    r_wrong = section_correlation(wrong["sections"], truth["sections"], stems)
    for stat in ("onsets_per_second", "rms"):
        assert r_wrong[stat]["within_stem"] < 0.5, (stat, r_wrong[stat])


def test_frame_pitch_reads_pure_and_harmonic_tones_and_not_noise():
    import torch

    from melodjinn.world_model.pitch import frame_pitch, hz
    from melodjinn.world_model.worlds import HOP, SAMPLE_RATE

    n = np.arange(30 * HOP)
    for midi in (31.0, 45.3, 86.0):  # the song world's lowest bass, an off-grid pitch, its highest lead
        f = hz(midi)
        dark = sum(np.sin(2 * np.pi * k * f * n / SAMPLE_RATE + k) / k**2 for k in range(1, 6))  # a smooth, saw-like tone
        for tone in (np.sin(2 * np.pi * f * n / SAMPLE_RATE + 0.7), dark):
            got = frame_pitch(torch.from_numpy(0.2 * tone)[None], 1024, (31, 100), 0.7)[0, :25].numpy()
            assert np.all(np.abs(got - midi) < 0.1), (midi, got)
    noise = np.random.default_rng(0).normal(0, 0.1, 30 * HOP)
    assert torch.isnan(frame_pitch(torch.from_numpy(noise)[None], 1024, (31, 100), 0.7)).float().mean() > 0.9
    assert torch.isnan(frame_pitch(torch.zeros(1, 10 * HOP), 1024, (31, 100), 0.7)).all()


def test_pitch_changes_add_legato_onsets_only():
    from melodjinn.world_model.song_eval import with_pitch_changes

    energy = np.zeros(20, dtype=np.int64)
    energy[2] = 1
    midi = np.full(20, np.nan)
    midi[2:8], midi[8:14], midi[14:20] = 60.0, 62.1, 62.0  # a note, a legato step up, the same note sustained
    out = with_pitch_changes(energy, midi)
    assert np.flatnonzero(out).tolist() == [2, 8]
    midi[9] = 64.0  # a one-frame blip is no note, but the return from it is heard as one
    assert np.flatnonzero(with_pitch_changes(energy, midi)).tolist() == [2, 10]
    midi[9] = np.nan  # nor is a note that starts from an unvoiced frame (that is the energy onsets' job)
    assert np.flatnonzero(with_pitch_changes(energy, midi)).tolist() == [2]
