"""Codecs: waveform [B, 1, N] ⇄ discrete codes [B, K, T].

Two implementations share the `Codec` interface:
- `EncodecCodec`: pretrained EnCodec 24 kHz (the `encodec` package) from a local checkpoint file;
- `TinyCodec`: the same encodec building blocks at small width, trained by this project (`train-codec`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Codec(Protocol):
    sample_rate: int  # 24_000
    frame_rate: float  # 75.0 (hop 320)
    num_codebooks: int  # K
    codebook_size: int  # V

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) float → (B, K, T) int64 codes, T = ceil(N / hop)."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, T) int64 → (B, 1, T * hop) float waveform."""
        ...
