"""Training data for the world model from a synthetic world: mixtures, per-stem codec tokens, ground truth.

Clips are rendered and encoded once per (world, seed, codec) and cached as one safetensors file, so training
steps only index tensors. Rendering and codec encoding are deterministic, so the cache is an optimisation,
never a source of difference between runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from melodjinn.world_model.artifacts import load_tensors, save_tensors
from melodjinn.world_model.codec import Codec, codec_info
from melodjinn.world_model.worlds import World


@dataclass
class WorldTensors:
    """N clips of a world as tensors. T frames of HOP samples each; S stems; K codebooks."""

    mix: torch.Tensor  # (N, T * HOP) float32 mixture waveform
    tokens: torch.Tensor  # (N, S, K, T) int64 per-stem codec tokens
    sections: torch.Tensor  # (N, T) int64
    events: torch.Tensor  # (N, S, T) int64 ground-truth onsets per stem

    def __len__(self) -> int:
        return self.mix.shape[0]

    def batch(self, index: torch.Tensor) -> "WorldTensors":
        return WorldTensors(self.mix[index], self.tokens[index], self.sections[index], self.events[index])

    def to(self, device: torch.device) -> "WorldTensors":
        """On a CUDA device through pinned host memory, so the copies run asynchronously beside compute."""
        if device.type != "cuda":
            return WorldTensors(self.mix.to(device), self.tokens.to(device), self.sections.to(device), self.events.to(device))
        return WorldTensors(*(t.pin_memory().to(device, non_blocking=True) for t in (self.mix, self.tokens, self.sections, self.events)))


@torch.no_grad()
def encode_stems(codec: Codec, stems: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, S, N) stem waveforms → (B, S, K, T) tokens, every stem encoded on its own."""
    B, S, N = stems.shape
    codes = codec.encode(stems.reshape(B * S, 1, N))[..., :num_frames]  # (B·S, K, T)
    return codes.reshape(B, S, codes.shape[1], codes.shape[2])


def build_world_tensors(world: World, codec: Codec, num_clips: int, encode_batch: int = 32, progress: bool = True) -> WorldTensors:
    mixes, tokens, sections, events = [], [], [], []
    for start in tqdm(range(0, num_clips, encode_batch), desc=f"encoding {world.name} clips", disable=not progress, leave=False):
        clips = [world.clip(i) for i in range(start, min(num_clips, start + encode_batch))]
        stems = torch.from_numpy(np.stack([c.stems for c in clips]))  # (B, S, N)
        T = clips[0].num_frames
        tokens.append(encode_stems(codec, stems, T).to(torch.int16))
        mixes.append(stems.sum(1))
        sections.append(torch.from_numpy(np.stack([c.sections for c in clips])))
        events.append(torch.from_numpy(np.stack([c.events for c in clips])))
    return WorldTensors(torch.cat(mixes), torch.cat(tokens).long(), torch.cat(sections), torch.cat(events))


def cached_world_tensors(world: World, codec: Codec, num_clips: int, cache_dir: str | Path | None, world_config: dict) -> WorldTensors:
    """`build_world_tensors`, cached in `cache_dir` under a key of (world config, seed, codec, count)."""
    if cache_dir is None:
        return build_world_tensors(world, codec, num_clips)
    key_data = {"world": world_config, "seed": world.seed, "codec": codec_info(codec), "clips": num_clips}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"world-{world.name}-{key}.safetensors"
    if path.exists():
        t = load_tensors(path)
        return WorldTensors(t["mix"], t["tokens"].long(), t["sections"], t["events"])
    data = build_world_tensors(world, codec, num_clips)
    save_tensors(path, {"mix": data.mix, "tokens": data.tokens.to(torch.int16), "sections": data.sections, "events": data.events})
    return data
