"""Audio files in any common format and rate come out as float32 at 24 kHz; bad files are clear DataErrors."""

import numpy as np
import pytest
import soundfile as sf

from melodjinn.world_model.audio_io import MP3_SUPPORTED, audio_info, load_audio, resample, stream_audio, write_audio
from melodjinn.world_model.errors import DataError


def sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.fft.rfftfreq(audio.size, 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("rate", [44_100, 48_000, 16_000])
def test_resampling_keeps_frequency_and_duration(tmp_path, rate):
    path = tmp_path / f"sine_{rate}.wav"
    sf.write(path, sine(440.0, rate, 2.0), rate, subtype="FLOAT")
    audio = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size - 48_000) <= 1  # 2 s at 24 kHz
    assert abs(peak_frequency(audio, 24_000) - 440.0) <= 0.5  # FFT bin is 0.5 Hz for 2 s
    # Amplitude survives away from the edges (no gain change, no aliasing mess).
    assert np.max(np.abs(audio[2400:-2400])) == pytest.approx(0.5, abs=0.01)


def test_stereo_is_downmixed_or_kept(tmp_path):
    left, right = sine(440.0, 24_000, 0.5), sine(660.0, 24_000, 0.5, amplitude=0.25)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 24_000, subtype="FLOAT")
    mono = load_audio(path)
    both = load_audio(path, mono=False)
    assert both.shape == (2, left.size)
    np.testing.assert_allclose(both[0], left, atol=1e-6)
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("ext", [".flac", ".ogg"] + ([".mp3"] if MP3_SUPPORTED else []))
def test_compressed_formats_read(tmp_path, ext):
    path = tmp_path / f"tone{ext}"
    sf.write(path, sine(440.0, 44_100, 1.0), 44_100)
    audio = load_audio(path)
    assert abs(audio.size - 24_000) <= 24 * 5  # lossy decoders may add or drop a few ms
    assert abs(peak_frequency(audio, 24_000) - 440.0) <= 2.0
    assert audio_info(path).sample_rate == 44_100


def test_streaming_equals_whole_file(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 44_100 * 3).astype(np.float32), 44_100, subtype="FLOAT")
    blocks = list(stream_audio(path, block_seconds=0.37))
    assert len(blocks) > 5 and all(b.shape[0] == 1 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1)[0], load_audio(path))
    np.testing.assert_allclose(load_audio(path), resample(sf.read(path, dtype="float32")[0], 44_100), atol=1e-6)


@pytest.mark.skipif(not MP3_SUPPORTED, reason="this libsndfile has no MP3 support")
def test_mp3_streaming_has_no_gaps(tmp_path):
    # libsndfile 1.2 zero-fills partial MP3 reads; a pure tone is where that showed up as silent gaps.
    path = tmp_path / "tone.mp3"
    original = sine(440.0, 24_000, 1.5)
    sf.write(path, original, 24_000)
    streamed = np.concatenate(list(stream_audio(path, block_seconds=0.1)), axis=1)[0]
    assert streamed.size == original.size
    assert np.max(np.abs(streamed - original)) < 0.05


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("garbage.wav", b"this is not audio" * 100, "not a readable audio file"),
        ("empty.wav", b"", "empty file"),
        ("noise.mp3", bytes(range(256)) * 20, "no decodable audio frames"),
    ],
)
def test_bad_files_are_data_errors_naming_file_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_audio(path)
    assert name in str(info.value) and reason in str(info.value)


def test_header_without_samples_and_missing_file(tmp_path):
    path = tmp_path / "header_only.wav"
    sf.write(path, np.zeros(0, np.float32), 24_000)
    with pytest.raises(DataError, match="no audio samples"):
        load_audio(path)
    with pytest.raises(DataError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_write_audio_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "out" / "clip.flac"
    stereo = np.stack([sine(440.0, 24_000, 0.25), sine(220.0, 24_000, 0.25)])  # (C, N)
    write_audio(path, stereo, 24_000)
    np.testing.assert_allclose(load_audio(path, mono=False), stereo, atol=1e-3)
    before = path.read_bytes()
    with pytest.raises(DataError, match="channels, samples"):
        write_audio(path, stereo.T, 24_000)  # (N, C) by mistake: refused, old file intact
    with pytest.raises(Exception):
        write_audio(path, stereo, 24_000, subtype="NO_SUCH_SUBTYPE")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.flac"]  # no temp files left behind
