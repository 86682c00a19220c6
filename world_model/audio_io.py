"""Audio file I/O: any WAV/FLAC/OGG/MP3 in, float32 at the project rate (24 kHz) out.

Reading goes through `soundfile` (libsndfile) and resampling through `soxr`; torchaudio is deliberately not used
(no build matches every torch, DESIGN.md §4). Arrays are channel-first like every waveform in the project:
mono is `(N,)`, multi-channel is `(C, N)`.

Every way a file can be unusable (missing, empty, corrupt, truncated, no samples, NaN) raises `DataError` with
the path and the reason, so a caller walking a folder can skip the file and report why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf
import soxr

from melodjinn.world_model.artifacts import atomic_path
from melodjinn.world_model.errors import DataError

SAMPLE_RATE = 24_000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
# soxr "VHQ": the resampler is a negligible cost next to the codec, so there is no reason to trade quality.
RESAMPLE_QUALITY = "VHQ"

# Formats libsndfile names differently from the file extension.
_FORMAT_BY_EXTENSION = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG", ".oga": "OGG", ".mp3": "MP3", ".aif": "AIFF", ".aiff": "AIFF"}
# MP3 needs libsndfile >= 1.1 built with mpg123/lame; older system libraries open only the other formats.
MP3_SUPPORTED = "MP3" in sf.available_formats()


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int  # at the file's own rate; for MP3 this is libsndfile's figure after decoder delay
    format: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); delete it or re-export the audio")
    if path.suffix.lower() == ".mp3" and not MP3_SUPPORTED:
        raise DataError(
            f"{path}: this libsndfile ({sf.__libsndfile_version__}) cannot read MP3; install soundfile>=0.12 with "
            "its bundled libsndfile >= 1.1 (`pip install -U soundfile`) or convert the file to FLAC/WAV"
        )


def _open(path: Path) -> sf.SoundFile:
    _check_readable(path)
    try:
        handle = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as exc:
        reason = _reason(exc)
        if "does not exist" in reason:
            # libsndfile says this for an MP3 with no decodable frame; the file does exist, so it would mislead.
            reason = "no decodable audio frames"
        raise DataError(f"{path}: not a readable audio file ({reason}); re-export or remove it") from None
    if handle.samplerate <= 0 or handle.channels <= 0:
        handle.close()
        raise DataError(f"{path}: header claims sample rate {handle.samplerate} and {handle.channels} channels; the file is corrupt")
    return handle


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    # soundfile prefixes its own "Error opening 'path': "; the caller already names the path.
    if ": " in text and text.startswith("Error"):
        text = text.split(": ", 1)[1]
    return text or type(exc).__name__


def audio_info(path: str | os.PathLike) -> AudioInfo:
    """Header facts of an audio file, without decoding it. Raises DataError if it cannot be opened."""
    path = Path(path)
    with _open(path) as handle:
        return AudioInfo(str(path), int(handle.samplerate), int(handle.channels), int(handle.frames), str(handle.format))


def _downmix(block: np.ndarray, mono: bool) -> np.ndarray:
    """(n, C) as read → (n, 1) averaged, or (n, C) unchanged."""
    if mono and block.shape[1] > 1:
        return block.mean(axis=1, keepdims=True, dtype=np.float32)
    return block


def stream_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    mono: bool = True,
    block_seconds: float = 10.0,
) -> Iterator[np.ndarray]:
    """Decode and resample a file block by block: yields float32 `(C, n)` arrays (C = 1 when `mono`).

    Memory stays bounded by the block size whatever the file's length (MP3 excepted, see `_read_blocks`),
    and the concatenated blocks equal
    `load_audio` exactly (soxr's stream resampler carries its filter state across blocks).
    A file that fails mid-way raises DataError; callers must discard what they already received.
    """
    path = Path(path)
    handle = _open(path)
    with handle:
        source_rate = int(handle.samplerate)
        channels = 1 if mono else int(handle.channels)
        block_frames = max(1, int(round(block_seconds * source_rate)))
        resampler = None
        if source_rate != sample_rate:
            resampler = soxr.ResampleStream(source_rate, sample_rate, channels, dtype="float32", quality=RESAMPLE_QUALITY)
        produced = 0
        for block, last in _read_blocks(handle, path, block_frames):  # (n, C)
            block = _downmix(block, mono)
            if not np.isfinite(block).all():
                raise DataError(f"{path}: contains NaN or infinite samples; the file is corrupt")
            if resampler is not None:
                block = resampler.resample_chunk(block, last=last)
            if block.shape[0]:
                produced += block.shape[0]
                yield np.ascontiguousarray(block.T)  # (C, n)
        if produced == 0:
            raise DataError(f"{path}: holds no audio samples (header only); re-export or remove it")


def _read_blocks(handle: sf.SoundFile, path: Path, block_frames: int) -> Iterator[tuple[np.ndarray, bool]]:
    """(block (n, C) float32, is_last) pairs at the file's own rate."""
    try:
        if handle.format == "MP3":
            # libsndfile 1.2's MP3 reader zero-fills a partial read when mpg123 returns fewer samples than asked
            # (gaps of silence inside tonal music); one read of the whole file is exact, so MP3 is decoded whole
            # and only sliced here. Memory is then O(file) for MP3 alone.
            whole = handle.read(-1, dtype="float32", always_2d=True)
            for start in range(0, max(whole.shape[0], 1), block_frames):
                yield whole[start : start + block_frames], start + block_frames >= whole.shape[0]
            return
        while True:
            block = handle.read(block_frames, dtype="float32", always_2d=True)
            last = block.shape[0] < block_frames
            yield block, last
            if last:
                return
    except (sf.SoundFileError, RuntimeError) as exc:
        raise DataError(f"{path}: decoding failed ({_reason(exc)}); the file is truncated or corrupt") from None


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, mono: bool = True) -> np.ndarray:
    """Whole file as float32 at `sample_rate`: `(N,)` when `mono` (channels averaged), else `(C, N)`."""
    blocks = list(stream_audio(path, sample_rate=sample_rate, mono=mono, block_seconds=60.0))
    audio = np.concatenate(blocks, axis=1)  # (C, N)
    return audio[0] if mono else audio


def resample(audio: np.ndarray, source_rate: int, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample `(N,)` or `(C, N)` float audio with soxr; returns float32 of the same rank."""
    audio = np.asarray(audio, dtype=np.float32)
    if source_rate == target_rate:
        return audio
    if audio.ndim == 1:
        return soxr.resample(audio, source_rate, target_rate, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)
    out = soxr.resample(np.ascontiguousarray(audio.T), source_rate, target_rate, quality=RESAMPLE_QUALITY)  # (N', C)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE, subtype: str | None = None) -> Path:
    """Write `(N,)` or `(C, N)` audio atomically; the format follows the extension (.wav .flac .ogg .mp3).

    `subtype` is libsndfile's (e.g. "PCM_16", "FLOAT"); None takes the format's default (16-bit for WAV/FLAC).
    """
    path = Path(path)
    fmt = _FORMAT_BY_EXTENSION.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown audio extension {path.suffix!r}; use one of {', '.join(_FORMAT_BY_EXTENSION)}")
    if fmt == "MP3" and not MP3_SUPPORTED:
        raise DataError(f"{path}: this libsndfile ({sf.__libsndfile_version__}) cannot write MP3; write .flac or .wav instead")
    audio = np.asarray(audio)
    if audio.ndim == 2 and audio.shape[0] > audio.shape[1]:
        raise DataError(f"{path}: audio of shape {audio.shape} looks like (samples, channels); pass (channels, samples)")
    if audio.ndim not in (1, 2) or audio.size == 0:
        raise DataError(f"{path}: expected a non-empty (N,) or (C, N) array, got shape {audio.shape}")
    frames = audio if audio.ndim == 1 else audio.T  # soundfile wants (N, C)
    # The temporary name ends in .tmp, so the format cannot be inferred from it and is passed explicitly.
    with atomic_path(path) as tmp:
        sf.write(str(tmp), frames, int(sample_rate), format=fmt, subtype=subtype)
    return path
