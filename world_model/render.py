"""`melodjinn render-world world=songs out=DIR`: a synthetic world's clips as WAV files plus their labels.

Layout of DIR:
    world.json              the world config, seed, clip count, audio constants, code version (written last)
    clip_000/<stem>.wav     one 24 kHz mono float WAV per stem
    clip_000/mix.wav        the sum of the stems
    clip_000/labels.json    per-frame ground truth (see `clip_labels`)

The files hold exactly what `world.clip(i)` returns, except that a clip whose mix would reach full scale is
scaled down as a whole (stems and mix alike, so the mix stays the sum of the stems); `scale` in its labels
says by how much. Every file is written to a temporary name and renamed, so an interrupted run leaves no
torn file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from melodjinn.world_model.artifacts import atomic_path, code_version, write_json
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.runtime import as_plain_dict
from melodjinn.world_model.song_world import section_runs
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, SECTIONS, Clip, World, make_world

PEAK = 0.999  # largest absolute sample written; float WAVs do not clip, but players and converters do


def render_world(cfg: DictConfig) -> Path:
    """Write clips 0..clips-1 of `cfg.world` under `cfg.seed` to `cfg.out`. Returns the output directory."""
    if OmegaConf.is_missing(cfg, "out") or not str(cfg.out).strip():
        raise ConfigError("out is required: melodjinn render-world world=songs out=DIR")
    clips = int(cfg.clips)
    if clips < 0:
        raise ConfigError(f"clips={clips}: must be >= 0")
    world = make_world(cfg.world, seed=int(cfg.seed))
    out = render_clips(world, cfg.out, clips)
    print(f"render-world: wrote {clips} clip(s) of world {world.name!r} (seed {world.seed}) to {out.resolve()}")
    return out


def render_clips(world: World, out: str | Path, clips: int) -> Path:
    """Write clips 0..clips-1 of an already built world and its `world.json` (last: it marks completeness)."""
    out = Path(out)
    for index in tqdm(range(clips), desc=f"render {world.name}", unit="clip", leave=False, disable=clips < 2):
        write_clip(out / f"clip_{index:03d}", world.clip(index), world_name=world.name, seed=world.seed, index=index)
    write_json(
        out / "world.json",
        {
            "world": as_plain_dict(world.config),  # type: ignore[attr-defined]
            "seed": world.seed,
            "clips": clips,
            "clip_dirs": [f"clip_{i:03d}" for i in range(clips)],
            "stem_names": list(world.stem_names),
            "sample_rate": SAMPLE_RATE,
            "hop": HOP,
            "frame_rate": FRAME_RATE,
            "code": code_version(),
        },
    )
    return out


def write_clip(directory: Path, clip: Clip, world_name: str = "", seed: int = 0, index: int = 0) -> dict[str, Any]:
    """Write one clip's stems, mix and labels to `directory`. Returns the labels written."""
    directory = Path(directory)
    stems = clip.stems
    peak = float(np.max(np.abs(clip.mix))) if stems.size else 0.0
    scale = PEAK / peak if peak > PEAK else 1.0
    if scale != 1.0:
        stems = (stems * np.float32(scale)).astype(np.float32)
    mix = stems.sum(axis=0).astype(np.float32)  # the same reduction as Clip.mix, so mix.wav == sum of stem WAVs
    for name, audio in zip(clip.stem_names, stems):
        write_wav(directory / f"{name}.wav", audio)
    write_wav(directory / "mix.wav", mix)
    labels = clip_labels(clip, scale=scale)
    labels.update({"world": world_name, "seed": seed, "index": index})
    with atomic_path(directory / "labels.json") as tmp:
        tmp.write_text(_labels_json(labels))
    return labels


def write_wav(path: Path, audio: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        # float32 WAV keeps the samples bit-exact with world.clip(); the temp name has no .wav, so say the format
        sf.write(str(tmp), np.asarray(audio, dtype=np.float32), SAMPLE_RATE, subtype="FLOAT", format="WAV")


def clip_labels(clip: Clip, scale: float = 1.0) -> dict[str, Any]:
    """A clip's per-frame ground truth as plain JSON data.

    Arrays with one row per stem become {stem: [per-frame values]}; per-frame arrays stay lists. `rms` is
    multiplied by `scale` so it describes the written audio; every other label is unaffected by scaling.
    """
    names = list(clip.stem_names)
    runs = [{"section": SECTIONS[k], "start": a, "frames": b - a} for k, a, b in section_runs(clip.sections)]
    extra: dict[str, Any] = {}
    for key, value in clip.extra.items():
        value = np.asarray(value)
        if key == "rms":
            value = value * scale
        if value.ndim == 2 and value.shape[0] == len(names):
            extra[key] = {n: _plain(row) for n, row in zip(names, value)}
        else:
            extra[key] = _plain(value)
    return {
        "sample_rate": SAMPLE_RATE,
        "hop": HOP,
        "frame_rate": FRAME_RATE,
        "num_frames": clip.num_frames,
        "num_samples": int(clip.stems.shape[-1]),
        "stem_names": names,
        "section_names": list(SECTIONS),
        "sections": clip.sections.astype(int).tolist(),
        "section_runs": runs,
        "events": {n: row.astype(int).tolist() for n, row in zip(names, clip.events)},
        "event_names": {n: list(ev) for n, ev in zip(names, clip.event_names)},
        "extra": extra,
        "scale": scale,
    }


def _labels_json(labels: dict[str, Any]) -> str:
    """Indented JSON with each per-frame list on one line: one value per line would run to tens of thousands."""
    text = json.dumps(labels, indent=2)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def _plain(values: np.ndarray) -> list:
    if np.issubdtype(values.dtype, np.floating):
        return np.round(values.astype(np.float64), 6).tolist()
    return values.astype(int).tolist()

