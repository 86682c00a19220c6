"""Frame-level pitch tracking of a monophonic stem: what the additive codec codes as codebook 0, and what the song
listeners use to hear a new note where the pitch changes.

The pitch of frame t is read from the `window` samples that start at the frame's first sample (a note that starts
on a frame boundary has its pitch from its first frame on) by normalised autocorrelation: for each lag, the
correlation of the window's first part with its part `lag` samples later, divided by both parts' energies, so an
exactly periodic frame scores 1 at its period whatever its level. The period is the shortest lag, past the first
dip below zero (a smooth, dark tone still correlates with itself at short lags), that scores at least 0.9 of the
best; it is climbed to its local peak and refined between samples by a parabola.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from melodjinn.world_model.worlds import HOP, SAMPLE_RATE


def hz(midi: float | torch.Tensor):
    """MIDI note number → frequency (A4 = 69 = 440 Hz)."""
    return 440.0 * 2 ** ((midi - 69) / 12)


@torch.no_grad()
def frame_pitch(audio: torch.Tensor, window: int, midi_range: tuple[float, float], voicing: float,
                floor: float = 1e-7) -> torch.Tensor:
    """(B, N) audio → (B, T) float64 MIDI pitch per frame (fractional), NaN where nothing periodic sounds: the
    best normalised autocorrelation is at most `voicing`, or the window's mean power is at most `floor`.
    T = ceil(N / HOP); `window` must hold two periods of `midi_range`'s lowest note."""
    x = audio.float()
    T = -(-x.shape[-1] // HOP)
    x = F.pad(x, (0, T * HOP - x.shape[-1] + window))
    frames = x.unfold(-1, window, HOP)[:, :T]  # (B, T, W): from each frame's start on
    frames = frames - frames.mean(-1, keepdim=True)
    spec = torch.fft.rfft(frames, 2 * window)
    ac = torch.fft.irfft(spec.abs().square(), 2 * window)[..., :window]  # (B, T, W): Σ_n x[n] x[n + lag]
    energy = torch.cumsum(F.pad(frames.square(), (1, 0)), -1)  # (B, T, W + 1)
    lags = torch.arange(window, device=x.device)
    head = energy[..., window - lags]  # energy of x[0 : W - lag]
    tail = energy[..., window : window + 1] - energy[..., lags]  # of x[lag : W]
    r = ac / (head * tail).clamp_min(1e-12).sqrt()
    lo = int(SAMPLE_RATE / hz(midi_range[1]))
    hi = min(int(math.ceil(SAMPLE_RATE / hz(midi_range[0]))) + 1, window - 1)
    dipped = (r < 0).cumsum(-1) > 0
    scores = torch.where(dipped, r, torch.full_like(r, -1.0))[..., lo:hi]
    best = scores.max(-1).values
    lag = (lo + (scores >= 0.9 * best[..., None]).float().argmax(-1)).clamp(max=hi - 2)
    while True:  # climb to the local peak
        up = (r.gather(-1, (lag + 1)[..., None])[..., 0] > r.gather(-1, lag[..., None])[..., 0]) & (lag + 2 < hi)
        if not up.any():
            break
        lag = lag + up.long()
    a, b, d = (r.gather(-1, (lag + k)[..., None])[..., 0] for k in (-1, 0, 1))
    den = a - 2 * b + d
    curved = den < 0
    shift = torch.where(curved, (0.5 * (a - d) / den.where(curved, torch.ones_like(den))).clamp(-0.5, 0.5), torch.zeros_like(den))
    period = lag.double() + shift.double()
    midi = 69 + 12 * torch.log2(SAMPLE_RATE / period / 440.0)
    voiced = (best > voicing) & (frames.square().mean(-1) > floor)
    return torch.where(voiced, midi, torch.full_like(midi, math.nan))
