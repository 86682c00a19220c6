"""Drum-hit detection on drum-world audio, and event F1 against per-frame ground truth.

The detector knows the world's kit (the one-shot waveform of every drum) and explains the audio as a sum of
those sounds started at frame boundaries: a non-negative deconvolution of the frame-aligned band spectrogram
with the kit's spectrogram templates (NMFD with fixed templates, KL divergence, multiplicative updates). Peaks
of each drum's activation are its hits. Working on band magnitudes rather than waveforms keeps it indifferent
to the phase and noise details a codec does not preserve, and the deconvolution lets a new hit be told apart
from the decay of an earlier one.

    detector = DrumHitDetector.for_world(world)
    labels = detector.detect(audio)            # (N,) → (T,) with 0 = none, d + 1 = drum d starts
    event_f1(labels, clip.events[0])           # one-to-one matching, same label, ±1 frame

Everything here is deterministic and works on numpy arrays or torch tensors, batched or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from melodjinn.world_model.errors import DataError

SAMPLE_RATE = 24_000
HOP = 320


@dataclass
class DetectorConfig:
    num_bands: int = 48  # log-spaced bands between f_min and the Nyquist frequency
    f_min: float = 40.0
    template_frames: int = 24  # how much of each sound's spectrogram the templates keep (0.32 s)
    iterations: int = 60  # multiplicative-update iterations of the deconvolution
    threshold: float = 0.3  # activation (≈ hit gain; the world draws gains in [0.6, 1]) needed for a hit
    min_gap_frames: int = 2  # two hits closer than this are one hit (the stronger one); the world's own spacing


def _band_matrix(num_bands: int, f_min: float, n_fft: int) -> torch.Tensor:
    """(num_bands, n_fft // 2 + 1) triangular filters with log-spaced centres; every band spans ≥ one bin."""
    freqs = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
    edges = np.geomspace(f_min, SAMPLE_RATE / 2, num_bands + 2)
    bank = np.zeros((num_bands, len(freqs)))
    bin_width = freqs[1]
    for b in range(num_bands):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        lo, hi = min(lo, mid - bin_width), max(hi, mid + bin_width)  # narrow low bands still catch a bin
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        bank[b] = np.clip(np.minimum(up, down), 0, None)
    bank /= bank.sum(axis=1, keepdims=True)
    return torch.tensor(bank, dtype=torch.float32)


class DrumHitDetector:
    """Per-frame drum onsets for audio made of a known kit of one-shot sounds."""

    def __init__(self, sounds: Sequence[np.ndarray], config: DetectorConfig | None = None):
        if len(sounds) == 0:
            raise DataError("DrumHitDetector needs at least one drum sound")
        self.config = config or DetectorConfig()
        c = self.config
        self.n_fft = 512
        # Window over exactly one frame's samples: a hit starting at frame t then shows in frames >= t only,
        # so the templates need no negative lags. A short taper keeps the attack (at the frame start) visible.
        window = np.ones(HOP)
        taper = 16
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(taper) / taper)
        window[:taper], window[-taper:] = ramp, ramp[::-1]
        self.window = torch.tensor(window, dtype=torch.float32)
        self.bands = _band_matrix(c.num_bands, c.f_min, self.n_fft)  # (F, n_fft // 2 + 1)
        templates = []
        for sound in sounds:
            sound = np.asarray(sound, dtype=np.float32)[: c.template_frames * HOP]
            padded = np.zeros(c.template_frames * HOP, dtype=np.float32)
            padded[: len(sound)] = sound
            templates.append(self.features(torch.from_numpy(padded)[None])[0])  # (F, L)
        self.templates = torch.stack(templates, dim=1)  # (F, D, L)
        self.num_drums = len(sounds)
        self._floor = 1e-6

    @classmethod
    def for_world(cls, world: Any, config: DetectorConfig | None = None) -> "DrumHitDetector":
        """The detector for a drum world's kit (anything with a `.sounds` list of one-shot waveforms)."""
        sounds = getattr(world, "sounds", None)
        if sounds is None:
            raise DataError(f"{type(world).__name__} has no drum kit (.sounds); the hit detector works on the drum world")
        config = config or DetectorConfig()
        gap = getattr(getattr(world, "config", None), "min_gap_frames", None)
        if gap is not None:
            config = DetectorConfig(**{**config.__dict__, "min_gap_frames": int(gap)})
        return cls(sounds, config)

    # features -----------------------------------------------------------------------------------------------

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, N) → (B, F, T) band magnitudes of each frame's own samples, T = ceil(N / hop)."""
        n = audio.shape[-1]
        frames = -(-n // HOP)
        audio = F.pad(audio, (0, frames * HOP - n))
        chunks = audio.reshape(audio.shape[0], frames, HOP) * self.window  # (B, T, hop)
        spec = torch.fft.rfft(chunks, n=self.n_fft).abs()  # (B, T, n_fft // 2 + 1)
        return torch.einsum("fk,btk->bft", self.bands, spec)

    def _reconstruct(self, act: torch.Tensor) -> torch.Tensor:
        """(B, D, T) activations → (B, F, T) modelled spectrogram: Σ_d Σ_τ W[f, d, τ] act[d, t - τ]."""
        L = self.templates.shape[-1]
        return F.conv1d(F.pad(act, (L - 1, 0)), self.templates.flip(-1))

    def _correlate(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F, T) → (B, D, T): Σ_f Σ_τ W[f, d, τ] x[f, t + τ] (the transpose of `_reconstruct`)."""
        L = self.templates.shape[-1]
        return F.conv1d(F.pad(x, (0, L - 1)), self.templates.transpose(0, 1))

    # detection ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def activations(self, audio: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N,) or (B, N) audio → (B, D, T) non-negative drum activations (≈ the gain of a hit starting there)."""
        x = _as_batch(audio)
        V = self.features(x) + self._floor  # (B, F, T)
        norm = self._correlate(torch.ones_like(V))  # (B, D, T), Σ W over the frames each start can explain
        act = torch.full((x.shape[0], self.num_drums, V.shape[-1]), 0.1)
        for _ in range(self.config.iterations):
            model = self._reconstruct(act) + self._floor
            act = act * self._correlate(V / model) / norm
        return act

    @torch.no_grad()
    def detect(self, audio: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) → (T,) or (B, N) → (B, T) int64 labels: 0 = no hit starts, d + 1 = drum d starts in that frame."""
        batched = _ndim(audio) >= 2
        act = self.activations(audio)
        labels = np.stack([self._pick(a.numpy()) for a in act])
        return labels if batched else labels[0]

    @torch.no_grad()
    def hit_strengths(self, audio: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(N,) → labels (T,) as `detect` gives them, and each detected hit's strength (T,): its activation (≈ the
        gain it was played at; 0 where no hit starts)."""
        act = self.activations(audio)[0].numpy()  # (D, T)
        labels = self._pick(act)
        strength = np.where(labels > 0, act[np.maximum(labels - 1, 0), np.arange(len(labels))], 0.0)
        return labels, strength

    def _pick(self, act: np.ndarray) -> np.ndarray:
        """(D, T) activations → (T,) labels: strongest hits first, none closer than min_gap_frames to a kept one."""
        c = self.config
        D, T = act.shape
        # A codec can smear one hit's activation over two neighbouring frames; score a start by the sum over
        # the frame and its neighbours, but place it at the frame holding the largest share.
        padded = np.pad(act, ((0, 0), (1, 1)))
        pooled = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
        is_peak = (act >= padded[:, :-2]) & (act > padded[:, 2:])
        cand = np.argwhere(is_peak & (pooled >= c.threshold))
        order = np.argsort(-pooled[cand[:, 0], cand[:, 1]], kind="stable")
        labels = np.zeros(T, dtype=np.int64)
        taken = np.zeros(T, dtype=bool)
        gap = max(1, c.min_gap_frames)
        for d, t in cand[order]:
            lo, hi = max(0, t - gap + 1), min(T, t + gap)
            if taken[lo:hi].any():
                continue
            labels[t] = d + 1
            taken[t] = True
        return labels


def detect_hits(audio: np.ndarray | torch.Tensor, world: Any, config: DetectorConfig | None = None) -> np.ndarray:
    """Shortcut: `DrumHitDetector.for_world(world).detect(audio)`."""
    return DrumHitDetector.for_world(world, config).detect(audio)


# --------------------------------------------------------------------------------------------------------------
# scoring


def event_counts(pred: np.ndarray, true: np.ndarray, tolerance_frames: int = 1) -> dict[str, int]:
    """True positives, false positives and false negatives of per-frame event labels (T,) or (B, T).

    A predicted event matches a true event with the same label at most `tolerance_frames` away; each event
    matches at most once. Per label, pairing in time order is a maximum matching (all tolerance windows
    have the same width), so no search is needed.
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise DataError(f"event labels differ in shape: predicted {pred.shape}, true {true.shape}")
    if tolerance_frames < 0:
        raise DataError(f"tolerance_frames must be >= 0, got {tolerance_frames}")
    pred, true = pred.reshape(-1, pred.shape[-1]), true.reshape(-1, true.shape[-1])
    tp = fp = fn = 0
    for p_row, t_row in zip(pred, true):
        for label in np.union1d(np.unique(p_row[p_row != 0]), np.unique(t_row[t_row != 0])):
            p_times = np.flatnonzero(p_row == label)
            t_times = np.flatnonzero(t_row == label)
            i = j = matched = 0
            while i < len(p_times) and j < len(t_times):
                if abs(int(p_times[i]) - int(t_times[j])) <= tolerance_frames:
                    matched += 1
                    i += 1
                    j += 1
                elif p_times[i] < t_times[j]:
                    i += 1
                else:
                    j += 1
            tp += matched
            fp += len(p_times) - matched
            fn += len(t_times) - matched
    return {"tp": tp, "fp": fp, "fn": fn}


def event_scores(pred: np.ndarray, true: np.ndarray, tolerance_frames: int = 1) -> dict[str, float]:
    """Precision, recall and F1 over all events (micro-averaged); no events at all on either side scores 1."""
    n = event_counts(pred, true, tolerance_frames)
    tp, fp, fn = n["tp"], n["fp"], n["fn"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0
    return {"precision": precision, "recall": recall, "f1": f1, **{k: float(v) for k, v in n.items()}}


def event_f1(pred: np.ndarray, true: np.ndarray, tolerance_frames: int = 1) -> float:
    """F1 of predicted vs true per-frame event labels (T,) or (B, T), one-to-one, same label, ± tolerance."""
    return event_scores(pred, true, tolerance_frames)["f1"]


# --------------------------------------------------------------------------------------------------------------


def _ndim(audio: Any) -> int:
    return audio.dim() if isinstance(audio, torch.Tensor) else np.ndim(audio)


def _as_batch(audio: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = audio.detach().cpu().float() if isinstance(audio, torch.Tensor) else torch.as_tensor(np.asarray(audio, dtype=np.float32))
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]  # (B, 1, N) codec output
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[-1] == 0:
        raise DataError(f"hit detection expects audio of shape (N,) or (B, N), got {tuple(x.shape)}")
    return x
