"""Synthetic worlds: deterministic audio with per-frame ground truth.

A world is an indexed, infinite collection of clips. Clip `i` of a world built with seed `s` is a pure function
of (config, s, i), so the train split (seed 0) and a held-out split (any other seed) never share a clip and
every run sees the same data.

Shared conventions (DESIGN.md §3): 24 kHz mono stems, hop 320 samples → 75 frames/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SAMPLE_RATE = 24_000
HOP = 320
FRAME_RATE = SAMPLE_RATE / HOP  # 75 frames per second

SECTIONS = ("intro", "verse", "chorus", "bridge", "outro")
SECTION_INDEX = {name: i for i, name in enumerate(SECTIONS)}

NO_EVENT = 0  # event label 0 is "nothing starts in this frame"


@dataclass
class Clip:
    """One clip of a world with its ground truth. N = num_frames * HOP samples."""

    stems: np.ndarray  # (S, N) float32, one row per stem
    events: np.ndarray  # (S, T) int64, per stem per frame: 0 = no onset, e > 0 = event e starts in this frame
    sections: np.ndarray  # (T,) int64, index into SECTIONS
    stem_names: tuple[str, ...]
    event_names: tuple[tuple[str, ...], ...]  # per stem, name of event e (index 0 is "none")
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # world-specific per-frame labels, each (.., T)

    @property
    def mix(self) -> np.ndarray:
        """(N,) float32 mixture of all stems."""
        return self.stems.sum(axis=0).astype(np.float32)

    @property
    def num_frames(self) -> int:
        return int(self.events.shape[-1])


class World(Protocol):
    name: str
    stem_names: tuple[str, ...]
    seed: int

    def clip(self, index: int) -> Clip: ...

    @property
    def clip_frames(self) -> int: ...


def clip_rng(world_name: str, seed: int, index: int) -> np.random.Generator:
    """Independent random stream for clip `index` of world `world_name` under `seed`."""
    tag = sum(ord(c) * 131**i for i, c in enumerate(world_name)) % 2**31
    return np.random.default_rng([seed, index, tag])


def make_world(cfg, seed: int = 0) -> World:
    """Build the world a `world` config node names (`name: drums` or `name: songs`)."""
    from melodjinn.world_model.errors import ConfigError

    name = cfg["name"] if not hasattr(cfg, "name") else cfg.name
    if name == "drums":
        from melodjinn.world_model.drum_world import DrumWorld, DrumWorldConfig
        from melodjinn.world_model.runtime import to_dataclass

        return DrumWorld(to_dataclass(DrumWorldConfig, cfg, "world"), seed=seed)
    if name == "songs":
        from melodjinn.world_model.runtime import to_dataclass
        from melodjinn.world_model.song_world import SongWorld, SongWorldConfig

        return SongWorld(to_dataclass(SongWorldConfig, cfg, "world"), seed=seed)
    raise ConfigError(f"world.name={name!r} is not a synthetic world; use drums or songs")
