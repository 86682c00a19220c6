"""The additive codec: codes that hold still while a tone holds, because neither side of it sees the phase.

A waveform codec (`TinyCodec`) must encode where a held tone's waveform is in its cycle, and that phase advances
by a non-integer number of periods per frame, so a held bass note's codes walk through many values and a token
model has to predict the walk (README, "Song world"). This codec is phase-free by construction:

    audio (B, 1, N) ─┬─ pitch tracker ──────────────────────────────► codebook 0: MIDI pitch per frame (0 = none)
                     └─ magnitude spectra ─► encoder ─► residual VQ ─► codebooks 1 .. K-1: timbre, level, noise
    codes ─► decoder ─► per frame: harmonic amplitudes, noise-band gains, an attack shape ─► synthesis ─► audio

- **Codebook 0 is the pitch**: the frame's fundamental by normalised autocorrelation over the `pitch_window`
  samples from the frame's start (so a note that starts on a frame boundary has its pitch from its first frame),
  rounded to the nearest MIDI note; 0 where nothing periodic sounds. A held note is one code. A learned quantiser
  could not be trusted with this: with magnitude losses, a sinusoid one semitone off a bass note sits in the same
  STFT bin, and training settles on wrong pitches (measured: a free fit of a quarter-tone sinusoid bank to one bass
  clip found the right fundamental in 1 of 9 frames).
- **Codebooks 1 .. K-1**: a residual VQ of a latent the encoder computes from log-magnitude STFT columns centred on
  each frame (a long window for harmonics, a short one for attacks). It looks half a long window ahead; encoding
  is offline (tokenising clips and prompts), so nothing needs it causal. The short window (256 samples) is shorter
  than a bass period, so its magnitudes follow a low note's phase a little; averaging its power over `short_hops`
  positions across the frame smooths that out, and these codebooks then hold almost still on held notes (README,
  "Song world": steadier codes did not make a better song model there).
- **Decoder** (causal convolutions over frames, so it streams: `carry`): per frame, the amplitudes of `harmonics` harmonics of the frame's
  pitch, the gains of `noise_bands` fixed band-limited noises (drums, breath), and an attack shape g in (0, 1):
  within frame t every amplitude moves from its frame t-1 value to its frame t value as `g + (1 - g) · ramp` — a
  step at the frame start (a note or hit starting on the boundary) or a linear ramp.
- **Synthesis**: harmonic h of pitch p at frame t is sin(2π h f_p n / sr) with n the absolute sample index, so a
  held note is one continuous sinusoid per harmonic whatever the other codes do; a code that changes only moves
  amplitudes. Across a pitch change the old pitch's harmonics fade out as the new ones fade in (the attack shape).
  The noises are a seeded buffer, so decoding is deterministic.

Reconstruction is scored on magnitudes only (multi-resolution STFT): the decoder's phases are its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melodjinn.world_model.codec import HOP, SAMPLE_RATE, TrainedCodec, _check_codes, _check_waveform
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.pitch import frame_pitch, hz

UNVOICED = 0  # codebook-0 code of a frame without a pitch


@dataclass
class AdditiveCodecConfig:
    """Architecture of the additive codec (stored in its config.json; the code must agree with it to load)."""

    long_fft: int = 2048  # encoder's long window: resolves harmonics 12 Hz apart (a bass note's)
    long_max_hz: float = 8000.0  # long-window bins kept up to here
    short_fft: int = 256  # encoder's short window: places attacks within a frame
    short_hops: int = 1  # short-window positions per frame whose power is averaged (5: smooths out a low note's phase)
    hidden: int = 192  # width of encoder and decoder
    encoder_layers: int = 3  # residual convolution blocks (dilations 1, 2, 4, ...)
    decoder_layers: int = 3
    dimension: int = 32  # latent (and codebook vector) dimension
    harmonics: int = 48  # harmonics of the frame's pitch the decoder drives (those above 11 kHz stay silent)
    noise_bands: int = 32  # log-spaced noise bands from noise_min_hz to 12 kHz (drums)
    noise_min_hz: float = 60.0
    pitch_window: int = 1024  # samples from the frame's start the pitch tracker looks at (2 periods of 47 Hz)
    pitch_min_midi: int = 31  # the tracker's range (MIDI; 31 = 49 Hz, the song world's lowest bass); a pitch outside it is coded as the nearest end
    pitch_max_midi: int = 100
    voicing: float = 0.7  # normalised autocorrelation a frame needs to have a pitch
    num_codebooks: int = 4  # K: the pitch codebook and K - 1 residual VQ codebooks
    codebook_size: int = 128  # V (≥ 128: the pitch codebook holds MIDI notes 1-127)
    ema_decay: float = 0.95
    kmeans_iters: int = 10
    dead_code_threshold: float = 0.5

    def validate(self) -> "AdditiveCodecConfig":
        if self.short_hops < 1 or HOP % self.short_hops:
            raise ConfigError(f"codec short_hops={self.short_hops}: must divide the hop {HOP}")
        short_hop = HOP // self.short_hops
        if self.long_fft < HOP or (self.long_fft - HOP) % 2 or (self.short_fft - short_hop) % 2 or self.short_fft < 16:
            raise ConfigError(f"codec long_fft={self.long_fft}, short_fft={self.short_fft}: need long_fft >= {HOP}, "
                              f"long_fft of the parity of the hop {HOP} and short_fft of the parity of hop / short_hops "
                              f"({short_hop}), so that every window centres on its frame (or sub-frame)")
        if not 0 < self.pitch_min_midi < self.pitch_max_midi < 128:
            raise ConfigError(f"codec pitch_min_midi={self.pitch_min_midi}, pitch_max_midi={self.pitch_max_midi}: "
                              "need 0 < min < max < 128")
        longest_period = SAMPLE_RATE / hz(self.pitch_min_midi)
        if self.pitch_window < 2 * longest_period:
            raise ConfigError(f"codec pitch_window={self.pitch_window} holds fewer than two periods of MIDI "
                              f"{self.pitch_min_midi} ({longest_period:.0f} samples each); raise it or pitch_min_midi")
        if self.num_codebooks < 2 or self.codebook_size < 128:
            raise ConfigError("the additive codec needs num_codebooks >= 2 (pitch + residual VQ) and codebook_size >= 128")
        if min(self.harmonics, self.noise_bands, self.hidden, self.dimension) < 1:
            raise ConfigError("codec harmonics, noise_bands, hidden and dimension must be >= 1")
        if not 0.0 < self.voicing < 1.0 or not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"codec voicing={self.voicing}, ema_decay={self.ema_decay}: both must be in (0, 1)")
        return self


class _CausalConv(nn.Conv1d):
    @property
    def reach(self) -> int:
        """Past inputs each output sees."""
        return (self.kernel_size[0] - 1) * self.dilation[0]

    def forward(self, x: torch.Tensor, past: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, T); past (B, C, reach) the inputs before x (None: silence) → (B, C', T)."""
        return super().forward(F.pad(x, (self.reach, 0)) if past is None else torch.cat([past, x], -1))


class _ResidualStack(nn.Module):
    """x + point(gelu(conv(gelu(x)))) per block, kernel 3, dilations 1, 2, 4, ... (causal or centred)."""

    def __init__(self, width: int, layers: int, causal: bool):
        super().__init__()

        def conv(d: int) -> nn.Conv1d:
            return _CausalConv(width, width, 3, dilation=d) if causal else nn.Conv1d(width, width, 3, dilation=d, padding=d)

        self.blocks = nn.ModuleList(nn.ModuleList([conv(2**i), nn.Conv1d(width, width, 1)]) for i in range(layers))

    def forward(self, x: torch.Tensor, carry: dict | None = None) -> torch.Tensor:
        """`carry` (causal stacks): each convolution's last inputs from the previous call, read and replaced, so a
        sequence fed in parts gives the outputs of one call on the whole."""
        for i, (wide, point) in enumerate(self.blocks):
            h = F.gelu(x)
            if carry is None:
                y = wide(h)
            else:
                past = carry.get(i, h.new_zeros(h.shape[0], h.shape[1], wide.reach))
                y = wide(h, past)
                carry[i] = torch.cat([past, h], -1)[..., h.shape[-1] :]
            x = x + point(F.gelu(y))
        return x


class AdditiveCodec(TrainedCodec):
    """Pitch code + residual VQ of magnitude features; a decoder driving harmonics of that pitch and noise bands."""

    name = "additive"
    config_class = AdditiveCodecConfig

    def __init__(self, config: AdditiveCodecConfig | None = None):
        super().__init__((config or AdditiveCodecConfig()).validate())
        c = self.config
        self.long_bins = int(c.long_max_hz / (SAMPLE_RATE / c.long_fft)) + 1
        self.register_buffer("long_window", torch.hann_window(c.long_fft), persistent=False)
        self.register_buffer("short_window", torch.hann_window(c.short_fft), persistent=False)
        self.encoder = nn.Sequential(nn.Conv1d(self.long_bins + c.short_fft // 2 + 1, c.hidden, 1),
                                     _ResidualStack(c.hidden, c.encoder_layers, causal=False), nn.GELU(),
                                     nn.Conv1d(c.hidden, c.dimension, 1))
        self.pitch_embedding = nn.Embedding(c.codebook_size, c.hidden)
        self.decoder_in = nn.Conv1d(c.dimension, c.hidden, 1)
        self.decoder = _ResidualStack(c.hidden, c.decoder_layers, causal=True)
        self.head = nn.Conv1d(c.hidden, c.harmonics + c.noise_bands + 1, 1)
        with torch.no_grad():  # start quiet: levels sigmoid(-3)^2.3 ≈ 1e-3
            self.head.bias[:-1].fill_(-3.0)
        self._build_quantizer(c.num_codebooks - 1)
        self.register_buffer("noise", _band_noises(c.noise_bands, c.noise_min_hz), persistent=False)  # (nb, L)
        self.register_buffer("ramp", (torch.arange(HOP) + 1.0) / HOP, persistent=False)

    # analysis -----------------------------------------------------------------------------------------------------

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) → (B, D, T) encoder outputs before quantisation, T = ceil(N / HOP)."""
        x = _whole_frames(waveform[:, 0])
        c = self.config
        long = _log_magnitude(x, c.long_fft, self.long_window)[:, : self.long_bins]  # (B, F1, T)
        short = _log_magnitude(x, c.short_fft, self.short_window, c.short_hops)  # (B, F2, T)
        return self.encoder(torch.cat([long, short], 1))

    @torch.no_grad()
    def track_pitch(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) → (B, T) int64 codebook-0 codes: the frame's MIDI pitch (nearest note), or UNVOICED."""
        c = self.config
        midi = frame_pitch(waveform[:, 0], c.pitch_window, (c.pitch_min_midi, c.pitch_max_midi), c.voicing)
        voiced = midi.isfinite()
        codes = midi.nan_to_num(0.0).round().long().clamp(c.pitch_min_midi, c.pitch_max_midi)
        return torch.where(voiced, codes, torch.full_like(codes, UNVOICED))

    # synthesis ----------------------------------------------------------------------------------------------------

    def synthesize(self, latent: torch.Tensor, pitch: torch.Tensor, start_frame: int = 0, carry: dict | None = None) -> torch.Tensor:
        """latent (B, D, T) quantised, pitch (B, T) codebook-0 codes → audio (B, 1, T·HOP); `start_frame` places
        the frames in absolute time (sinusoid phases, noise position) when decoding a later part of a sequence.
        `carry` (a dict, empty at a sequence's start): what the next part needs of this one (the convolutions'
        last inputs, the last frame's levels and pitch), updated in place; parts then decode as the whole would."""
        c = self.config
        H, nb = c.harmonics, c.noise_bands
        hidden = self.decoder_in(latent) + self.pitch_embedding(pitch).transpose(1, 2)
        out = self.head(self.decoder(hidden, None if carry is None else carry.setdefault("convolutions", {})))
        out = out.transpose(1, 2)  # (B, T, H + nb + 1)
        B, T, _ = out.shape
        levels = torch.sigmoid(out[..., :-1]).pow(2.3)  # (B, T, H + nb): harmonic amplitudes and noise gains
        shape = torch.sigmoid(out[..., -1:])  # (B, T, 1)
        carry = {} if carry is None else carry
        before = torch.cat([carry.get("levels", levels.new_zeros(B, 1, H + nb)), levels[:, :-1]], 1)
        pitch_before = torch.cat([carry.get("pitch", pitch.new_zeros(B, 1)), pitch[:, :-1]], 1)
        carry["levels"], carry["pitch"] = levels[:, -1:], pitch[:, -1:]

        frames = torch.arange(start_frame, start_frame + T, device=latent.device)
        L = self.noise.shape[-1]
        noise = self.noise[:, (frames[:, None] * HOP + torch.arange(HOP, device=latent.device)) % L]  # (nb, T, HOP)

        def sound(level: torch.Tensor, p: torch.Tensor) -> torch.Tensor:  # (B, T, H + nb), (B, T) → (B, T, HOP)
            return self._harmonics(level[..., :H], p, frames) + torch.einsum("btk,kth->bth", level[..., H:], noise)

        old, new = sound(before, pitch_before), sound(levels, pitch)
        step = shape + (1 - shape) * self.ramp  # how far frame t has moved from its old levels to its new ones
        return (old + step * (new - old)).reshape(B, 1, T * HOP)

    def _harmonics(self, amp: torch.Tensor, pitch: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Σ_h amp_h sin(2π h f n / sr) over each frame's samples n (absolute time); (B, T, H), (B, T) → (B, T, HOP)."""
        H = amp.shape[-1]
        f0 = torch.where(pitch == UNVOICED, torch.zeros_like(pitch, dtype=torch.float64), hz(pitch.double()))  # (B, T)
        freq = f0[..., None] * torch.arange(1, H + 1, device=amp.device, dtype=torch.float64)  # (B, T, H)
        audible = (freq > 0) & (freq < 11_000.0)
        # cycles completed before the frame (float64: a song is millions of samples), then within it (float32)
        start = ((freq * HOP / SAMPLE_RATE) * frames[:, None].double()) % 1.0
        within = freq.float()[..., None] * (torch.arange(HOP, device=amp.device) / SAMPLE_RATE)  # (B, T, H, HOP)
        waves = torch.sin(2 * math.pi * (start.float()[..., None] + within))
        return torch.einsum("bth,bthn->btn", amp * audible, waves)

    # the codec ----------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, n_q: int | None = None, quantize: bool = True):
        """As `TrainedCodec.forward`; codes (K', B, T) start with the pitch, and `n_q` counts it."""
        n = x.shape[-1]
        pitch = self.track_pitch(x)  # (B, T)
        emb = self.embed(x)  # (B, D, T)
        if quantize:
            vq_n = self.num_codebooks - 1 if n_q is None else max(1, n_q - 1)
            q, codes, commit = self.quantizer.vq(emb, n_q=vq_n)
            codes, commit = torch.cat([pitch[None], codes]), commit.mean()
        else:
            q, codes, commit = emb, None, emb.new_zeros(())
        return self.synthesize(q, pitch)[..., :n], codes, commit, emb

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.quantizer_ready:
            raise CheckpointError("this AdditiveCodec has no trained codebooks; load a trained one (codec.checkpoint=...) "
                                  "or train it (melodjinn train-codec train=codec_additive)")
        x = _check_waveform(waveform, self.device)  # (B, 1, N)
        codes = self.quantizer.vq.encode(self.embed(x), n_q=self.num_codebooks - 1)  # (K - 1, B, T)
        return torch.cat([self.track_pitch(x)[:, None], codes.transpose(0, 1)], 1).contiguous()  # (B, K, T)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, start_frame: int = 0, carry: dict | None = None) -> torch.Tensor:
        """As `Codec.decode`; `start_frame`: where the codes sit in a longer sequence; `carry`: the decoder's state
        from the sequence's previous part (see `synthesize`; `codec_stream.AdditiveStreamingDecoder` keeps it)."""
        codes = _check_codes(codes, self.num_codebooks, self.codebook_size, self.device)
        B, K, T = codes.shape
        latent = (self.quantizer.vq.decode(codes[:, 1:].transpose(0, 1)) if K > 1
                  else torch.zeros(B, self.config.dimension, T, device=codes.device))
        return self.synthesize(latent, codes[:, 0], start_frame, carry)


def _whole_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, N) → (B, T·HOP), zero-padded to whole frames."""
    T = -(-x.shape[-1] // HOP)
    return F.pad(x, (0, T * HOP - x.shape[-1]))


def _log_magnitude(x: torch.Tensor, n_fft: int, window: torch.Tensor, hops: int = 1) -> torch.Tensor:
    """(B, T·HOP) → (B, n_fft // 2 + 1, T): log |STFT| per frame, from `hops` windows centred at even steps across
    the frame (one: centred on it), their power averaged. A window shorter than a low note's period sees where the
    note is in its cycle; averaging over positions across the frame smooths that out."""
    hop = HOP // hops
    side = (n_fft - hop) // 2
    spec = torch.stft(F.pad(x, (side, side)), n_fft, hop, window=window, center=False, return_complex=True)
    power = (spec.real.square() + spec.imag.square()).unflatten(-1, (-1, hops)).mean(-1)  # (B, F, T)
    mag = (power + 1e-12).sqrt() / (window.sum() / 2)  # a sinusoid's amplitude
    return torch.log(mag + 1e-4)


def _band_noises(bands: int, min_hz: float, length: int = 2**15, seed: int = 0) -> torch.Tensor:
    """(bands, length) unit-RMS white noise split into log-spaced bands (a brick-wall split of one seeded noise),
    looped by the decoder: 1.4 s is long enough that no loop is heard in a drum's decay."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.fft.rfft(torch.randn(length, generator=gen, dtype=torch.float64))
    freqs = torch.fft.rfftfreq(length, 1 / SAMPLE_RATE, dtype=torch.float64)
    edges = torch.logspace(math.log10(min_hz), math.log10(12_000.0), bands + 1, dtype=torch.float64)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = torch.fft.irfft(spectrum * ((freqs >= lo) & (freqs < hi)), length)
        rows.append(band / band.square().mean().sqrt().clamp_min(1e-12))
    return torch.stack(rows).float()
