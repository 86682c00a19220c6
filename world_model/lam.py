"""The Latent Action Model (after Genie): discovers discrete actions from raw audio, without labels.

    waveform (B, N)
      └─ patches (B, T, P)            P = hop · stride samples: one patch per action step
           └─ encoder: linear → causal transformer → z (B, T, code_dim)
                └─ VQ of z[t+1] → action a[t] ∈ [0, A)   "what happened between patch t and t+1"
                     └─ decoder: causal transformer over (patch t ⊕ action t) → patch t+1 (target space)

The action is the decoder's only peek at the future, so the VQ codebook is pushed to encode the transitions
that context cannot predict (an onset), and silence / decay collapse onto one code (NOOP).

What mattered in the prototypes (DESIGN.md §11): weight the reconstruction loss by the energy rise from patch
t to t+1 (silence and decay otherwise dominate and the hi-hat merges with NOOP); restart dead codes early and
stop restarting once codes settle (restarts that never stop split NOOP later and codes flip); raw waveform is a
better target than log-magnitude on drums.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from melodjinn.world_model.distributed import all_reduce_sum_
from melodjinn.world_model.transformer import Transformer, TransformerConfig

TARGETS = ("waveform", "normalized", "logmel")


@dataclass
class LAMConfig:
    stride: int = 1  # codec frames per action: patch = hop · stride samples (1 = an action every frame)
    hop: int = 320  # samples per codec frame
    dim: int = 64  # transformer width
    encoder_layers: int = 2
    decoder_layers: int = 2
    heads: int = 4
    num_actions: int = 8  # A, the VQ codebook size; spare codes help (A=8 for 4 true transitions)
    code_dim: int = 16  # VQ code dimension
    target: str = "waveform"  # reconstruction space: waveform | normalized (per-patch standardised) | logmel
    n_mels: int = 32  # mel bands for target=logmel
    commitment: float = 0.25  # VQ commitment weight β
    normalize_codes: bool = False  # VQ on unit vectors (cosine distance) rather than raw encodings
    preemphasis: float = 0.95  # also penalise the pre-emphasised error (x[n] − c·x[n−1]); 0 = off. Keeps hi-hats audible to the loss
    gain_invariant: bool = True  # score reconstructions up to a non-negative gain, so codes need not encode loudness
    onset_weight: float = 4.0  # reconstruction weight 1 + onset_weight · (log-energy rise from t to t+1)
    dead_code_threshold: float = 0.02  # a code used by less than this share of a batch's steps (EMA) is dead
    max_positions: int = 2048  # longest clip in action steps


class ActionQuantizer(nn.Module):
    """Nearest-neighbour VQ with a straight-through gradient, usage tracking and dead-code restarts."""

    def __init__(self, num_codes: int, dim: int, commitment: float, normalize: bool = True):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(num_codes, dim) * 0.1)
        self.commitment = commitment
        self.normalize = normalize
        self.register_buffer("usage", torch.full((num_codes,), 1.0 / num_codes))  # EMA share of steps per code
        # code → the code it stands for; identity until redundant codes are merged (`merge_redundant_codes`)
        self.register_buffer("code_map", torch.arange(num_codes))
        self._pooled_counts: torch.Tensor | None = None  # set inside `one_usage_update`

    def _update_usage(self, counts: torch.Tensor) -> None:
        # usage over the global batch (counts summed over processes), so every replica's EMA stays the same
        counts = all_reduce_sum_(counts)
        self.usage.mul_(0.99).add_(0.01 * (counts / counts.sum()))

    @contextmanager
    def one_usage_update(self):
        """Forward passes inside the block pool their code counts and the usage EMA takes one step at its end:
        the micro-batches of an accumulated training step then count as the one batch they stand for."""
        self._pooled_counts = torch.zeros_like(self.usage)
        try:
            yield
            counts = self._pooled_counts
        finally:
            self._pooled_counts = None
        if counts.sum() > 0:
            self._update_usage(counts)

    def forward(self, z: torch.Tensor):
        # z: (B, T, D) → quantised (B, T, D), codes (B, T), vq loss
        with torch.autocast(z.device.type, enabled=False):  # nearest-code search in fp32: bf16 ties flip codes
            return self._quantise(z.float())

    def _quantise(self, z: torch.Tensor):
        codebook = self.codebook
        if self.normalize:  # compare directions only, so a quiet hit is as far from silence as a loud one
            z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
        codes = self.code_map[dist.argmin(dim=1)]
        quantised = codebook[codes].view_as(z)
        loss = F.mse_loss(quantised, z.detach()) + self.commitment * F.mse_loss(z, quantised.detach())
        if self.training:
            counts = torch.bincount(codes, minlength=self.codebook.shape[0]).float()
            if self._pooled_counts is not None:
                self._pooled_counts += counts
            else:
                self._update_usage(counts)
        quantised = z + (quantised - z).detach()
        return quantised, codes.view(z.shape[:-1]), loss

    @torch.no_grad()
    def swap_codes(self, a: int, b: int) -> None:
        """Exchange the labels a and b (codebook rows, usage, merges): the same encodings get swapped codes."""
        swap = torch.arange(self.codebook.shape[0], device=self.codebook.device)
        swap[a], swap[b] = b, a
        self.codebook.data.copy_(self.codebook.data[swap])
        self.usage.copy_(self.usage[swap])
        self.code_map.copy_(swap[self.code_map[swap]])  # raw row r now holds old row swap[r]; relabel its target

    @torch.no_grad()
    def restart_dead_codes(self, z: torch.Tensor, threshold: float, error: torch.Tensor | None = None) -> int:
        """Move codes whose usage fell below `threshold` onto encodings from `z` (B, T, D), drawn in proportion
        to `error` (B, T) when given (the LAM passes its `onset_error`): the worst-reconstructed onsets are the
        transitions no code explains yet (a uniform draw almost always lands on silence, which has its code)."""
        dead = torch.nonzero(self.usage < threshold).flatten()
        if len(dead) == 0:
            return 0
        if self.normalize:
            z = F.normalize(z, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        if error is None:
            rows = torch.randint(len(flat), (len(dead),), device=flat.device)
        else:
            rows = torch.multinomial(error.reshape(-1).clamp(min=0) + 1e-12, len(dead), replacement=True)
        picks = flat[rows]
        self.codebook.data[dead] = picks + 0.01 * picks.std() * torch.randn_like(picks)
        self.usage[dead] = 1.0 / self.codebook.shape[0]
        return len(dead)


def codebook_stats(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Usage (share of codes seen) and perplexity of a batch of codes."""
    counts = torch.bincount(codes.flatten(), minlength=num_codes).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


class LatentActionModel(nn.Module):
    def __init__(self, cfg: LAMConfig):
        super().__init__()
        if cfg.target not in TARGETS:
            raise ValueError(f"lam.target={cfg.target!r}: choose one of {', '.join(TARGETS)}")
        self.cfg = cfg
        self.patch = cfg.hop * cfg.stride
        def stack(layers):
            return Transformer(TransformerConfig(dim=cfg.dim, layers=layers, heads=cfg.heads, max_positions=cfg.max_positions))
        self.encoder_in = nn.Linear(self.patch, cfg.dim)
        self.encoder = stack(cfg.encoder_layers)
        self.to_code = nn.Linear(cfg.dim, cfg.code_dim)
        self.quantizer = ActionQuantizer(cfg.num_actions, cfg.code_dim, cfg.commitment, cfg.normalize_codes)
        self.decoder_in = nn.Linear(self.patch, cfg.dim)
        self.action_in = nn.Linear(cfg.code_dim, cfg.dim)
        self.decoder = stack(cfg.decoder_layers)
        target_size = cfg.n_mels if cfg.target == "logmel" else self.patch
        self.decoder_out = nn.Linear(cfg.dim, target_size)
        if cfg.target == "logmel":
            self.register_buffer("mel_basis", _mel_basis(self.patch, cfg.n_mels), persistent=False)

    def patches(self, waveform: torch.Tensor) -> torch.Tensor:
        # (B, N) → (B, T, P), trailing samples that do not fill a patch are dropped
        B, N = waveform.shape
        T = N // self.patch
        return waveform[:, : T * self.patch].view(B, T, self.patch)

    def target(self, patches: torch.Tensor) -> torch.Tensor:
        # (B, T, P) → (B, T, P or n_mels) in the configured reconstruction space
        if self.cfg.target == "waveform":
            return patches
        if self.cfg.target == "normalized":
            return (patches - patches.mean(-1, keepdim=True)) / (patches.std(-1, keepdim=True) + 1e-3)
        spectrum = torch.fft.rfft(patches * torch.hann_window(self.patch, device=patches.device), dim=-1).abs()
        return torch.log(spectrum.pow(2) @ self.mel_basis + 1e-5)

    def encode(self, patches: torch.Tensor):
        # (B, T, P) → quantised (B, T-1, D), actions (B, T-1), vq loss, pre-quantisation z (B, T-1, D)
        z = self.to_code(self.encoder(self.encoder_in(patches)))[:, 1:]  # the encoding at t+1 is the action for t
        quantised, actions, vq_loss = self.quantizer(z)
        return quantised, actions, vq_loss, z

    def forward(self, waveform: torch.Tensor) -> dict[str, torch.Tensor]:
        # waveform: (B, N). Returns losses and actions (B, T-1); action t explains patch t → t+1.
        patches = self.patches(waveform)
        if patches.shape[1] < 2:
            raise ValueError(f"need at least 2 patches of {self.patch} samples for one action, got {waveform.shape[-1]} samples")
        quantised, actions, vq_loss, z = self.encode(patches)
        h = self.decoder(self.decoder_in(patches[:, :-1]) + self.action_in(quantised))  # (B, T-1, C)
        prediction = self.decoder_out(h).float()  # losses in fp32 under autocast (waveform errors are ~1e-3)
        target = self.target(patches[:, 1:])
        per_step = self._step_error(prediction, target)  # (B, T-1)
        rise = energy_rise(patches)
        weight = 1.0 + self.cfg.onset_weight * rise
        recon = (weight * per_step).sum() / weight.sum()
        # where dead codes restart: badly reconstructed steps *that start something*. Error alone also points at
        # the steps after a loud onset (a kick's body, poorly predicted early on); a code seeded there learns
        # "a kick is ringing", which is no action, and can end up shared with a real hit.
        onset_error = (rise * weight * per_step).detach()  # its share of the loss, times how much starts there
        return {"actions": actions, "recon_loss": recon, "vq_loss": vq_loss, "z": z, "prediction": prediction,
                "onset_error": onset_error}

    def step_weights(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, T, P) patches → (B, T-1) reconstruction weights 1 + onset_weight · (log-energy rise t → t+1).
        The reconstruction loss is their weighted mean; distributed training normalises by the global batch's sum."""
        return 1.0 + self.cfg.onset_weight * energy_rise(patches)

    def _step_error(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # (B, T, P) × 2 → (B, T) unweighted reconstruction error per step
        error = self._distance(prediction, target)
        if self.cfg.preemphasis and self.cfg.target != "logmel":
            # raw MSE is dominated by low-frequency energy (a kick's body); the emphasised copy weighs highs too
            c = self.cfg.preemphasis
            error = error + self._distance(prediction[..., 1:] - c * prediction[..., :-1], target[..., 1:] - c * target[..., :-1])
        return error

    def _distance(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # (B, T, P) × 2 → (B, T) mean squared error, or with gain_invariant the error left after the best
        # non-negative rescaling of the prediction: the loudness of a hit is then not worth a code of its own
        if not self.cfg.gain_invariant:
            return (prediction - target).pow(2).mean(-1)
        dot = (prediction * target).sum(-1).clamp(min=0)
        residual = target.pow(2).sum(-1) - dot.pow(2) / (prediction.pow(2).sum(-1) + 1e-8)
        return residual.clamp(min=0) / target.shape[-1]

    @torch.no_grad()
    def merge_redundant_codes(self, waveform: torch.Tensor, tolerance: float = 0.25) -> list[tuple[int, int]]:
        """Fold away codes that carry no information, label-free: code a merges into code b when decoding with b
        in a's place raises the total reconstruction loss (all steps) by less than `tolerance` of it. Spare codes
        help optimisation, but after convergence some only split NOOP (silence vs decay) or another transition.
        The total, not a's own loss, is the yardstick: silence is reconstructed almost perfectly, so any swap
        looks large next to a NOOP code's own loss; a code that explains a transition, even a rare quiet one,
        costs a multiple of the whole loss when removed (measured on five runs: redundant codes < 0.1, real ones
        mostly > 0.8; the closest, 0.24, was a hi-hat code next to a near-duplicate of itself).
        Greedy, most redundant first. A redundant code folds into the commonest code it may join, not the cheapest:
        the decoder tells codes apart by context, so a "kick still ringing" code costs almost nothing to fold into
        a hi-hat's code, which would then mean two things; "nothing new" is where redundancy belongs.
        Returns the (merged, kept) pairs. `waveform` (B, N) is training audio."""
        was_training = self.training
        self.eval()
        patches = self.patches(waveform)
        actions = self.encode(patches)[1]  # (B, T-1)
        context = self.decoder_in(patches[:, :-1])
        target = self.target(patches[:, 1:])
        weight = self.step_weights(patches)

        def step_loss(codes: torch.Tensor) -> torch.Tensor:
            quantised = self.quantizer.codebook[codes]
            if self.quantizer.normalize:
                quantised = F.normalize(quantised, dim=-1)
            prediction = self.decoder_out(self.decoder(context + self.action_in(quantised)))
            return weight * self._step_error(prediction, target)  # (B, T-1)

        merges = []
        while True:
            total = step_loss(actions).sum().clamp(min=1e-12)
            best = None  # (the cheapest swap of a, a, the commonest code a can fold into within tolerance)
            used = [int(a) for a in torch.unique(actions)]
            counts = {a: int((actions == a).sum()) for a in used}
            for a in used:
                admissible = []
                for b in used:
                    if a == b:
                        continue
                    increase = float((step_loss(torch.where(actions == a, b, actions)).sum() - total) / total)
                    if increase < tolerance:
                        admissible.append((increase, b))
                if admissible and (best is None or min(admissible)[0] < best[0]):
                    best = (min(admissible)[0], a, max(admissible, key=lambda ib: counts[ib[1]])[1])
            if best is None:
                break
            _, a, b = best
            self.quantizer.code_map[self.quantizer.code_map == a] = b
            actions = torch.where(actions == a, b, actions)
            merges.append((a, b))
        self.train(was_training)
        return merges

    @torch.no_grad()
    def infer_actions(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, N) waveform → (B, T-1) actions, T = N // patch."""
        return self.encode(self.patches(waveform))[1]


def energy_rise(patches: torch.Tensor) -> torch.Tensor:
    """(B, T, P) patches → (B, T-1) log-energy rise from patch t to t+1, clamped at 0: how much starts there."""
    energy = patches.pow(2).mean(-1).add(1e-4).log()  # (B, T)
    return (energy[:, 1:] - energy[:, :-1]).clamp(min=0)


def _mel_basis(n_fft: int, n_mels: int, sample_rate: int = 24_000) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular mel filters."""
    def hz_to_mel(f):
        return 2595.0 * torch.log10(1.0 + f / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (m / 2595.0) - 1.0)

    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(torch.linspace(hz_to_mel(torch.tensor(30.0)), hz_to_mel(torch.tensor(sample_rate / 2)), n_mels + 2))
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lower) / (center - lower)
    falling = (upper - freqs[None]) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0).t().contiguous()
