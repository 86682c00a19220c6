"""`melodjinn plot-actions`: the view that exposes misaligned or ignored actions.

Three rows on one time axis: a held-out clip's waveform with its true onsets, the LAM's actions beneath it, and
the dynamics' re-generation of the clip from those actions alone (prompted with a short context). If the actions
were shifted by a frame, the regenerated hits would sit one frame off the original ones; if the dynamics ignored
them, the regeneration would not follow the original at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from melodjinn.world_model.artifacts import atomic_path
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.runtime import resolve_device
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, make_world

IMAGE_FORMATS = ("png", "pdf", "svg")


def plot_actions(cfg: DictConfig) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(cfg.out)
    image_format = path.suffix.lstrip(".").lower() or "png"
    if image_format not in IMAGE_FORMATS:
        raise ConfigError(f"out={cfg.out}: plot-actions writes {', '.join('.' + f for f in IMAGE_FORMATS)} images; "
                          "give the file one of those suffixes")
    if int(cfg.clip) < 0:
        raise ConfigError(f"clip={cfg.clip}: the held-out clip index must be 0 or more")
    device = resolve_device(cfg.device)
    model = WorldModel.load(cfg.checkpoint, device=device)
    world = make_world(model.world, seed=int(cfg.eval_seed))
    data = build_world_tensors(world, model.codec, int(cfg.clip) + 1, progress=False).batch(torch.tensor([int(cfg.clip)]))
    T = data.tokens.shape[-1]
    P = int(cfg.prompt_frames)
    if not 1 <= P < T:
        raise ConfigError(f"prompt_frames={P}: give 1 to {T - 1}, fewer than the clip's {T} frames")
    actions = model.infer_actions(data.mix.to(device))  # (1, J)
    frame_actions = model.frame_actions(actions, T)
    out = model.generate(data.tokens[..., :P].to(device), T - P, frame_actions, data.sections.to(device),
                         temperature=float(cfg.temperature), generator=torch.Generator().manual_seed(int(cfg.seed)), decode=True)
    regenerated = out["audio"].sum(1)[0].cpu().numpy()
    original = data.mix[0].numpy()
    t_audio = np.arange(len(original)) / SAMPLE_RATE
    events = data.events[0].sum(0).numpy()  # (T,) any stem's onset label

    fig, axes = plt.subplots(3, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1, 2]})
    axes[0].plot(t_audio, original, lw=0.5, color="k")
    for f in np.flatnonzero(events):
        axes[0].axvline(f / FRAME_RATE, color="tab:red", lw=0.8, alpha=0.6)
        axes[0].text(f / FRAME_RATE, 0.95 * np.abs(original).max(), str(int(events[f])), color="tab:red", fontsize=7)
    axes[0].set_ylabel("original")
    axes[0].set_title(f"{Path(str(cfg.checkpoint)).name}: held-out clip {cfg.clip} (seed {cfg.eval_seed}); red = true onsets (label)")
    # action j explains patch j → j+1, so it is drawn over the patch it announces
    a = actions[0].cpu().numpy()
    starts = (np.arange(len(a)) + 1) * model.stride / FRAME_RATE
    axes[1].step(starts, a, where="post", color="tab:blue")
    axes[1].set_ylabel("LAM action")
    axes[1].set_yticks(range(model.num_actions))
    axes[2].plot(t_audio[: len(regenerated)], regenerated, lw=0.5, color="tab:green")
    axes[2].axvspan(0, P * HOP / SAMPLE_RATE, color="0.9")
    for f in np.flatnonzero(events):
        axes[2].axvline(f / FRAME_RATE, color="tab:red", lw=0.8, alpha=0.4)
    axes[2].set_ylabel("regenerated\nfrom actions")
    axes[2].set_xlabel("seconds (grey: prompt)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=image_format, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return str(path)
