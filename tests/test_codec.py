"""Codecs: shapes, determinism, checkpoints and their errors, encodec without torchaudio, the shipped codec."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from melodjinn.world_model.codec import (
    ENCODEC_CHECKPOINT_NAME,
    ENCODEC_URL,
    Codec,
    EncodecCodec,
    TinyCodec,
    TinyCodecConfig,
    build_encodec_24khz,
    load_codec,
)
from melodjinn.world_model.drum_world import DrumWorld
from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError

HOP = 320


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def ready_tiny(seed: int = 0, **config) -> TinyCodec:
    """An untrained tiny codec whose codebooks are k-means-initialised on its own encoder outputs."""
    torch.manual_seed(seed)
    codec = TinyCodec(TinyCodecConfig(**config))
    codec.init_quantizer(codec.encoder(torch.randn(4, 1, 4 * HOP * 10) * 0.3))
    return codec.eval()


def drums(n_clips: int = 2, seconds_frames: int | None = None) -> torch.Tensor:
    world = DrumWorld(seed=1000)
    audio = np.stack([world.clip(i).mix for i in range(n_clips)])
    if seconds_frames:
        audio = audio[:, : seconds_frames * HOP]
    return torch.from_numpy(audio)[:, None]  # (B, 1, N)


# --- tiny codec -------------------------------------------------------------------------------------------------


def test_tiny_roundtrip_shapes_and_protocol():
    codec = ready_tiny()
    assert isinstance(codec, Codec)
    assert (codec.sample_rate, codec.frame_rate, codec.num_codebooks, codec.codebook_size) == (24_000, 75.0, 4, 128)
    for n in (HOP * 20, HOP * 20 + 1, 1000):
        codes = codec.encode(torch.randn(2, 1, n) * 0.1)
        frames = -(-n // HOP)
        assert codes.shape == (2, 4, frames) and codes.dtype == torch.int64
        assert 0 <= int(codes.min()) and int(codes.max()) < 128
        assert codec.decode(codes).shape == (2, 1, frames * HOP)
    assert codec.decode(codes[:, :2]).shape == (2, 1, frames * HOP)  # a codebook prefix decodes too


def test_tiny_is_deterministic_and_survives_save_load(tmp_path):
    codec = ready_tiny()
    audio = drums(2, seconds_frames=40)
    codes = codec.encode(audio)
    assert len(torch.unique(codes[:, 0])) > 1  # a constant code would make this test vacuous
    assert torch.equal(codes, codec.encode(audio.clone()))
    codec.save(tmp_path / "ck")
    loaded = TinyCodec.load(tmp_path / "ck")
    assert torch.equal(loaded.encode(audio), codes)
    assert torch.allclose(loaded.decode(codes), codec.decode(codes))


def test_tiny_rejects_bad_input():
    codec = ready_tiny()
    with pytest.raises(DataError, match=r"\(B, 1, N\)"):
        codec.encode(torch.zeros(2, 100))
    with pytest.raises(DataError, match="outside"):
        codec.decode(torch.full((1, 4, 3), 128))
    with pytest.raises(DataError, match="codebooks"):
        codec.decode(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(CheckpointError, match="train-codec"):
        TinyCodec().encode(torch.zeros(1, 1, HOP))  # codebooks never initialised


def test_tiny_checkpoint_mismatch_is_named(tmp_path):
    ready_tiny().save(tmp_path / "ck")
    config_file = tmp_path / "ck" / "config.json"
    original = json.loads(config_file.read_text())

    def load_with(edit):
        meta = json.loads(json.dumps(original))
        edit(meta)
        config_file.write_text(json.dumps(meta))
        return TinyCodec.load(tmp_path / "ck")

    with pytest.raises(CheckpointError, match=r"weights do not match config.json \(decoder\.model\.0\.conv\.conv\.bias has shape \(128,\) in the weights but \(256,\)"):
        load_with(lambda m: m["config"]["model"].update(n_filters=16))
    with pytest.raises(CheckpointError, match=r"_codebook\.embed has shape \(128, 32\) in the weights but \(64, 32\)"):
        load_with(lambda m: m["config"]["model"].update(codebook_size=64))
    with pytest.raises(CheckpointError, match="does not know: attention_heads"):
        load_with(lambda m: m["config"]["model"].update(attention_heads=4))
    with pytest.raises(CheckpointError, match="lacks: lstm_layers"):
        load_with(lambda m: m["config"]["model"].pop("lstm_layers"))
    with pytest.raises(CheckpointError, match="hop"):
        load_with(lambda m: m["config"].update(hop=240))
    with pytest.raises(CheckpointError, match="not a tiny codec"):
        load_with(lambda m: m["config"].update(name="encodec_24khz"))
    with pytest.raises(CheckpointError, match="expected 'codec'"):
        load_with(lambda m: m.update(kind="lam"))
    config_file.write_text(json.dumps(original))
    assert TinyCodec.load(tmp_path / "ck").num_codebooks == 4


# --- shipped codec ----------------------------------------------------------------------------------------------


def test_shipped_codec_loads_and_roundtrips():
    from melodjinn.world_model.codec_eval import si_snr_db

    codec = load_codec(OmegaConf.create({"name": "tiny", "checkpoint": "codec-drums"}))
    assert isinstance(codec, TinyCodec) and codec.num_codebooks == 4 and codec.codebook_size == 128
    audio = drums(2)
    codes = codec.encode(audio)
    assert codes.shape == (2, 4, audio.shape[-1] // HOP)
    assert torch.equal(codes, codec.encode(audio))
    decoded = codec.decode(codes)
    snr = si_snr_db(decoded[:, 0].numpy(), audio[:, 0].numpy())
    assert snr.mean() > 8.0, snr  # trained weights, not a random init (which scores far below 0 dB)


def test_load_codec_config_errors():
    with pytest.raises(ConfigError, match="tiny, additive or encodec_24khz"):
        load_codec(OmegaConf.create({"name": "mp3"}))
    with pytest.raises(ConfigError, match="codec.checkpont"):
        load_codec(OmegaConf.create({"name": "tiny", "checkpont": "x"}))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_codec({"name": "tiny", "checkpoint": "/nonexistent/codec"})


# --- EnCodec ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encodec_file(tmp_path_factory) -> Path:
    """An untrained EnCodec 24 kHz of the real architecture, saved in the package's own format and name."""
    torch.manual_seed(0)
    model = build_encodec_24khz()
    for layer in model.quantizer.vq.layers:  # filled codebooks, so codes vary with the audio
        book = layer._codebook
        book.embed.normal_()
        book.embed_avg.copy_(book.embed)
        book.inited.fill_(1)
    directory = tmp_path_factory.mktemp("encodec")
    torch.save(model.state_dict(), directory / ENCODEC_CHECKPOINT_NAME)
    return directory / ENCODEC_CHECKPOINT_NAME


@pytest.fixture
def no_download(monkeypatch, tmp_path):
    """An empty torch hub cache and a download that fails the test if anything tries it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def forbidden(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr(EncodecCodec, "_download", staticmethod(forbidden))


def test_encodec_roundtrip_and_determinism(encodec_file, no_download):
    audio = drums(1, seconds_frames=12)
    codecs = {
        1.5: load_codec({"name": "encodec_24khz", "bandwidth": 1.5, "checkpoint_path": str(encodec_file)}),
        6.0: EncodecCodec(6.0, encodec_file.parent),  # a directory holding the file works too
    }
    for bandwidth, k in ((1.5, 2), (6.0, 8)):
        codec = codecs[bandwidth]
        assert isinstance(codec, Codec) and not codec.training
        assert (codec.num_codebooks, codec.codebook_size, codec.frame_rate) == (k, 1024, 75.0)
        codes = codec.encode(audio)
        assert codes.shape == (1, k, 12) and codes.dtype == torch.int64
        assert len(torch.unique(codes)) > 1
        assert torch.equal(codes, codec.encode(audio.clone()))
        assert codec.decode(codes).shape == (1, 1, 12 * HOP)
    # both read the same file: residual VQ codes at 1.5 kbps are the first 2 of those at 6 kbps
    assert torch.equal(codecs[1.5].encode(audio), codecs[6.0].encode(audio)[:, :2])


def test_encodec_offline_without_file_says_where_to_put_it(no_download, tmp_path):
    with pytest.raises(CheckpointError) as info:
        EncodecCodec(6.0, allow_download=False)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / ENCODEC_CHECKPOINT_NAME) in message
    assert ENCODEC_URL in message and "checkpoint_path" in message
    with pytest.raises(CheckpointError, match=str(tmp_path / "nowhere")):
        EncodecCodec(6.0, checkpoint_path=tmp_path / "nowhere" / ENCODEC_CHECKPOINT_NAME)


def test_encodec_bad_file_and_bandwidth(no_download, tmp_path):
    bad = tmp_path / ENCODEC_CHECKPOINT_NAME
    bad.write_text("<html>404</html>")
    with pytest.raises(CheckpointError, match="re-download"):
        EncodecCodec(6.0, checkpoint_path=bad)
    torch.save({"encoder.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="do not fit"):
        EncodecCodec(6.0, checkpoint_path=bad)
    with pytest.raises(ConfigError, match="bandwidth"):
        EncodecCodec(5.0, checkpoint_path=bad)


ENCODEC_WITHOUT_TORCHAUDIO = textwrap.dedent(
    """
    import importlib.abc, importlib.util, sys
    mode = sys.argv[1]
    if mode == "blocked":
        sys.modules["torchaudio"] = None  # import torchaudio → ImportError
    elif mode == "broken":
        class Broken(importlib.abc.MetaPathFinder):  # a torchaudio whose native library does not load
            def find_spec(self, name, path=None, target=None):
                if name == "torchaudio":
                    raise OSError("libtorchaudio.so: undefined symbol")
        sys.meta_path.insert(0, Broken())
    elif mode == "real":
        sys.path.insert(0, sys.argv[2])  # a working torchaudio stand-in of the test's own

    if mode == "blocked":
        try:
            import encodec  # without melodjinn's help this must fail, or the test proves nothing
        except ImportError as exc:
            assert "torchaudio" in str(exc), exc
        else:
            raise SystemExit("plain import unexpectedly worked")

    from melodjinn.world_model.codec import import_encodec
    import_encodec()
    import encodec
    from encodec.modules import SEANetEncoder
    ta = sys.modules["encodec.utils"].torchaudio
    if mode == "real":
        assert ta.REAL is True
        print("ok real")
        raise SystemExit
    try:
        ta.load("x.wav")
    except ImportError as exc:
        assert "soundfile" in str(exc) and "soxr" in str(exc), exc
    else:
        raise SystemExit("the stand-in did not raise")
    # nothing fake is left behind for other libraries' availability probes
    if mode == "blocked":
        assert sys.modules["torchaudio"] is None
    else:
        assert "torchaudio" not in sys.modules
        assert mode == "broken" or importlib.util.find_spec("torchaudio") is None
    print("ok", mode, encodec.EncodecModel.__name__)
    """
)


@pytest.mark.parametrize("mode", ["blocked", "broken", "real"])
def test_import_encodec_without_torchaudio(mode, tmp_path):
    fake = tmp_path / "site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("REAL = True\n")
    script = tmp_path / "probe.py"
    script.write_text(ENCODEC_WITHOUT_TORCHAUDIO)
    run = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "site")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok"), run.stdout


# --- commands ---------------------------------------------------------------------------------------------------


def test_configs_compose_and_validate():
    from melodjinn.cli.main import compose
    from melodjinn.world_model.codec_training import CodecRecipe
    from melodjinn.world_model.runtime import to_dataclass

    cfg = compose("train-codec", ["out=/tmp/x"])
    recipe = to_dataclass(CodecRecipe, cfg.train, "train").validate()
    assert recipe.model == TinyCodecConfig() and recipe.eval_seed != cfg.seed
    assert compose("eval-codec", []).codec.name == "tiny"
    assert compose("eval-codec", ["codec=encodec_24khz"]).codec.bandwidth == 6.0
    assert compose("bench", []).target == "codec"


def test_eval_codec_and_bench_on_shipped_codec(capsys):
    from melodjinn.cli.main import run
    from melodjinn.world_model.codec_eval import bench_codec

    result = run("eval-codec", "num_clips=3")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(json.dumps(result))
    for key in ("si_snr_db", "event_f1", "event_f1_original", "num_clips", "codec"):
        assert key in result
    assert result["num_clips"] == 3 and result["codec"]["num_codebooks"] == 4
    with pytest.raises(ConfigError, match="trained on"):
        run("eval-codec", "num_clips=1", "eval_seed=0")

    from melodjinn.cli.main import compose

    bench = bench_codec(compose("bench", ["seconds=0.5", "repeats=1"]))
    assert bench["threads"] == torch.get_num_threads()
    assert bench["codecs"]["tiny"]["encode_rtf"] > 0 and bench["codecs"]["tiny"]["decode_rtf"] > 0


def test_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from melodjinn.cli.main import run

    small = ["train.model.n_filters=2", "train.model.codebook_size=8", "train.model.kmeans_iters=2",
             "train.batch_size=2", "train.crop_seconds=0.1", "train.warmup_steps=2", "train.kmeans_batches=1",
             "train.eval_clips=1", "train.log_every=1", "train.eval_every=100", "train.lr_warmup_steps=1",
             "world.clip_seconds=0.2", "train.loss.fft_sizes=[256,64]", "train.steps=5"]
    run("train-codec", f"out={tmp_path / 'once'}", "train.checkpoint_every=5", *small)

    class Killed(Exception):
        pass

    save = TinyCodec.save

    def save_then_die(self, directory, extra=None, **more):
        save(self, directory, extra, **more)
        if extra["progress"]["step"] == 3:
            raise Killed

    monkeypatch.setattr(TinyCodec, "save", save_then_die)
    with pytest.raises(Killed):
        run("train-codec", f"out={tmp_path / 'twice'}", "train.checkpoint_every=3", *small)
    monkeypatch.setattr(TinyCodec, "save", save)
    assert json.loads((tmp_path / "twice" / "config.json").read_text())["progress"]["step"] == 3
    run("train-codec", f"out={tmp_path / 'twice'}", "train.checkpoint_every=3", *small)

    once = TinyCodec.load(tmp_path / "once").state_dict()
    twice = TinyCodec.load(tmp_path / "twice").state_dict()
    assert once.keys() == twice.keys()
    for key in once:
        assert torch.equal(once[key], twice[key]), key
    with pytest.raises(CheckpointError, match="train.lr"):
        run("train-codec", f"out={tmp_path / 'once'}", "train.lr=0.5", *small)


def test_stem_crops_cover_every_stem_at_a_common_level():
    """source=stems: the codec trains on what a multi-stream world model encodes — single stems, quiet ones
    (the lead) brought to the same level as loud ones (the drums)."""
    from melodjinn.world_model.codec_training import CodecRecipe, training_batch
    from melodjinn.world_model.song_world import SongWorld, SongWorldConfig

    world = SongWorld(SongWorldConfig(clip_seconds=2.0, song_seconds=24.0))
    recipe = CodecRecipe(batch_size=6, source="stems").validate()
    batch = training_batch(world, 0, recipe, seed=0)[:, 0].numpy()  # (6, crop)
    rms = np.sqrt((batch.astype(np.float64) ** 2).mean(-1))
    sounding = rms > 1e-3
    assert sounding.sum() >= 4 and np.allclose(rms[sounding], 0.1, rtol=0.05), rms
    mixes = training_batch(world, 0, CodecRecipe(batch_size=6).validate(), seed=0)[:, 0].numpy()
    assert not np.allclose(batch, mixes)
    with pytest.raises(ConfigError, match="source"):
        CodecRecipe(source="stem").validate()


def test_latent_change_ignores_scale_and_offset_and_is_small_for_a_latent_that_holds_still():
    from melodjinn.world_model.codec_training import latent_change

    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 8, 40, generator=g)
    held = noisy[..., :1].expand(-1, -1, 40).clone()
    held[..., 20:] += 3.0  # one jump, as at a note's onset, then still again
    assert latent_change(held) < 0.1 * latent_change(noisy)
    assert torch.isclose(latent_change(noisy * 7.0 + 5.0), latent_change(noisy))


def test_latent_steadiness_makes_the_codec_latent_hold_still(tmp_path):
    """A seeded tiny run with train.loss.latent_steadiness moves less from frame to frame on held-out audio than the
    same run without it (the weight is what a song codec needs for steady codes on held notes)."""
    from melodjinn.cli.main import run
    from melodjinn.world_model.codec_training import latent_change
    from melodjinn.world_model.song_world import SongWorld, SongWorldConfig

    small = ["world=songs", "train.source=stems", "train.model.n_filters=2", "train.model.codebook_size=8",
             "train.model.kmeans_iters=2", "train.batch_size=4", "train.crop_seconds=0.3", "train.warmup_steps=10",
             "train.kmeans_batches=1", "train.eval_clips=1", "train.eval_every=100", "train.checkpoint_every=100",
             "world.clip_seconds=0.5", "train.loss.fft_sizes=[256,64]", "train.steps=40"]
    run("train-codec", f"out={tmp_path / 'plain'}", *small)
    run("train-codec", f"out={tmp_path / 'steady'}", "train.loss.latent_steadiness=2", *small)
    world = SongWorld(SongWorldConfig(clip_seconds=0.5, song_seconds=24.0), seed=1000)
    x = torch.from_numpy(np.stack([world.clip(i).stems[1] for i in range(4)])).float()[:, None]  # bass stems
    change = {}
    for name in ("plain", "steady"):
        codec = TinyCodec.load(tmp_path / name)
        with torch.no_grad():
            change[name] = float(latent_change(codec.encoder(x * codec.config.input_gain)))
    assert change["steady"] < 0.7 * change["plain"], change
    with pytest.raises(ConfigError, match="latent_steadiness"):
        run("train-codec", f"out={tmp_path / 'bad'}", "train.loss.latent_steadiness=-1", *small)
