"""Action sequences: what the world model's LAM says happened, step by step, in real audio.

An action prior is behaviour-cloned on these. Each sequence pairs the LAM's actions with the section each one
leads into:

    mixture waveform (N,) ──LAM──► actions (J,)     a[j] explains patch j → j+1 (patch = `stride` frames)
    per-frame sections (T,) ──────► sections (J,)   s[j] = section of frame (j+1)·stride, the first frame a[j]
                                                    conditions in the dynamics (see `expand_actions`)

Two sources: a synthetic world (clips carry their own sections) and a token cache of real audio (tokens are
decoded with the world model's codec, the stems summed to the mixture, then read by the LAM; a cache carries
no sections, so every step gets one given section).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from melodjinn.world_model.errors import DataError
from melodjinn.world_model.worlds import HOP, SECTIONS, World


@dataclass
class ActionSequences:
    """Variable-length action sequences with their sections. Sequence i has J_i steps."""

    actions: list[torch.Tensor]  # each (J_i,) int64 in [0, num_actions)
    sections: list[torch.Tensor]  # each (J_i,) int64 index into SECTIONS
    num_actions: int
    stride: int  # frames per action step

    def __len__(self) -> int:
        return len(self.actions)

    @property
    def num_steps(self) -> int:
        return sum(len(a) for a in self.actions)

    def counts(self) -> np.ndarray:
        """(A,) how often each action occurs."""
        return np.bincount(torch.cat(self.actions).numpy(), minlength=self.num_actions)


def sections_of_actions(frame_sections: torch.Tensor, num_steps: int, stride: int) -> torch.Tensor:
    """(..., T) per-frame sections → (..., J) the section of the frame each action first conditions."""
    T = frame_sections.shape[-1]
    frames = ((torch.arange(num_steps) + 1) * stride).clamp(max=T - 1)
    return frame_sections[..., frames]


@torch.no_grad()
def world_action_sequences(model, world: World, num_clips: int, batch_size: int = 32, progress: bool = True) -> ActionSequences:
    """The LAM's actions on clips 0..num_clips-1 of `world` (use a world seed the prior never trains on to hold
    out). `model` is a `WorldModel`; the world's stems are mixed as the LAM was trained on mixtures."""
    if num_clips < 1:
        raise DataError(f"need at least one clip to extract action sequences, got {num_clips}")
    device = next(model.lam.parameters()).device
    actions, sections = [], []
    for start in tqdm(range(0, num_clips, batch_size), desc="LAM actions", disable=not progress, leave=False):
        clips = [world.clip(i) for i in range(start, min(num_clips, start + batch_size))]
        mix = torch.from_numpy(np.stack([c.mix for c in clips])).to(device)  # (B, N)
        acts = model.infer_actions(mix).cpu()  # (B, J)
        secs = sections_of_actions(torch.from_numpy(np.stack([c.sections for c in clips])), acts.shape[1], model.stride)
        actions += list(acts.long())
        sections += list(secs.long())
    return ActionSequences(actions, sections, model.num_actions, model.stride)


@torch.no_grad()
def cache_action_sequences(model, cache_dir: str | Path, window_frames: int = 600, section: str = "verse",
                           progress: bool = True) -> ActionSequences:
    """The LAM's actions on every item of a token cache made with the world model's codec, read in windows of
    `window_frames` (bounded memory; the causal LAM starts afresh in each window; a last window shorter than
    two action steps is dropped). Every step gets `section`, since a cache holds no song structure."""
    from melodjinn.world_model.token_cache import TokenCache

    if section not in SECTIONS:
        raise DataError(f"section={section!r} is not one of {', '.join(SECTIONS)}")
    cache = TokenCache(cache_dir)
    cache.check_codec(model.codec)
    min_frames = 2 * model.stride
    if window_frames < min_frames:
        raise DataError(f"window_frames={window_frames} is shorter than two action steps ({min_frames} frames)")
    device = next(model.lam.parameters()).device
    section_id = SECTIONS.index(section)
    actions, sections = [], []
    for item in tqdm(range(len(cache)), desc="LAM actions", disable=not progress, leave=False):
        length = cache.lengths[item]
        for start in range(0, length - min_frames + 1, window_frames):
            n = min(window_frames, length - start)
            tokens = cache.read(item, start, n).to(device)[None]  # (1, S, K, n)
            mix = model.decode(tokens).sum(1)[:, : n * HOP]  # (1, N)
            acts = model.infer_actions(mix)[0].cpu().long()  # (J,)
            actions.append(acts)
            sections.append(torch.full_like(acts, section_id))
    if not actions:
        raise DataError(f"token cache {cache_dir} has no item of at least {min_frames} frames")
    return ActionSequences(actions, sections, model.num_actions, model.stride)
