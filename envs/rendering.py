"""The `rgb_array` picture of an episode: waveform, spectrogram and the actions taken, on one time axis."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from melodjinn.world_model.worlds import FRAME_RATE, SAMPLE_RATE


def draw_episode(audio: np.ndarray, actions: Sequence[int], prompt_frames: int, frames_per_step: int,
                 num_actions: int, size: tuple[float, float] = (8.0, 4.5), dpi: int = 80) -> np.ndarray:
    """(N,) mix audio starting `prompt_frames` before the first action → (H, W, 3) uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})
    t = np.arange(len(audio)) / SAMPLE_RATE
    start = prompt_frames / FRAME_RATE
    axes[0].plot(t, audio, lw=0.5, color="k")
    axes[0].axvspan(0, start, color="0.9")
    axes[0].set_ylabel("mix")
    if len(audio) >= 512:
        axes[1].specgram(audio, NFFT=512, Fs=SAMPLE_RATE, noverlap=384, cmap="magma")
    axes[1].set_ylabel("Hz")
    if len(actions):
        steps = start + np.arange(len(actions)) * frames_per_step / FRAME_RATE
        axes[2].step(steps, actions, where="post", color="tab:blue")
    axes[2].set_ylim(-0.5, num_actions - 0.5)
    axes[2].set_ylabel("action")
    axes[2].set_xlabel("seconds (grey: prompt)")
    axes[2].set_xlim(0, max(t[-1] if len(t) else 0, start + 0.01))
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
