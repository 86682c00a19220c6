"""Drum-hit detector and event F1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melodjinn.world_model.drum_world import DrumWorld, DrumWorldConfig
from melodjinn.world_model.errors import DataError
from melodjinn.world_model.events import DrumHitDetector, detect_hits, event_counts, event_f1, event_scores
from melodjinn.world_model.worlds import HOP


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


# --- event_f1 ---------------------------------------------------------------------------------------------------


def labels(length: int, **hits: int) -> np.ndarray:
    """labels(10, t2=1, t5=3) → frame 2 holds label 1, frame 5 label 3."""
    out = np.zeros(length, dtype=np.int64)
    for key, label in hits.items():
        out[int(key[1:])] = label
    return out


def test_f1_perfect():
    true = labels(20, t1=1, t5=2, t9=3, t15=1)
    assert event_f1(true, true) == 1.0


def test_f1_shift_within_tolerance_counts_and_beyond_does_not():
    true = labels(20, t5=2, t12=1)
    shifted = labels(20, t6=2, t11=1)
    assert event_f1(shifted, true, tolerance_frames=1) == 1.0
    assert event_f1(shifted, true, tolerance_frames=0) == 0.0
    far = labels(20, t7=2, t14=1)
    assert event_f1(far, true, tolerance_frames=1) == 0.0


def test_f1_wrong_label_is_a_miss_and_a_false_alarm():
    true = labels(10, t3=1)
    assert event_counts(labels(10, t3=2), true) == {"tp": 0, "fp": 1, "fn": 1}
    assert event_f1(labels(10, t3=2), true) == 0.0


def test_f1_missing_and_extra_events():
    true = labels(20, t2=1, t8=2, t14=3)
    missing_one = labels(20, t2=1, t8=2)
    assert event_f1(missing_one, true) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))  # 0.8
    scores = event_scores(missing_one, true)
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(2 / 3)
    assert event_f1(np.zeros(20, dtype=np.int64), true) == 0.0


def test_f1_matching_is_one_to_one():
    true = labels(10, t4=1)
    double = labels(10, t3=1, t5=1)  # both within tolerance of the one true hit: only one may match
    assert event_counts(double, true) == {"tp": 1, "fp": 1, "fn": 0}
    # a greedy matcher that pairs t3 with t2 would leave t4; the order-preserving matching finds both pairs
    assert event_counts(labels(10, t3=1, t4=1), labels(10, t2=1, t3=1)) == {"tp": 2, "fp": 0, "fn": 0}


def test_f1_batched_is_micro_averaged_and_empty_is_perfect():
    true = np.stack([labels(10, t1=1), labels(10, t5=2)])
    pred = np.stack([labels(10, t1=1), np.zeros(10, dtype=np.int64)])
    assert event_counts(pred, true) == {"tp": 1, "fp": 0, "fn": 1}
    assert event_f1(np.zeros((2, 10)), np.zeros((2, 10))) == 1.0
    with pytest.raises(DataError, match="shape"):
        event_f1(np.zeros(9), np.zeros(10))


# --- detector ---------------------------------------------------------------------------------------------------


def test_detector_finds_ground_truth_on_clean_heldout_audio():
    world = DrumWorld(DrumWorldConfig(num_drums=3), seed=1000)
    clips = [world.clip(i) for i in range(24)]
    audio = np.stack([c.mix for c in clips])
    true = np.stack([c.events[0] for c in clips])
    assert (true > 0).sum() > 100
    pred = DrumHitDetector.for_world(world).detect(audio)
    assert pred.shape == true.shape and pred.dtype == np.int64
    scores = event_scores(pred, true)
    assert scores["f1"] >= 0.95, scores
    # every drum is found, not just the loud ones
    for drum in (1, 2, 3):
        assert event_f1(np.where(pred == drum, pred, 0), np.where(true == drum, true, 0)) >= 0.9, drum


def test_detector_labels_single_hits_of_every_drum():
    world = DrumWorld(DrumWorldConfig(num_drums=5), seed=0)
    detector = DrumHitDetector.for_world(world)
    for drum in range(5):
        events = labels(40, t10=drum + 1, t25=drum + 1)
        audio = world.render(events, gains=np.full(40, 0.6))
        assert np.array_equal(detector.detect(audio), events), drum


def test_detector_shapes_silence_and_inputs():
    world = DrumWorld(seed=0)
    detector = DrumHitDetector.for_world(world)
    assert np.array_equal(detector.detect(np.zeros(HOP * 10, dtype=np.float32)), np.zeros(10))
    assert detector.detect(np.zeros(HOP * 10 + 1, dtype=np.float32)).shape == (11,)  # T = ceil(N / hop)
    clip = world.clip(0)
    as_codec_output = torch.from_numpy(clip.mix)[None, None]  # (1, 1, N)
    assert np.array_equal(detector.detect(as_codec_output)[0], detector.detect(clip.mix))
    assert np.array_equal(detect_hits(clip.mix, world), detector.detect(clip.mix))
    with pytest.raises(DataError):
        detector.detect(np.zeros((2, 3, 4)))


def test_detector_needs_a_kit():
    class NoKit:
        pass

    with pytest.raises(DataError, match="drum kit"):
        DrumHitDetector.for_world(NoKit())
