"""The additive codec: a pitch code that holds still on a held note, phase-continuous synthesis, training, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melodjinn.world_model.additive_codec import UNVOICED, AdditiveCodec, AdditiveCodecConfig
from melodjinn.world_model.codec import HOP, SAMPLE_RATE, TinyCodec, TrainedCodec, load_codec
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.song_world import SongWorld, SongWorldConfig

SMALL = dict(hidden=16, encoder_layers=1, decoder_layers=1, dimension=8, harmonics=8, noise_bands=4, kmeans_iters=2)


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def ready(seed: int = 0, **config) -> AdditiveCodec:
    """An untrained additive codec whose codebooks are k-means-initialised on its own encoder outputs."""
    torch.manual_seed(seed)
    codec = AdditiveCodec(AdditiveCodecConfig(**{**SMALL, **config}))
    codec.init_quantizer(codec.embed(torch.randn(4, 1, 20 * HOP) * 0.1))
    return codec.eval()


def song_stems(n: int = 4, seconds: float = 6.0, seed: int = 1000) -> tuple[torch.Tensor, np.ndarray]:
    world = SongWorld(SongWorldConfig(clip_seconds=seconds, song_seconds=24.0), seed=seed)
    clips = [world.clip(i) for i in range(n)]
    stems = torch.from_numpy(np.stack([c.stems for c in clips]).astype(np.float32))  # (n, S, N)
    return stems, np.stack([c.extra["pitch"] for c in clips])  # (n, S, T) MIDI while a note sounds, else 0


def test_pitch_code_is_the_sounding_note_and_holds_still():
    """Codebook 0 is the MIDI note of the song world's bass and lead (their labels) on almost every frame a note
    sounds, and UNVOICED in silence: a held note is one repeated code, whatever its phase does."""
    codec = ready()
    stems, pitch = song_stems()
    n, S, N = stems.shape
    codes = codec.track_pitch(stems.reshape(n * S, 1, N)).view(n, S, -1).numpy()
    for s in (1, 2):  # bass, lead
        sounding = pitch[:, s] > 0
        exact = (codes[:, s][sounding] == pitch[:, s][sounding]).mean()
        assert exact > 0.9, (s, exact)
        # the misses sit where the tracker's window reaches past a note's end, not at its start
        first = (pitch[:, s] > 0) & (np.diff(np.pad(pitch[:, s], ((0, 0), (1, 0))), axis=-1) != 0)
        assert (codes[:, s][first] == pitch[:, s][first]).mean() > 0.95, s
    silence = torch.zeros(1, 1, 10 * HOP)
    assert (codec.track_pitch(silence) == UNVOICED).all()
    noise = torch.randn(1, 1, 20 * HOP, generator=torch.Generator().manual_seed(0)) * 0.1
    assert (codec.track_pitch(noise) == UNVOICED).float().mean() > 0.9


def test_pitch_code_ignores_where_the_waveform_is_in_its_cycle():
    """The same held tone started at a different phase gives the same pitch codes, held still: what a waveform
    codec cannot do. (The other codebooks come from magnitude spectra; the short window still sees a little of a
    low note's phase, so they are steadier than a waveform codec's but not exactly still.)"""
    codec = ready()
    n = torch.arange(40 * HOP)
    f = 440.0 * 2 ** ((40 - 69) / 12)  # MIDI 40
    tones = torch.stack([0.2 * torch.sin(2 * np.pi * f * n / SAMPLE_RATE + phi) for phi in (0.0, 1.0, 2.5)])[:, None]
    codes = codec.encode(tones)
    assert (codes[:, 0, :30] == 40).all()
    assert torch.equal(codes[0, 0], codes[1, 0]) and torch.equal(codes[0, 0], codes[2, 0])


def test_held_codes_decode_to_continuous_sinusoids():
    """Codes held still decode to the pitch's harmonics as continuous sinusoids (absolute-time phase): almost all
    energy on the harmonics. A decoder that restarted its phase every frame would smear it over the 75 Hz frame
    rate's sidebands."""
    codec = ready(harmonics=4)
    with torch.no_grad():  # a decoder that plays the harmonics loud and the noise bands not at all
        codec.head.weight.zero_()
        codec.head.bias.copy_(torch.tensor([3.0] * 4 + [-30.0] * codec.config.noise_bands + [0.0]))
    T = 150
    codes = torch.zeros(1, codec.num_codebooks, T, dtype=torch.long)
    codes[:, 0] = 45  # 110 Hz
    audio = codec.decode(codes)[0, 0, 10 * HOP :].numpy()
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio)))) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / SAMPLE_RATE)
    near = np.zeros_like(freqs, dtype=bool)
    for h in range(1, 5):
        near |= np.abs(freqs - 110.0 * h) < 3.0
    assert spectrum[near].sum() / spectrum.sum() > 0.99
    # the same with the phase reset at every frame, to show the test would catch it
    frame = np.sin(2 * np.pi * 110.0 * np.arange(HOP) / SAMPLE_RATE)
    reset = np.tile(frame, len(audio) // HOP)
    spectrum = np.abs(np.fft.rfft(reset * np.hanning(len(reset)))) ** 2
    assert spectrum[near[: len(spectrum)]].sum() / spectrum.sum() < 0.9


def test_roundtrip_shapes_determinism_prefixes_and_files(tmp_path):
    codec = ready()
    stems, _ = song_stems(2, 2.0)
    x = stems[:, 1:2]  # bass
    codes = codec.encode(x)
    T = -(-x.shape[-1] // HOP)
    assert codes.shape == (2, 4, T) and codes.dtype == torch.long
    assert torch.equal(codes, codec.encode(x))
    assert codec.decode(codes).shape == (2, 1, T * HOP)
    assert codec.decode(codes[:, :1]).shape == (2, 1, T * HOP)  # the pitch alone is a valid prefix
    codec.save(tmp_path / "ck")
    loaded = TrainedCodec.load(tmp_path / "ck")
    assert isinstance(loaded, AdditiveCodec)
    assert torch.equal(loaded.encode(x), codes) and torch.allclose(loaded.decode(codes), codec.decode(codes))
    assert isinstance(load_codec({"name": "additive", "checkpoint": str(tmp_path / "ck")}), AdditiveCodec)
    with pytest.raises(CheckpointError, match="not a tiny codec; use codec.name=additive"):
        TinyCodec.load(tmp_path / "ck")
    with pytest.raises(ConfigError, match="two periods"):
        AdditiveCodecConfig(pitch_min_midi=20).validate()


def test_training_learns_to_render_bass_and_lead(tmp_path):
    """A seeded tiny `train-codec train=codec_additive` run (300 steps) cuts the held-out spectral distance of an
    untrained codec of the same architecture on song-world bass and lead stems by more than 30 % (measured: 0.65
    against 1.15)."""
    from melodjinn.cli.main import run
    from melodjinn.world_model.codec_training import spectral_loss

    small = ["world=songs", "train=codec_additive", "train.model.hidden=32", "train.model.encoder_layers=1",
             "train.model.decoder_layers=1", "train.model.dimension=8", "train.model.codebook_size=128",
             "train.model.harmonics=16", "train.model.noise_bands=8", "train.model.kmeans_iters=2",
             "train.batch_size=4", "train.crop_seconds=0.5", "train.warmup_steps=100", "train.kmeans_batches=1",
             "train.eval_clips=1", "train.eval_every=1000", "train.checkpoint_every=1000", "train.lr=0.003",
             "world.clip_seconds=1.0", "train.loss.fft_sizes=[1024,256]", "train.steps=300", "seed=0"]
    run("train-codec", f"out={tmp_path / 'ck'}", *small)
    trained = TrainedCodec.load(tmp_path / "ck")
    untrained = ready(hidden=32, dimension=8, harmonics=16, noise_bands=8)
    stems, _ = song_stems(4, 2.0)
    x = stems[:, 1:].reshape(-1, 1, stems.shape[-1])  # bass and lead
    distance = {}
    for name, codec in (("trained", trained), ("untrained", untrained)):
        with torch.no_grad():
            y = codec.decode(codec.encode(x))[..., : x.shape[-1]]
            distance[name] = float(spectral_loss(y, x, [2048, 512], 1e-3))
    assert distance["trained"] < 0.7 * distance["untrained"], distance


def test_streaming_decode_equals_one_decode_of_the_whole():
    """Chunks of any size decode (in absolute time, with the decoder's state carried between them) to the whole
    sequence's audio; `streaming_decoder` picks this decoder for an additive codec (the env's path)."""
    from melodjinn.world_model.codec_stream import AdditiveStreamingDecoder, streaming_decoder

    codec = ready()
    stems, _ = song_stems(2, 2.0)
    codes = codec.encode(stems[:, 1:2])[..., :120]
    whole = codec.decode(codes)
    decoder = streaming_decoder(codec)
    assert isinstance(decoder, AdditiveStreamingDecoder)
    for sizes in ([1] * 7 + [4] * 28 + [1], [50, 3, 67]):
        decoder.reset()
        parts, at = [], 0
        for n in sizes:
            parts.append(decoder.decode(codes[..., at : at + n]))
            at += n
        assert torch.allclose(torch.cat(parts, -1), whole, atol=1e-5), sizes
    with pytest.raises(ConfigError, match="reset"):  # a different batch without reset() would mix sequences' state
        decoder.decode(codes.repeat(2, 1, 1)[..., :4])


def test_eval_codec_scores_song_stems_one_at_a_time(capsys):
    """`eval-codec world=songs` adds per-stem listener F1 and held-note code repeat shares. On the shipped song
    codec the pitch codebook holds still through held bass and lead notes; the bass is heard as well as on the
    original audio."""
    import json

    from melodjinn.cli.main import run
    from melodjinn.world_model.artifacts import shipped_checkpoints_dir

    song_codec = shipped_checkpoints_dir() / "songs" / "codec"
    result = run("eval-codec", "world=songs", "codec.name=additive", f"checkpoint={song_codec}",
                 "world.clip_seconds=6", "world.song_seconds=0", "num_clips=3")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stems"] == result["stems"]
    stems = result["stems"]
    assert set(stems) == {"drums", "bass", "lead"} and "held_code_repeat" not in stems["drums"]
    for name in ("bass", "lead"):
        assert stems[name]["held_code_repeat"][0] > 0.95, stems[name]
    assert stems["bass"]["listener_f1"] > 0.8 and stems["drums"]["listener_f1"] > 0.8, stems


def test_short_window_averaged_across_the_frame_hardly_sees_a_low_notes_phase():
    """A 256-sample window is shorter than a low note's period, so its magnitudes change from frame to frame as the
    note's phase moves; averaging the power of 5 positions across each frame (`short_hops`) smooths that out."""
    from melodjinn.world_model.additive_codec import _log_magnitude

    n = torch.arange(60 * HOP, dtype=torch.float64)
    tone = (0.2 * torch.sin(2 * np.pi * 440.0 * 2 ** ((40 - 69) / 12) * n / SAMPLE_RATE)).float()[None]  # MIDI 40
    window = torch.hann_window(256)
    wobble = {}
    for hops in (1, 5):
        features = _log_magnitude(tone, 256, window, hops)[0, :4, 5:55]  # the bins around the note, held frames
        wobble[hops] = float((features[:, 1:] - features[:, :-1]).abs().mean())
    assert wobble[5] < 0.3 * wobble[1], wobble
    with pytest.raises(ConfigError, match="short_hops"):
        AdditiveCodecConfig(short_hops=3).validate()
