"""Token cache: a folder of audio tokenised once by a codec, then read by training as fixed-length windows.

`melodjinn tokenize data.path=DIR out=CACHE codec=tiny` (or `tokenize_folder` from Python) writes

    CACHE/config.json      resolved config, code version, codec identity (written before the first item)
    CACHE/items/<id>.safetensors
                           `tokens` (S, K, T) int16 (int32 when codebook_size > 32767) and, in the
                           safetensors metadata key "melodjinn.item", the item's JSON record
    CACHE/manifest.json    the items, the codec identity, the skipped files with reasons (written last)

Folder layouts (`data.layout`):
- `files`: every audio file under data.path (recursively) is one item with one stream, "mix".
- `stems`: each direct sub-folder of data.path is a stem (`drums/`, `bass/`, ...); a song is a relative path
  without extension (`drums/live/song1.wav` and `bass/live/song1.flac` are song `live/song1`) and must have
  exactly one file in every stem folder, otherwise it is skipped and reported. Stems are ordered by name
  (or as listed in `data.stems`).
- `auto` (default): `stems` when data.path holds no audio files itself and at least half of the songs found
  in its sub-folders appear in every sub-folder; `files` otherwise (e.g. one folder per album).
Stem alignment rule: all stems of a song start at sample 0 (after resampling to the codec rate); with
`stem_length: longest` (default) shorter stems are padded with silence at the end up to the longest, since
DAW exports commonly trim trailing silence; `shortest` trims every stem to the shortest instead.

Each item is encoded in chunks of `chunk_seconds` with `context_seconds` of the preceding audio prepended
and its frames dropped, so codec memory is bounded and the codec's left receptive field sees real audio at
chunk boundaries. A song of N samples (after alignment) gives T = ceil(N / hop) frames, the last one
zero-padded.

Reliability (DESIGN.md §10): every file is written atomically; an item file exists completely or not at
all. Re-running reuses an item whose encoding settings and codec match and whose sources are unchanged
(size + mtime, or SHA-256 with `source_check: hash`), so a killed run is completed by the next one without
re-encoding finished items. A cache made by another codec is refused before anything is written.
Unreadable files are skipped, listed in the manifest and counted in the printed summary.
"""

from __future__ import annotations

import bisect
import hashlib
import inspect
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from omegaconf import MISSING, DictConfig, OmegaConf
from safetensors import safe_open

from melodjinn.world_model.artifacts import CONFIG_FILE, code_version, save_tensors, write_json
from melodjinn.world_model.audio_io import AUDIO_EXTENSIONS, audio_info, stream_audio
from melodjinn.world_model.codec import Codec, codec_info
from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError
from melodjinn.world_model.runtime import to_dataclass

CACHE_KIND = "token-cache"
CACHE_FORMAT = 1
MANIFEST_FILE = "manifest.json"
ITEMS_DIR = "items"
ITEM_META_KEY = "melodjinn.item"
MIX_STREAM = "mix"


# ----------------------------------------------------------------------------------------------------------
# config


@dataclass
class DataConfig:
    path: str = MISSING
    layout: str = "auto"  # auto | files | stems
    stems: Optional[list[str]] = None  # stems layout: sub-folders to use, in this order (None = all, sorted)
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))


@dataclass
class TokenizeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    out: str = MISSING
    chunk_seconds: float = 10.0
    context_seconds: float = 1.0
    stem_length: str = "longest"  # longest | shortest
    source_check: str = "stat"  # stat | hash
    progress: bool = True

    def validate(self) -> None:
        if self.data.layout not in ("auto", "files", "stems"):
            raise ConfigError(f"tokenize.data.layout={self.data.layout!r}; use auto, files or stems")
        if self.stem_length not in ("longest", "shortest"):
            raise ConfigError(f"tokenize.stem_length={self.stem_length!r}; use longest or shortest")
        if self.source_check not in ("stat", "hash"):
            raise ConfigError(f"tokenize.source_check={self.source_check!r}; use stat (size + mtime) or hash (SHA-256)")
        if not self.chunk_seconds > 0:
            raise ConfigError(f"tokenize.chunk_seconds must be > 0, got {self.chunk_seconds}")
        if self.context_seconds < 0:
            raise ConfigError(f"tokenize.context_seconds must be >= 0, got {self.context_seconds}")
        if not self.data.extensions:
            raise ConfigError("tokenize.data.extensions is empty; list the audio extensions to read, e.g. [.wav, .flac]")


# ----------------------------------------------------------------------------------------------------------
# codec identity


def codec_identity(codec: Codec) -> dict[str, Any]:
    """What makes two codecs produce the same tokens: `codec_info` (name, K, V, rates, extras) + weights hash."""
    return _json_roundtrip({**codec_info(codec), "checkpoint_hash": _codec_hash(codec)})


def _codec_hash(codec: Codec) -> Optional[str]:
    declared = getattr(codec, "checkpoint_hash", None)
    if declared:
        return str(declared)
    # Without a declared hash, hash the weights themselves: it tells apart two checkpoints of the same class.
    module = codec if isinstance(codec, torch.nn.Module) else getattr(codec, "model", None)
    if not isinstance(module, torch.nn.Module):
        return None
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _identity_mismatch(cached: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(cached) | set(current))
    return [f"{k}: cache {cached.get(k)!r} vs this run {current.get(k)!r}" for k in keys if cached.get(k) != current.get(k)]


def _json_roundtrip(value: Any) -> Any:
    """Normalise tuples/numpy scalars so values compare equal to what is read back from JSON."""
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------------------
# discovery


@dataclass
class Song:
    key: str  # files: relative path with extension; stems: relative path without extension
    sources: list[Path]  # one per stream, in stream order


@dataclass
class Discovery:
    layout: str
    stem_names: list[str]
    songs: list[Song]
    skipped: list[dict[str, str]]  # {"path", "reason"}
    ignored: dict[str, int]  # non-audio extensions seen → count


def _walk_audio(root: Path, extensions: set[str], ignored: dict[str, int], exclude: Optional[Path]) -> list[Path]:
    """Audio files under root, sorted; hidden files and folders (`.git`, macOS `._x.wav` forks) are skipped,
    and so is `exclude` (the cache itself when it lives inside the data folder)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (exclude is None or (Path(dirpath) / d).resolve() != exclude))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            suffix = Path(name).suffix.lower()
            if suffix in extensions:
                found.append(Path(dirpath) / name)
            else:
                ignored[suffix or "(none)"] = ignored.get(suffix or "(none)", 0) + 1
    return found


def discover(root: str | os.PathLike, data: DataConfig, exclude: str | os.PathLike | None = None) -> Discovery:
    """Find the songs under `root` according to `data.layout` (see the module docstring for the rules);
    the folder `exclude` (the cache being written) is not searched."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data.path={root} does not exist; point data.path at a folder of audio files")
    if not root.is_dir():
        raise DataError(f"data.path={root} is not a folder; point data.path at a folder of audio files")
    extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in data.extensions}
    ignored: dict[str, int] = {}
    files = _walk_audio(root, extensions, ignored, Path(exclude).resolve() if exclude is not None else None)
    if not files:
        raise DataError(
            f"data.path={root} holds no audio files ({', '.join(sorted(extensions))}, searched recursively); "
            "point data.path at a folder of audio, or set data.extensions"
        )

    by_stem: dict[str, list[Path]] = {}
    top_level = []
    for path in files:
        rel = path.relative_to(root)
        if len(rel.parts) == 1:
            top_level.append(path)
        else:
            by_stem.setdefault(rel.parts[0], []).append(path)

    layout = data.layout
    if layout == "auto":
        layout = "stems" if data.stems or (not top_level and _looks_like_stems(root, by_stem)) else "files"

    if layout == "files":
        songs = [Song(str(p.relative_to(root).as_posix()), [p]) for p in files]
        return Discovery("files", [MIX_STREAM], songs, [], ignored)

    stem_names = list(data.stems) if data.stems else sorted(by_stem)
    missing = [s for s in stem_names if s not in by_stem]
    if missing:
        raise DataError(
            f"data.path={root}: stem folder(s) {', '.join(missing)} hold no audio; found stem folders: "
            f"{', '.join(sorted(by_stem)) or 'none'}"
        )
    if len(stem_names) < 1:
        raise DataError(f"data.path={root}: no stem sub-folders found; use data.layout=files for a flat folder")
    skipped = [{"path": str(p.relative_to(root).as_posix()), "reason": "not inside a stem folder"} for p in top_level]
    per_stem = {stem: _song_keys(root / stem, by_stem[stem]) for stem in stem_names}
    songs = []
    for key in sorted(set().union(*(set(m) for m in per_stem.values()))):
        present = {stem: per_stem[stem].get(key, []) for stem in stem_names}
        absent = [stem for stem, paths in present.items() if not paths]
        duplicated = [stem for stem, paths in present.items() if len(paths) > 1]
        first = next(p for paths in present.values() for p in paths)
        where = str(first.relative_to(root).as_posix())
        if absent:
            skipped.append({"path": where, "reason": f"song {key!r} has no file in stem folder(s) {', '.join(absent)}; every song needs one file per stem"})
        elif duplicated:
            names = ", ".join(str(p.relative_to(root).as_posix()) for s in duplicated for p in present[s])
            skipped.append({"path": where, "reason": f"song {key!r} is ambiguous: several files for one stem ({names}); keep one"})
        else:
            songs.append(Song(key, [present[stem][0] for stem in stem_names]))
    return Discovery("stems", stem_names, songs, skipped, ignored)


def _song_keys(stem_dir: Path, paths: list[Path]) -> dict[str, list[Path]]:
    keys: dict[str, list[Path]] = {}
    for path in paths:
        keys.setdefault(path.relative_to(stem_dir).with_suffix("").as_posix(), []).append(path)
    return keys


def _looks_like_stems(root: Path, by_stem: dict[str, list[Path]]) -> bool:
    # Album-per-folder collections also have no top-level files; they rarely share track names across folders.
    if len(by_stem) < 2:
        return False
    key_sets = [set(_song_keys(root / stem, paths)) for stem, paths in by_stem.items()]
    union = set().union(*key_sets)
    shared = set.intersection(*key_sets)
    return len(shared) >= 0.5 * len(union)


# ----------------------------------------------------------------------------------------------------------
# encoding


class _StreamBuffer:
    """Pulls resampled mono blocks from `stream_audio` and hands out exactly-sized pieces."""

    def __init__(self, blocks: Iterator[np.ndarray]):
        self._blocks = blocks
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.exhausted = False
        self.produced = 0  # samples handed out so far

    def take(self, n: int) -> np.ndarray:
        while self._pending_len < n and not self.exhausted:
            try:
                block = next(self._blocks)[0]  # (n,) of the (1, n) mono block
            except StopIteration:
                self.exhausted = True
                break
            self._pending.append(block)
            self._pending_len += block.shape[0]
        joined = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        out, rest = joined[:n], joined[n:]
        self._pending, self._pending_len = ([rest] if rest.size else []), rest.size
        self.produced += out.size
        return out


def _token_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


def _codec_device(codec: Codec) -> torch.device:
    device = getattr(codec, "device", None)
    if device is not None:
        return torch.device(device)
    module = codec if isinstance(codec, torch.nn.Module) else getattr(codec, "model", None)
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return tensor.device
    return torch.device("cpu")


def encode_song(
    codec: Codec,
    sources: Sequence[Path],
    chunk_seconds: float = 10.0,
    context_seconds: float = 1.0,
    stem_length: str = "longest",
) -> tuple[torch.Tensor, list[int]]:
    """Encode aligned stems chunk by chunk. Returns tokens (S, K, T) int64 on CPU and each stem's length in
    samples at the codec rate before alignment."""
    sample_rate = int(codec.sample_rate)
    hop_float = sample_rate / float(codec.frame_rate)
    hop = int(round(hop_float))
    if abs(hop - hop_float) > 1e-6:
        raise ConfigError(f"codec sample_rate {sample_rate} / frame_rate {codec.frame_rate} is not a whole hop; cannot chunk it")
    # Chunk and context are whole hops so chunk boundaries fall on frame boundaries and frames concatenate.
    chunk = max(1, int(round(chunk_seconds * sample_rate / hop))) * hop
    context = int(round(context_seconds * sample_rate / hop)) * hop
    device = _codec_device(codec)
    buffers = [_StreamBuffer(stream_audio(p, sample_rate=sample_rate, mono=True, block_seconds=chunk_seconds)) for p in sources]
    num_streams = len(sources)
    tail = np.zeros((num_streams, 0), np.float32)  # (S, context) of audio preceding the current chunk
    pieces: list[torch.Tensor] = []
    while True:
        parts = [b.take(chunk) for b in buffers]
        lengths = [p.size for p in parts]
        n = max(lengths) if stem_length == "longest" else min(lengths)
        if n == 0:
            break
        wave = np.zeros((num_streams, n), np.float32)  # (S, n); missing samples of a shorter stem stay silent
        for s, part in enumerate(parts):
            wave[s, : min(n, part.size)] = part[:n]
        frames = -(-n // hop)
        padded = np.zeros((num_streams, tail.shape[1] + frames * hop), np.float32)
        padded[:, : tail.shape[1]] = tail
        padded[:, tail.shape[1] : tail.shape[1] + n] = wave
        with torch.inference_mode():
            codes = codec.encode(torch.from_numpy(padded)[:, None, :].to(device))  # (S, K, T_ctx + frames)
        codes = codes.to("cpu", torch.int64)[:, :, tail.shape[1] // hop :]  # (S, K, frames)
        if codes.ndim != 3 or codes.shape[0] != num_streams or codes.shape[2] != frames:
            raise RuntimeError(
                f"codec {type(codec).__name__} returned codes of shape {tuple(codes.shape)} after dropping context; "
                f"expected ({num_streams}, K, {frames}) for {padded.shape[1]} samples (T = ceil(N / hop))"
            )
        pieces.append(codes)
        if n < chunk:
            break
        if context:
            tail = np.concatenate([tail, wave], axis=1)[:, -context:]
    if not pieces:
        raise DataError(f"{sources[0]}: no audio samples after decoding")
    # With `shortest` the other streams are not drained; their length is what was consumed.
    return torch.cat(pieces, dim=2), [b.produced for b in buffers]  # (S, K, T)


# ----------------------------------------------------------------------------------------------------------
# the cache on disk


def item_filename(key: str) -> str:
    """A readable, collision-free file name for a song key (paths may contain any character)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "item"
    return f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_item_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record stored in an item's safetensors header (cheap: the tensor data is not read)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    return json.loads(meta[ITEM_META_KEY])


def _source_unchanged(record: dict[str, Any], path: Path, source_check: str) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    if source_check == "hash":
        return record.get("sha256") == _sha256(path)
    return record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns


def _reusable(item_path: Path, song: Song, root: Path, encoding: dict[str, Any], source_check: str) -> Optional[dict[str, Any]]:
    if not item_path.exists():
        return None
    try:
        meta = read_item_meta(item_path)
    except Exception:  # a damaged item is simply re-encoded
        return None
    if meta.get("encoding") != encoding or meta.get("id") != song.key:
        return None
    records = meta.get("sources", [])
    if [r.get("path") for r in records] != [p.relative_to(root).as_posix() for p in song.sources]:
        return None
    if not all(_source_unchanged(r, p, source_check) for r, p in zip(records, song.sources)):
        return None
    return meta


def _check_out_dir(out: Path, identity: dict[str, Any]) -> None:
    """Refuse, before writing anything, a directory that is not this codec's token cache."""
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"out={out} exists and is not a folder; choose a new out= directory")
    config = out / CONFIG_FILE
    if not config.exists():
        if any(out.iterdir()):
            raise DataError(f"out={out} is not empty and holds no token cache ({CONFIG_FILE} missing); choose an empty or new out= directory")
        return
    try:
        meta = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"out={out}: {CONFIG_FILE} is unreadable ({exc}); choose a new out= directory or delete this one") from None
    if meta.get("kind") != CACHE_KIND:
        raise CheckpointError(f"out={out} holds a {meta.get('kind')!r} artefact, not a token cache; choose another out= directory")
    if meta.get("format") != CACHE_FORMAT:
        raise CheckpointError(f"out={out} is a token cache of format {meta.get('format')}, this code writes format {CACHE_FORMAT}; use a new out= directory")
    mismatch = _identity_mismatch(meta.get("codec", {}), identity)
    if mismatch:
        raise CheckpointError(
            f"out={out} is a token cache made by another codec ({'; '.join(mismatch)}); it was left untouched. "
            "Use a new out= directory for this codec, or delete the old cache to re-tokenise"
        )


def _clean_temp_files(out: Path) -> None:
    # A SIGKILL during an atomic write leaves its `.name.XXXX.tmp`; nothing ever reads those.
    for folder in (out, out / ITEMS_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


@dataclass
class TokenizeResult:
    out: Path
    items: int
    encoded: int
    reused: int
    skipped: list[dict[str, str]]
    frames: int
    seconds: float

    def summary(self) -> str:
        lines = [
            f"token cache {self.out}: {self.items} items ({self.encoded} encoded, {self.reused} already cached), "
            f"{self.seconds:.1f} s of audio, {self.frames} frames; {len(self.skipped)} skipped"
        ]
        lines += [f"  skipped {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def tokenize_folder(
    data_path: str | os.PathLike,
    out: str | os.PathLike,
    codec: Codec,
    settings: Optional[TokenizeConfig] = None,
    config: Optional[dict[str, Any]] = None,
    discovery: Optional[Discovery] = None,
) -> TokenizeResult:
    """Tokenise every song under `data_path` into the cache `out` (see the module docstring).

    `settings` carries chunking, layout and resume options (`settings.data.path`/`settings.out` are ignored in
    favour of the arguments); `config` is the full resolved config recorded in config.json; `discovery` is
    `discover(data_path, settings.data)` when the caller already ran it.
    """
    from tqdm.auto import tqdm

    settings = settings or TokenizeConfig()
    settings.validate()
    root, out = Path(data_path), Path(out)
    identity = codec_identity(codec)
    _check_out_dir(out, identity)
    found = discovery if discovery is not None else discover(root, settings.data, exclude=out)
    encoding = _json_roundtrip(
        {
            "codec": identity,
            "chunk_seconds": settings.chunk_seconds,
            "context_seconds": settings.context_seconds,
            "stem_length": settings.stem_length,
            "stem_names": found.stem_names,
        }
    )
    token_dtype = _token_dtype(identity["codebook_size"])
    config_record = {
        "kind": CACHE_KIND,
        "format": CACHE_FORMAT,
        "config": config if config is not None else _json_roundtrip({"data_path": str(root), "settings": _settings_dict(settings)}),
        "code": code_version(),
        "codec": identity,
    }

    config_written = False

    def write_config() -> None:
        nonlocal config_written
        if not config_written:
            # Written before the first item: a cache directory always says which codec its items belong to.
            write_json(out / CONFIG_FILE, config_record)
            config_written = True

    items: list[dict[str, Any]] = []
    skipped = list(found.skipped)
    encoded = reused = 0
    if out.exists():
        _clean_temp_files(out)
    bar = tqdm(found.songs, desc="tokenize", unit="song", disable=not settings.progress, dynamic_ncols=True)
    for song in bar:
        item_path = out / ITEMS_DIR / item_filename(song.key)
        meta = _reusable(item_path, song, root, encoding, settings.source_check)
        if meta is not None:
            reused += 1
        else:
            try:
                meta, tokens = _encode_item(codec, song, root, settings, encoding)
            except DataError as exc:
                skipped.append({"path": song.sources[0].relative_to(root).as_posix() if len(song.sources) == 1 else song.key, "reason": _strip_path(str(exc), song.sources)})
                bar.set_postfix(skipped=len(skipped))
                continue
            write_config()
            save_tensors(item_path, {"tokens": tokens.to(token_dtype)}, metadata={ITEM_META_KEY: json.dumps(meta, sort_keys=True)})
            encoded += 1
        items.append({k: v for k, v in meta.items() if k != "encoding"} | {"file": item_path.name})
    bar.close()

    if not items:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise DataError(f"data.path={root}: no usable audio file ({len(skipped)} skipped: {reasons}{more}); fix or replace the files")

    write_config()
    frames = sum(item["num_frames"] for item in items)
    seconds = sum(item["duration"] for item in items)
    manifest = {
        "kind": CACHE_KIND,
        "format": CACHE_FORMAT,
        "data_path": str(root.resolve()),
        "layout": found.layout,
        "stem_names": found.stem_names,
        "codec": identity,
        "encoding": encoding,
        "token_dtype": str(token_dtype).removeprefix("torch."),
        "items": items,
        "skipped": skipped,
        "ignored_extensions": found.ignored,
        "totals": {"items": len(items), "frames": frames, "seconds": seconds, "skipped": len(skipped)},
    }
    write_json(out / MANIFEST_FILE, manifest)
    result = TokenizeResult(out, len(items), encoded, reused, skipped, frames, seconds)
    print(result.summary())
    if found.ignored:
        print("  ignored non-audio files: " + ", ".join(f"{n} × {ext}" for ext, n in sorted(found.ignored.items())))
    return result


def _strip_path(message: str, sources: Sequence[Path]) -> str:
    # The skip list already names the file; keep which stem failed when there are several.
    if len(sources) == 1:
        prefix = f"{sources[0]}: "
        return message[len(prefix) :] if message.startswith(prefix) else message
    return message


def _settings_dict(settings: TokenizeConfig) -> dict[str, Any]:
    return asdict(settings)


def _encode_item(codec: Codec, song: Song, root: Path, settings: TokenizeConfig, encoding: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    infos = [audio_info(p) for p in song.sources]  # header check of every stem before any encoding
    stats = [p.stat() for p in song.sources]
    hashes = [_sha256(p) for p in song.sources]
    tokens, stem_samples = encode_song(codec, song.sources, settings.chunk_seconds, settings.context_seconds, settings.stem_length)
    sample_rate = int(codec.sample_rate)
    num_samples = max(stem_samples) if settings.stem_length == "longest" else min(stem_samples)
    sources = [
        {
            "path": p.relative_to(root).as_posix(),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "sha256": h,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "duration": round(info.duration, 6),
            "samples": n,  # read at the codec rate, before alignment (with `shortest`, only what was used)
        }
        for p, st, h, info, n in zip(song.sources, stats, hashes, infos, stem_samples)
    ]
    meta = _json_roundtrip(
        {
            "id": song.key,
            "stem_names": encoding["stem_names"],
            "sources": sources,
            "num_frames": int(tokens.shape[-1]),
            "num_samples": num_samples,
            "duration": num_samples / sample_rate,
            "encoding": encoding,
        }
    )
    return meta, tokens


def tokenize(cfg: DictConfig) -> TokenizeResult:
    """`melodjinn tokenize data.path=DIR out=DIR codec=tiny`."""
    from melodjinn.world_model.codec import load_codec
    from melodjinn.world_model.runtime import resolve_device

    names = [f.name for f in TokenizeConfig.__dataclass_fields__.values()]
    settings = to_dataclass(TokenizeConfig, OmegaConf.masked_copy(cfg, [n for n in names if n in cfg]), "tokenize")
    settings.validate()
    # Data problems surface before the (possibly slow, possibly missing) codec is loaded.
    found = discover(settings.data.path, settings.data, exclude=settings.out)
    device = resolve_device(str(cfg.get("device", "cpu")))
    if "device" in inspect.signature(load_codec).parameters:
        codec = load_codec(cfg.codec, device=device)
    else:
        codec = load_codec(cfg.codec)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return tokenize_folder(settings.data.path, settings.out, codec, settings, config=resolved, discovery=found)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# reading: what training uses


class TokenCache(torch.utils.data.Dataset):
    """A finished token cache. `cache[i]` is item i's tokens (S, K, T) as int64.

    Only `manifest.json` and the item headers are read when opening; tokens are read (memory-mapped) on access,
    so the object is cheap to pickle into DataLoader workers.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST_FILE
        if not manifest_path.exists():
            hint = (
                "tokenisation did not finish; re-run `melodjinn tokenize` with the same out= to complete it"
                if (self.directory / CONFIG_FILE).exists()
                else "not a token cache; create one with `melodjinn tokenize data.path=DIR out=DIR`"
            )
            raise DataError(f"{self.directory}: no {MANIFEST_FILE}: {hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{manifest_path} is not valid JSON ({exc.msg}); re-run `melodjinn tokenize` to rewrite it") from None
        if manifest.get("kind") != CACHE_KIND or manifest.get("format") != CACHE_FORMAT:
            raise DataError(f"{self.directory}: manifest is kind {manifest.get('kind')!r} format {manifest.get('format')}, expected a {CACHE_KIND} of format {CACHE_FORMAT}; re-tokenise")
        self.manifest = manifest
        self.items: list[dict[str, Any]] = manifest["items"]
        self.stem_names: list[str] = manifest["stem_names"]
        self.codec: dict[str, Any] = manifest["codec"]
        self._paths = [self.directory / ITEMS_DIR / item["file"] for item in self.items]
        self.lengths = [self._check_item(i) for i in range(len(self.items))]

    def _check_item(self, index: int) -> int:
        path = self._paths[index]
        if not path.exists():
            raise DataError(f"{path} is listed in the manifest but missing; re-run `melodjinn tokenize` with the same out= to repair the cache")
        try:
            with safe_open(str(path), framework="pt") as handle:
                shape = handle.get_slice("tokens").get_shape()
        except Exception as exc:
            raise DataError(f"{path} is not a readable token item ({exc}); delete it and re-run `melodjinn tokenize`") from None
        expected = [self.num_streams, self.num_codebooks, self.items[index]["num_frames"]]
        if list(shape) != expected:
            raise DataError(f"{path} holds tokens of shape {list(shape)}, the manifest says {expected}; re-run `melodjinn tokenize` to refresh the manifest")
        return int(shape[-1])

    @property
    def num_streams(self) -> int:
        return len(self.stem_names)

    @property
    def num_codebooks(self) -> int:
        return int(self.codec["num_codebooks"])

    @property
    def codebook_size(self) -> int:
        return int(self.codec["codebook_size"])

    @property
    def frame_rate(self) -> float:
        return float(self.codec["frame_rate"])

    @property
    def total_frames(self) -> int:
        return sum(self.lengths)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        """(S, K, T) int64 tokens of item `index`."""
        return self.read(index, 0, self.lengths[index])

    def read(self, index: int, start: int, length: int) -> torch.Tensor:
        """(S, K, length) int64 tokens of item `index` from frame `start`; only that slice is read from disk."""
        if start < 0 or length < 0 or start + length > self.lengths[index]:
            raise IndexError(f"frames [{start}, {start + length}) outside item {index} of {self.lengths[index]} frames")
        with safe_open(str(self._paths[index]), framework="pt") as handle:
            return handle.get_slice("tokens")[:, :, start : start + length].to(torch.int64)

    def check_codec(self, codec: Codec) -> None:
        """Fail if `codec` would not produce (or decode) these tokens."""
        mismatch = _identity_mismatch(self.codec, codec_identity(codec))
        if mismatch:
            raise CheckpointError(f"token cache {self.directory} was made by another codec ({'; '.join(mismatch)}); re-tokenise with this codec or use its codec")

    def windows(self, window_frames: int, seed: int = 0, num_windows: Optional[int] = None) -> "TokenWindows":
        return TokenWindows(self, window_frames, seed=seed, num_windows=num_windows)


class TokenWindows(torch.utils.data.Dataset):
    """Random fixed-length windows of a TokenCache: `windows[j]` is (S, K, window_frames) int64.

    Window j of epoch e is a pure function of (seed, e, j): any sampler (shuffled, or sharded across ranks by a
    DistributedSampler) gets the same windows for the same indices. Starts are uniform over every valid window
    position of every item, so each frame is equally likely whatever the item lengths. Items shorter than the
    window are left out. `len` defaults to one pass over the data (total frames / window).
    """

    def __init__(self, cache: TokenCache, window_frames: int, seed: int = 0, num_windows: Optional[int] = None):
        if window_frames < 1:
            raise ConfigError(f"window_frames must be >= 1, got {window_frames}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.cache = cache
        self.window_frames = int(window_frames)
        self.seed = int(seed)
        self.epoch = 0
        self.eligible = [i for i, n in enumerate(cache.lengths) if n >= window_frames]
        if not self.eligible:
            longest = max(cache.lengths, default=0)
            raise DataError(
                f"token cache {cache.directory}: no item is as long as a window of {window_frames} frames "
                f"(longest: {longest} frames = {longest / cache.frame_rate:.2f} s); use shorter windows or longer audio"
            )
        counts = [cache.lengths[i] - self.window_frames + 1 for i in self.eligible]
        self._cumulative = np.cumsum(counts).tolist()  # valid start positions up to and including each item
        default = max(1, sum(cache.lengths[i] for i in self.eligible) // self.window_frames)
        self.num_windows = int(num_windows) if num_windows is not None else default

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh set of windows for `epoch` (call it each epoch, like DistributedSampler.set_epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_windows

    def locate(self, index: int) -> tuple[int, int]:
        """(item index, start frame) of window `index` in the current epoch."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        draw = int(rng.integers(self._cumulative[-1]))
        k = bisect.bisect_right(self._cumulative, draw)
        start = draw - (self._cumulative[k - 1] if k else 0)
        return self.eligible[k], start

    def __getitem__(self, index: int) -> torch.Tensor:
        item, start = self.locate(index)
        return self.cache.read(item, start, self.window_frames)  # (S, K, window_frames)


__all__ = [
    "DataConfig",
    "TokenizeConfig",
    "TokenizeResult",
    "TokenCache",
    "TokenWindows",
    "codec_identity",
    "discover",
    "encode_song",
    "item_filename",
    "read_item_meta",
    "tokenize",
    "tokenize_folder",
]
