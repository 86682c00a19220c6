"""Folder → token cache → training windows: layouts, skipped files, resume after a kill, codec mismatch."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from melodjinn.world_model.audio_io import MP3_SUPPORTED
from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError
from melodjinn.world_model.token_cache import DataConfig, TokenCache, TokenizeConfig, read_item_meta, tokenize_folder

torch.set_num_threads(1)

HOP = 320


class EnergyCodec:
    """Deterministic, frame-local stand-in codec: code 0 quantises a frame's RMS, code 1 its mean.

    Frame-local on purpose: chunked encoding must then give exactly the whole-file tokens.
    """

    sample_rate = 24_000
    frame_rate = 75.0
    codebook_size = 16

    def __init__(self, checkpoint_hash: str = "energy-v1", num_codebooks: int = 2, interrupt_at: int | None = None):
        self.name = "energy"
        self.checkpoint_hash = checkpoint_hash
        self.num_codebooks = num_codebooks
        self.calls = 0
        self.interrupt_at = interrupt_at

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:  # (B, 1, N) → (B, K, T)
        self.calls += 1
        if self.interrupt_at is not None and self.calls >= self.interrupt_at:
            raise KeyboardInterrupt  # what Ctrl-C or a kill looks like from inside the loop
        batch, _, n = waveform.shape
        frames = math.ceil(n / HOP)
        x = torch.nn.functional.pad(waveform[:, 0], (0, frames * HOP - n)).reshape(batch, frames, HOP)
        rms = (x.pow(2).mean(-1).sqrt() * 40).floor().clamp(0, 15)
        mean = ((x.mean(-1) + 1) * 8).floor().clamp(0, 15)
        codes = [rms, mean] + [rms] * (self.num_codebooks - 2)
        return torch.stack(codes, dim=1).long()

    def decode(self, codes: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        return torch.zeros(codes.shape[0], 1, codes.shape[-1] * HOP)


def tone(rate: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t) * np.linspace(0.2, 1.0, t.size)).astype(np.float32)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


def settings(**overrides) -> TokenizeConfig:
    data = overrides.pop("data", DataConfig())
    return TokenizeConfig(data=data, progress=False, **overrides)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a44.wav", tone(44_100, 1.0), 44_100)
    sf.write(root / "b48.wav", tone(48_000, 0.7, 220.0), 48_000)
    sf.write(root / "stereo.wav", tone(24_000, 0.5, channels=2), 24_000)
    sf.write(root / "c.flac", tone(32_000, 0.6), 32_000)
    sf.write(root / "d.ogg", tone(44_100, 0.5), 44_100)
    if MP3_SUPPORTED:
        sf.write(root / "e.mp3", tone(44_100, 0.5), 44_100)
    sf.write(root / "sub" / "nested.wav", tone(24_000, 0.3), 24_000)
    (root / "corrupt.wav").write_bytes(b"\x00garbage bytes, not RIFF" * 64)
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not audio")
    return root


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


def test_folder_pipeline_tokenises_every_format_and_skips_bad_files(folder, tmp_path, capsys):
    out = tmp_path / "cache"
    codec = EnergyCodec()
    result = tokenize_folder(folder, out, codec, settings(chunk_seconds=0.25))
    expected = {"a44.wav", "b48.wav", "stereo.wav", "c.flac", "d.ogg", "sub/nested.wav"} | ({"e.mp3"} if MP3_SUPPORTED else set())
    assert result.items == len(expected) and result.encoded == len(expected) and result.reused == 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert {item["id"] for item in manifest["items"]} == expected
    assert {s["path"]: s["reason"] for s in manifest["skipped"]}.keys() == {"corrupt.wav", "empty.wav"}
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "empty file" in reasons["empty.wav"] and "not a readable audio file" in reasons["corrupt.wav"]
    assert manifest["totals"]["skipped"] == 2 and manifest["ignored_extensions"] == {".txt": 1}
    assert manifest["layout"] == "files" and manifest["stem_names"] == ["mix"]
    assert manifest["codec"] == {"name": "energy", "checkpoint_hash": "energy-v1", "num_codebooks": 2, "codebook_size": 16, "frame_rate": 75.0, "sample_rate": 24_000}
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "token-cache" and config["codec"] == manifest["codec"]

    printed = capsys.readouterr().out
    assert "2 skipped" in printed and "corrupt.wav" in printed and "empty.wav" in printed

    by_id = {item["id"]: item for item in manifest["items"]}
    a44 = by_id["a44.wav"]
    assert a44["num_frames"] == 75 and a44["duration"] == pytest.approx(1.0, abs=1e-4)
    assert a44["sources"][0]["sample_rate"] == 44_100 and a44["sources"][0]["path"] == "a44.wav"
    assert by_id["b48.wav"]["num_frames"] == math.ceil(0.7 * 24_000 / HOP)
    assert by_id["stereo.wav"]["sources"][0]["channels"] == 2
    meta = read_item_meta(out / "items" / a44["file"])
    assert meta["id"] == "a44.wav" and meta["stem_names"] == ["mix"]
    with __import__("safetensors").safe_open(str(out / "items" / a44["file"]), "pt") as handle:
        assert handle.get_slice("tokens").get_dtype() == "I16"

    cache = TokenCache(out)
    assert len(cache) == len(expected) and cache.num_streams == 1 and cache.num_codebooks == 2
    tokens = cache[[i["id"] for i in cache.items].index("a44.wav")]
    assert tokens.dtype == torch.int64 and tokens.shape == (1, 2, 75)
    assert tokens[0, 0, -5:].float().mean() > tokens[0, 0, :5].float().mean()  # the ramp got louder
    cache.check_codec(EnergyCodec())
    with pytest.raises(CheckpointError, match="checkpoint_hash"):
        cache.check_codec(EnergyCodec(checkpoint_hash="other"))


def test_chunked_encoding_equals_whole_file_encoding(folder, tmp_path):
    small = tokenize_folder(folder, tmp_path / "small", EnergyCodec(), settings(chunk_seconds=0.1, context_seconds=0.05))
    whole = tokenize_folder(folder, tmp_path / "whole", EnergyCodec(), settings(chunk_seconds=100.0, context_seconds=0.0))
    a, b = TokenCache(small.out), TokenCache(whole.out)
    assert [i["id"] for i in a.items] == [i["id"] for i in b.items]
    for i in range(len(a)):
        assert torch.equal(a[i], b[i]), a.items[i]["id"]


def test_second_run_encodes_nothing_and_a_changed_source_is_re_encoded(folder, tmp_path):
    out = tmp_path / "cache"
    first = EnergyCodec()
    tokenize_folder(folder, out, first, settings())
    assert first.calls > 0
    items_before = snapshot(out / "items")

    again = EnergyCodec()
    result = tokenize_folder(folder, out, again, settings())
    assert again.calls == 0 and result.encoded == 0 and result.reused == result.items
    assert snapshot(out / "items") == items_before

    sf.write(folder / "a44.wav", tone(44_100, 1.2), 44_100)
    changed = EnergyCodec()
    result = tokenize_folder(folder, out, changed, settings())
    assert result.encoded == 1 and changed.calls == 1
    assert TokenCache(out).items[[i["id"] for i in TokenCache(out).items].index("a44.wav")]["num_frames"] == 90

    # With content hashing, a file rewritten with the same bytes (new mtime) is still reused.
    data = (folder / "b48.wav").read_bytes()
    (folder / "b48.wav").write_bytes(data)
    hashed = EnergyCodec()
    assert tokenize_folder(folder, out, hashed, settings(source_check="hash")).encoded == 0 and hashed.calls == 0


def test_interrupted_run_leaves_no_partial_item_and_the_next_run_completes_it(folder, tmp_path):
    reference = tokenize_folder(folder, tmp_path / "reference", EnergyCodec(), settings(chunk_seconds=0.2))
    out = tmp_path / "cache"
    # Items take several chunks each at 0.2 s, so call 9 lands in the middle of an item.
    with pytest.raises(KeyboardInterrupt):
        tokenize_folder(folder, out, EnergyCodec(interrupt_at=9), settings(chunk_seconds=0.2))
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="did not finish"):
        TokenCache(out)
    written = sorted((out / "items").iterdir())
    assert 0 < len(written) < reference.items
    assert all(not p.name.endswith(".tmp") for p in written)
    for path in written:
        read_item_meta(path)  # every file present is a complete item
    (out / "items" / ".x.safetensors.abcd.tmp").write_bytes(b"torn")  # what a SIGKILL mid-write leaves

    resumed_codec = EnergyCodec()
    resumed = tokenize_folder(folder, out, resumed_codec, settings(chunk_seconds=0.2))
    assert resumed.reused == len(written) and resumed.encoded == reference.items - len(written)
    assert not list((out / "items").glob(".*.tmp"))
    done, ref = TokenCache(out), TokenCache(reference.out)
    assert [i["id"] for i in done.items] == [i["id"] for i in ref.items]
    for i in range(len(done)):
        assert torch.equal(done[i], ref[i])


def test_cache_inside_the_data_folder_is_not_searched(folder):
    tokenize_folder(folder, folder / "cache", EnergyCodec(), settings())
    codec = EnergyCodec()
    result = tokenize_folder(folder, folder / "cache", codec, settings())
    assert codec.calls == 0 and result.encoded == 0
    assert json.loads((folder / "cache" / "manifest.json").read_text())["ignored_extensions"] == {".txt": 1}


def test_cache_of_another_codec_is_refused_untouched(folder, tmp_path):
    out = tmp_path / "cache"
    tokenize_folder(folder, out, EnergyCodec(), settings())
    before = snapshot(out)
    for other in (EnergyCodec(checkpoint_hash="energy-v2"), EnergyCodec(num_codebooks=3)):
        with pytest.raises(CheckpointError, match="another codec") as info:
            tokenize_folder(folder, out, other, settings())
        assert "untouched" in str(info.value)
        assert snapshot(out) == before


def test_non_cache_output_folder_is_refused(folder, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        tokenize_folder(folder, out, EnergyCodec(), settings())
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_empty_missing_and_all_corrupt_folders_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no audio here")
    with pytest.raises(DataError, match="holds no audio files"):
        tokenize_folder(empty, tmp_path / "c1", EnergyCodec(), settings())
    with pytest.raises(DataError, match="does not exist"):
        tokenize_folder(tmp_path / "nowhere", tmp_path / "c2", EnergyCodec(), settings())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"nope" * 50)
    (bad / "y.flac").write_bytes(b"")
    with pytest.raises(DataError, match="no usable audio file") as info:
        tokenize_folder(bad, tmp_path / "c3", EnergyCodec(), settings())
    assert "x.wav" in str(info.value) and "y.flac" in str(info.value)
    assert not (tmp_path / "c1").exists() and not (tmp_path / "c3").exists()  # nothing half-made


def make_stems(root: Path) -> None:
    for stem in ("drums", "bass"):
        (root / stem).mkdir(parents=True)
    sf.write(root / "drums" / "song1.wav", tone(44_100, 1.0), 44_100)
    sf.write(root / "bass" / "song1.flac", tone(48_000, 0.8, 110.0), 48_000)  # shorter, other rate and format
    sf.write(root / "drums" / "song2.wav", tone(24_000, 0.4), 24_000)
    sf.write(root / "bass" / "song2.wav", tone(24_000, 0.4, 110.0), 24_000)
    sf.write(root / "drums" / "song3.wav", tone(24_000, 0.4), 24_000)  # no bass: skipped
    (root / "drums" / "song4.wav").write_bytes(b"broken" * 30)
    sf.write(root / "bass" / "song4.wav", tone(24_000, 0.4), 24_000)


def test_stem_folders_become_aligned_multi_stream_items(tmp_path):
    root = tmp_path / "stems"
    make_stems(root)
    result = tokenize_folder(root, tmp_path / "cache", EnergyCodec(), settings(chunk_seconds=0.3))
    cache = TokenCache(result.out)
    assert cache.manifest["layout"] == "stems" and cache.stem_names == ["bass", "drums"]
    assert [i["id"] for i in cache.items] == ["song1", "song2"]
    song1 = cache[0]
    assert song1.shape == (2, 2, 75)  # padded to the longest stem (drums, 1.0 s)
    assert (song1[0, 0, 61:] == 0).all() and (song1[1, 0, 61:] > 0).all()  # bass silent after its 0.8 s
    assert [s["path"] for s in cache.items[0]["sources"]] == ["bass/song1.flac", "drums/song1.wav"]
    skipped = {s["path"]: s["reason"] for s in cache.manifest["skipped"]}
    assert "bass" in skipped["drums/song3.wav"] and "no file in stem folder" in skipped["drums/song3.wav"]
    assert "drums/song4.wav" in skipped["song4"] and "not a readable audio file" in skipped["song4"]

    shortest = tokenize_folder(root, tmp_path / "short", EnergyCodec(), settings(stem_length="shortest"))
    assert TokenCache(shortest.out)[0].shape == (2, 2, 60)  # trimmed to the bass (0.8 s)

    flat = tokenize_folder(root, tmp_path / "flat", EnergyCodec(), settings(data=DataConfig(layout="files")))
    assert TokenCache(flat.out).stem_names == ["mix"] and flat.items == 6
    only = tokenize_folder(root, tmp_path / "only", EnergyCodec(), settings(data=DataConfig(stems=["drums"])))
    assert TokenCache(only.out).stem_names == ["drums"] and only.items == 3


def test_album_folders_are_not_mistaken_for_stems(tmp_path):
    root = tmp_path / "albums"
    for album, tracks in {"first": ["a", "b"], "second": ["c", "d", "e"]}.items():
        (root / album).mkdir(parents=True)
        for track in tracks:
            sf.write(root / album / f"{track}.wav", tone(24_000, 0.2), 24_000)
    result = tokenize_folder(root, tmp_path / "cache", EnergyCodec(), settings())
    assert result.items == 5 and TokenCache(result.out).stem_names == ["mix"]


def test_windows_are_deterministic_by_seed_and_shaped_for_training(tmp_path):
    root = tmp_path / "stems"
    make_stems(root)
    cache = TokenCache(tokenize_folder(root, tmp_path / "cache", EnergyCodec(), settings()).out)
    windows = cache.windows(32, seed=3, num_windows=20)
    assert len(windows) == 20 and windows.eligible == [0]  # song2 (30 frames) is shorter than a window
    first = [windows.locate(j) for j in range(20)]
    assert first == [cache.windows(32, seed=3, num_windows=20).locate(j) for j in range(20)]
    assert first != [cache.windows(32, seed=4, num_windows=20).locate(j) for j in range(20)]
    item, start = first[5]
    assert torch.equal(windows[5], cache[item][:, :, start : start + 32])
    assert windows[5].shape == (2, 2, 32) and windows[5].dtype == torch.int64
    windows.set_epoch(1)
    assert [windows.locate(j) for j in range(20)] != first
    batch = next(iter(torch.utils.data.DataLoader(windows, batch_size=4)))
    assert batch.shape == (4, 2, 2, 32)  # (B, S, K, T)
    with pytest.raises(DataError, match="no item is as long"):
        cache.windows(1000)


def test_bad_settings_are_config_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="stem_length"):
        tokenize_folder(folder, tmp_path / "c", EnergyCodec(), settings(stem_length="median"))
    with pytest.raises(ConfigError, match="chunk_seconds"):
        tokenize_folder(folder, tmp_path / "c", EnergyCodec(), settings(chunk_seconds=0))


def untrained_tiny_codec():
    """A TinyCodec with k-means-initialised codebooks: the real encodec blocks, no shipped weights needed."""
    from melodjinn.world_model.codec import TinyCodec, TinyCodecConfig

    torch.manual_seed(0)
    codec = TinyCodec(TinyCodecConfig(codebook_size=16, kmeans_iters=2))
    with torch.no_grad():
        codec.init_quantizer(codec.encoder(torch.randn(2, 1, 4800) * 0.1))
    return codec


def test_real_tiny_codec_architecture_through_the_pipeline(tmp_path):
    codec = untrained_tiny_codec()
    root = tmp_path / "audio"
    root.mkdir()
    sf.write(root / "one.wav", tone(44_100, 0.6), 44_100)
    sf.write(root / "two.flac", tone(24_000, 0.5, 220.0), 24_000)
    result = tokenize_folder(root, tmp_path / "cache", codec, settings(chunk_seconds=0.2, context_seconds=0.1))
    cache = TokenCache(result.out)
    assert [item["num_frames"] for item in cache.items] == [45, 38]
    assert cache[0].shape == (1, 4, 45) and 0 <= int(cache[0].min()) and int(cache[0].max()) < 16
    cache.check_codec(codec)
    assert cache.codec["name"] == "tiny" and cache.codec["checkpoint_hash"]
    assert tokenize_folder(root, result.out, codec, settings(chunk_seconds=0.2, context_seconds=0.1)).encoded == 0


def test_cli_with_the_real_codec(tmp_path):
    from importlib import resources

    if not resources.files("melodjinn.configs").joinpath("codec", "tiny.yaml").is_file():
        pytest.skip("configs/codec/tiny.yaml does not exist yet (being written in parallel)")
    checkpoint = untrained_tiny_codec().save(tmp_path / "codec")
    from melodjinn.cli.main import run

    root = tmp_path / "audio"
    root.mkdir()
    sf.write(root / "one.wav", tone(44_100, 0.6), 44_100)
    sf.write(root / "two.flac", tone(24_000, 0.4, 220.0), 24_000)
    out = tmp_path / "cache"
    args = (f"data.path={root}", f"out={out}", f"codec.checkpoint={checkpoint}", "progress=false", "device=cpu")
    result = run("tokenize", *args)
    assert result.items == 2
    cache = TokenCache(out)
    assert cache[0].shape[:2] == (1, cache.num_codebooks)
    assert int(cache[0].max()) < cache.codebook_size
    again = run("tokenize", *args)
    assert again.encoded == 0 and again.reused == 2
    assert json.loads((out / "config.json").read_text())["config"]["data"]["path"] == str(root)
