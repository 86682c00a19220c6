"""`melodjinn train-codec`: train one of the project's codecs on a synthetic world.

`train.codec` picks the codec: `tiny` (SEANet, `configs/train/codec.yaml`) or `additive` (phase-free,
`train=codec_additive`, `configs/train/codec_additive.yaml`). The recipe (schema `CodecRecipe`) follows what worked on one CPU thread
(DESIGN.md §11): an autoencoder warm-up without the quantizer, then a k-means initialisation of the residual VQ
from real encoder outputs, fast-EMA codebooks with a low dead-code threshold, quantizer dropout, and a
reconstruction loss made of waveform L1 + multi-resolution spectral terms, applied to the audio and to a
pre-emphasised copy of it (otherwise the quiet noise of a hi-hat above 7 kHz is never learned).

The output directory is a codec checkpoint at every save (`config.json` + `codec.safetensors`, loadable with
`TrainedCodec.load`), plus `train_state.safetensors` (weights + optimiser state + step in one file, so it is
always self-consistent) to resume from after a kill. All randomness of step s is seeded from (seed, s), so a
resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from melodjinn.world_model.artifacts import CONFIG_FILE, load_tensors, read_json, save_tensors
from melodjinn.world_model.codec import HOP, SAMPLE_RATE, TrainedCodec, trained_codecs
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.optim import lr_at
from melodjinn.world_model.runtime import check_schedule, resolve_device, to_dataclass
from melodjinn.world_model.worlds import make_world

TRAIN_STATE = "train_state.safetensors"


@dataclass
class LossConfig:
    waveform: float = 5.0  # weight of the relative waveform error ||y - x||² / ||x||²
    spectral: float = 1.0  # weight of the multi-resolution spectral term (convergence + log magnitude)
    fft_sizes: list[int] = field(default_factory=lambda: [2048, 1024, 512, 256, 128])
    log_eps: float = 1e-3  # log(|S| + eps): keeps a gradient when the output is silent
    preemphasis: float = 0.97  # y[n] = x[n] - a x[n-1] for the pre-emphasised copy of the losses (0 = off)
    preemphasis_weight: float = 1.0  # weight of that copy
    preemphasis_waveform: bool = True  # include the waveform term in the copy (it penalises noise that is not phase-exact)
    waveform_bands: list[float] = field(default_factory=list)  # band edges (Hz): relative error per band, averaged
    commitment: float = 1.0  # weight of the VQ commitment loss
    latent_steadiness: float = 0.0  # weight of the latent's frame-to-frame change (L1, relative to its spread) once
    # the quantizer is on: codes that stay put while a sound holds, so a token model need not follow a held tone's
    # phase (0 = off)


@dataclass
class CodecRecipe:
    codec: str = "tiny"  # tiny | additive: which codec to train (codec.py, additive_codec.py)
    model: Any = field(default_factory=dict)  # that codec's architecture (TinyCodecConfig / AdditiveCodecConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    steps: int = 1500
    warmup_steps: int = 300  # autoencoder steps before the quantizer is switched on
    kmeans_batches: int = 4  # batches of encoder outputs pooled for the k-means initialisation
    batch_size: int = 8
    crop_seconds: float = 1.0
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lr_final_fraction: float = 0.1  # cosine decay from lr to lr * this at the last step
    grad_clip: float = 1.0
    quantizer_dropout: float = 0.5  # probability that a quantised step uses only the first n ~ U{1..K} codebooks
    source: str = "mix"  # mix | stems: crops of the mixture, or of one stem per clip (what a multi-stream world model encodes)
    stem_rms: float = 0.1  # source=stems: each stem crop scaled to this RMS (gain at most 8), so quiet stems weigh as much
    eval_seed: int = 1000  # held-out world seed for the periodic evaluation (must differ from `seed`)
    eval_clips: int = 16
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 10

    def validate(self) -> "CodecRecipe":
        kinds = trained_codecs()
        if self.codec not in kinds:
            raise ConfigError(f"train.codec={self.codec!r}: choose {' or '.join(kinds)}")
        self.model = to_dataclass(kinds[self.codec].config_class, self.model, "train.model")
        if self.source not in ("mix", "stems"):
            raise ConfigError(f"train.source={self.source!r}: choose mix or stems")
        check_schedule(self, "train", ("eval_every", "checkpoint_every", "log_every", "kmeans_batches"))
        if self.warmup_steps >= self.steps:  # the quantizer switches on after the warm-up: it must come before the end
            raise ConfigError(f"train.steps={self.steps}, train.warmup_steps={self.warmup_steps}: need warmup_steps < steps")
        if self.crop_seconds * SAMPLE_RATE < HOP:
            raise ConfigError(f"train.crop_seconds={self.crop_seconds}: must hold at least one frame (0.0134 s)")
        if not 0 <= self.quantizer_dropout <= 1:
            raise ConfigError(f"train.quantizer_dropout={self.quantizer_dropout}: must be a probability in [0, 1]")
        if self.loss.latent_steadiness < 0:
            raise ConfigError(f"train.loss.latent_steadiness={self.loss.latent_steadiness}: must be >= 0 (0 = off)")
        self.model.validate()
        return self


# Keys that change how often things are logged or saved, not the result; a resumed run may change them.
_RESUME_FREE_KEYS = {"eval_every", "eval_clips", "checkpoint_every", "log_every"}


# --------------------------------------------------------------------------------------------------------------
# losses


def preemphasis(x: torch.Tensor, coeff: float) -> torch.Tensor:
    """(..., N) → (..., N): x[n] - coeff * x[n-1]."""
    return torch.cat([x[..., :1], x[..., 1:] - coeff * x[..., :-1]], dim=-1)


def spectral_loss(y: torch.Tensor, x: torch.Tensor, fft_sizes: list[int], eps: float) -> torch.Tensor:
    """Multi-resolution STFT loss: spectral convergence + L1 of log(|S| + eps), averaged over resolutions."""
    y, x = y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])
    total = y.new_zeros(())
    for n_fft in fft_sizes:
        window = torch.hann_window(n_fft, device=x.device)
        # Divided by the window sum, a sinusoid of amplitude a peaks at a / 2 whatever n_fft is, so one `eps`
        # means the same level (a floor relative to full scale) at every resolution.
        spec = lambda s: torch.stft(s, n_fft, n_fft // 4, window=window, return_complex=True) / window.sum()  # noqa: E731
        sy, sx = spec(y), spec(x)  # (B, F, frames)
        # |S| through a tiny floor under the square root: exact zeros would give NaN gradients.
        my = (sy.real.square() + sy.imag.square() + 1e-12).sqrt()
        mx = sx.abs()
        convergence = torch.linalg.vector_norm(my - mx) / (torch.linalg.vector_norm(mx) + 1e-7)
        log_mag = (torch.log(my + eps) - torch.log(mx + eps)).abs().mean()
        total = total + convergence + log_mag
    return total / len(fft_sizes)


def relative_error(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """||y - x||² / ||x||² over the batch: 1 for a silent output, whatever the level of the audio.

    An absolute L1 or MSE on mostly-silent drum audio is smallest for a silent output, and training settles there.
    """
    return (y - x).square().sum() / x.square().sum().clamp_min(1e-8)


def band_relative_error(y: torch.Tensor, x: torch.Tensor, edges: list[float]) -> torch.Tensor:
    """The relative error within each frequency band (split at `edges` Hz), averaged over the bands.

    Every band counts as much as the loudest one, so a quiet hi-hat band is not drowned by the kick.
    """
    if not edges:
        return relative_error(y, x)
    err = torch.fft.rfft(y - x).abs().square()  # (B, 1, F)
    ref = torch.fft.rfft(x).abs().square()
    freqs = torch.fft.rfftfreq(x.shape[-1], 1 / SAMPLE_RATE, device=x.device)
    bounds = [0.0, *edges, SAMPLE_RATE]
    floor = ref.sum() * 1e-3  # a band (almost) empty in this batch must not blow up its ratio
    ratios = [err[..., (freqs >= lo) & (freqs < hi)].sum() / (ref[..., (freqs >= lo) & (freqs < hi)].sum() + floor)
              for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.stack(ratios).mean()


def reconstruction_loss(y: torch.Tensor, x: torch.Tensor, loss: LossConfig) -> dict[str, torch.Tensor]:
    """Waveform + spectral terms on the audio, and the same on a pre-emphasised copy."""
    terms = {
        "waveform": band_relative_error(y, x, loss.waveform_bands),
        "spectral": spectral_loss(y, x, loss.fft_sizes, loss.log_eps),
    }
    total = loss.waveform * terms["waveform"] + loss.spectral * terms["spectral"]
    if loss.preemphasis > 0 and loss.preemphasis_weight > 0:
        yp, xp = preemphasis(y, loss.preemphasis), preemphasis(x, loss.preemphasis)
        terms["preemph_spectral"] = spectral_loss(yp, xp, loss.fft_sizes, loss.log_eps)
        copy = loss.spectral * terms["preemph_spectral"]
        if loss.preemphasis_waveform:
            terms["preemph_waveform"] = relative_error(yp, xp)
            copy = copy + loss.waveform * terms["preemph_waveform"]
        total = total + loss.preemphasis_weight * copy
    terms["reconstruction"] = total
    return terms


def latent_change(latent: torch.Tensor) -> torch.Tensor:
    """Mean |z[t] - z[t-1]| over frames, relative to how far z strays from its own mean over the clip; latent
    (B, D, T). Neither scaling the latent nor adding a constant to it changes the score, so only holding still
    lowers it; an L1 change, so a latent that jumps at a note's onset and then holds still scores low."""
    spread = (latent - latent.mean(-1, keepdim=True)).abs().mean()
    return (latent[..., 1:] - latent[..., :-1]).abs().mean() / spread.clamp(min=1e-8)


# --------------------------------------------------------------------------------------------------------------
# data and schedule


def training_batch(world: Any, step: int, recipe: CodecRecipe, seed: int) -> torch.Tensor:
    """(B, 1, crop) crops of clips step*B .. step*B + B - 1 (mixture, or stem i mod S of clip i): a pure function
    of (world, step, seed)."""
    crop = int(recipe.crop_seconds * SAMPLE_RATE)
    rng = np.random.default_rng([seed, step, 7])
    rows = []
    for b in range(recipe.batch_size):
        index = step * recipe.batch_size + b
        clip = world.clip(index)
        mix = clip.mix if recipe.source == "mix" else clip.stems[index % clip.stems.shape[0]]  # (N,)
        if len(mix) < crop:
            mix = np.pad(mix, (0, crop - len(mix)))
        start = int(rng.integers(0, (len(mix) - crop) // HOP + 1)) * HOP
        row = mix[start : start + crop]
        if recipe.source == "stems":
            rms = float(np.sqrt(np.mean(row.astype(np.float64) ** 2)))
            row = row * min(recipe.stem_rms / max(rms, 1e-9), 8.0)
        rows.append(row.astype(np.float32))
    return torch.from_numpy(np.stack(rows))[:, None]  # (B, 1, crop)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % 2**62


# --------------------------------------------------------------------------------------------------------------
# checkpoints


class _Clock:
    """Time spent in training steps (not evaluation or checkpoint writing), wall and CPU, across resumes.

    On a shared machine wall time depends on the neighbours; CPU time at one thread is what the recipe costs.
    """

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall, self.cpu = wall, cpu

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.process_time() - self._cpu


def _save_train_state(out: Path, model: TrainedCodec, opt: torch.optim.Optimizer, step: int, clock: _Clock) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = opt.state.get(p)
        if state:
            for key, value in state.items():
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(value)
    save_tensors(out / TRAIN_STATE, tensors, metadata={"step": str(step), "wall_seconds": f"{clock.wall:.3f}", "cpu_seconds": f"{clock.cpu:.3f}"})


def _load_train_state(out: Path, model: TrainedCodec, opt: torch.optim.Optimizer) -> tuple[int, _Clock]:
    from safetensors import safe_open

    tensors = load_tensors(out / TRAIN_STATE)
    with safe_open(str(out / TRAIN_STATE), framework="pt") as f:
        meta = f.metadata() or {}
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as exc:
        raise CheckpointError(f"{out / TRAIN_STATE} does not match the model of this recipe ({str(exc).splitlines()[0]}); "
                              "use a new out=DIR or resume=false") from None
    params = [p for group in opt.param_groups for p in group["params"]]
    for i, p in enumerate(params):
        state = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"opt.{i}.")}
        if state:
            opt.state[p] = state
    return int(meta.get("step", 0)), _Clock(float(meta.get("wall_seconds", 0.0)), float(meta.get("cpu_seconds", 0.0)))


def _check_resumable(out: Path, run_config: dict[str, Any]) -> None:
    saved = read_json(out / CONFIG_FILE).get("config", {})
    diffs = []
    for section in ("model", "train", "world", "seed"):
        a, b = saved.get(section), run_config.get(section)
        if section == "train" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in _RESUME_FREE_KEYS}
            b = {k: v for k, v in b.items() if k not in _RESUME_FREE_KEYS}
        diffs += _differences(a, b, section)
    if diffs:
        shown = "; ".join(diffs[:5]) + (" ..." if len(diffs) > 5 else "")
        raise CheckpointError(f"out={out} holds a run with a different config ({shown}); "
                              "use a new out=DIR, or resume=false to start over there")


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}")
        return out
    return [] if a == b else [f"{where}: saved {a!r}, now {b!r}"]


# --------------------------------------------------------------------------------------------------------------
# the command


def train_codec(cfg: DictConfig) -> dict[str, Any]:
    """Train the codec `cfg.train.codec` on `cfg.world` (seed `cfg.seed`) into `cfg.out`; returns the summary dict."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from melodjinn.world_model.codec_eval import evaluate_codec, heldout_clips

    recipe = to_dataclass(CodecRecipe, cfg.train, "train").validate()
    seed = int(cfg.seed)
    if recipe.eval_seed == seed:
        raise ConfigError(f"train.eval_seed={recipe.eval_seed} equals seed={seed}: the held-out clips would be training clips")
    if cfg.get("out") in (None, "", "???"):
        raise ConfigError("train-codec needs out=DIR (where the checkpoint goes)")
    out = Path(str(cfg.out))
    device = resolve_device(str(cfg.get("device", "cpu")))
    world_cfg = OmegaConf.to_container(cfg.world, resolve=True)
    world = make_world(cfg.world, seed=seed)
    heldout = heldout_clips(cfg.world, recipe.eval_seed, recipe.eval_clips)
    run_config = {"name": recipe.codec, "model": asdict(recipe.model), "sample_rate": SAMPLE_RATE, "hop": HOP,
                  "train": _plain(asdict(recipe)), "world": world_cfg, "seed": seed}
    run_config["train"].pop("model")

    torch.manual_seed(seed)
    model = trained_codecs()[recipe.codec](recipe.model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=recipe.lr, betas=(0.8, 0.99))

    start, clock = 0, _Clock()
    if bool(cfg.get("resume", True)) and (out / TRAIN_STATE).exists() and (out / CONFIG_FILE).exists():
        _check_resumable(out, run_config)
        start, clock = _load_train_state(out, model, opt)
        print(f"train-codec: resuming {out} at step {start}/{recipe.steps}")
    model.train()

    writer = SummaryWriter(str(out / "tb"), purge_step=start if start else None)
    metrics: dict[str, Any] = {}
    last: dict[str, float] = {}

    def save(step: int, done: bool) -> None:
        _save_train_state(out, model, opt, step, clock)
        extra = {"progress": {"step": step, "steps": recipe.steps, "done": done, "train_seconds": round(clock.wall, 1),
                              "train_cpu_seconds": round(clock.cpu, 1), "threads": torch.get_num_threads()},
                 "metrics": metrics}
        model.save(out, extra=extra, train=run_config["train"], world=world_cfg, seed=seed)

    bar = tqdm(range(start, recipe.steps), initial=start, total=recipe.steps, desc="train-codec", unit="step",
               dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        clock.start()
        torch.manual_seed(_step_seed(seed, step))
        quantize = step >= recipe.warmup_steps
        if quantize and not model.quantizer_ready:
            _init_quantizer(model, world, step, recipe, seed, device)
        x = training_batch(world, step, recipe, seed).to(device)  # (B, 1, N)
        n_q = None
        if quantize and recipe.quantizer_dropout > 0 and torch.rand(()) < recipe.quantizer_dropout:
            n_q = int(torch.randint(1, recipe.model.num_codebooks + 1, ()))
        lr = lr_at(step, recipe.lr, recipe.lr_warmup_steps, recipe.steps, recipe.lr_final_fraction)
        for group in opt.param_groups:
            group["lr"] = lr
        y, _, commit, latent = model(x, n_q=n_q, quantize=quantize)
        terms = reconstruction_loss(y, x, recipe.loss)
        terms["latent_change"] = latent_change(latent)
        loss = terms["reconstruction"] + recipe.loss.commitment * commit
        if quantize:  # from the start it wins: a still latent that carries no sound (the output stays silent)
            loss = loss + recipe.loss.latent_steadiness * terms["latent_change"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        clock.stop()

        if not math.isfinite(loss.item()):
            raise ConfigError(f"train-codec: loss became {loss.item()} at step {step}; lower train.lr or train.grad_clip")
        done_steps = step + 1
        if done_steps % recipe.log_every == 0 or done_steps == recipe.steps:
            last = {k: v.item() for k, v in terms.items()} | {"commitment": commit.item(), "loss": loss.item(),
                                                              "grad_norm": grad_norm.item(), "lr": lr}
            for key, value in last.items():
                writer.add_scalar(f"train/{key}", value, done_steps)
            writer.add_scalar("train/quantized", float(quantize), done_steps)
            bar.set_postfix(loss=f"{last['loss']:.3f}", q=int(quantize), refresh=False)
        if done_steps % recipe.eval_every == 0 or done_steps == recipe.steps:
            if model.quantizer_ready:
                model.eval()
                metrics = evaluate_codec(model, heldout) | {"step": done_steps}
                model.train()
                for key in ("si_snr_db", "event_f1", "event_f1_original", "codebook_usage"):
                    if metrics.get(key) is not None:  # event F1 is None on worlds without a drum kit (songs)
                        writer.add_scalar(f"eval/{key}", metrics[key], done_steps)
                for name, value in (metrics.get("event_f1_by_drum") or {}).items():
                    writer.add_scalar(f"eval/event_f1_{name}", value, done_steps)
                by_drum = " ".join(f"{k} {v:.2f}" for k, v in (metrics.get("event_f1_by_drum") or {}).items())
                f1 = "n/a" if metrics.get("event_f1") is None else f"{metrics['event_f1']:.3f}"
                bar.write(f"step {done_steps}: si_snr {metrics['si_snr_db']:.2f} dB, event F1 {f1} ({by_drum})")
        if done_steps % recipe.checkpoint_every == 0 or done_steps == recipe.steps:
            save(done_steps, done=done_steps == recipe.steps)
    bar.close()
    writer.close()
    if start >= recipe.steps:
        meta = read_json(out / CONFIG_FILE)
        metrics = meta.get("metrics", {})

    size_mb = (out / "codec.safetensors").stat().st_size / 1e6
    summary = {"out": str(out), "steps": recipe.steps, "train_seconds": round(clock.wall, 1), "train_cpu_seconds": round(clock.cpu, 1),
               "threads": torch.get_num_threads(),
               "parameters": sum(p.numel() for p in model.parameters()), "weights_mb": round(size_mb, 2),
               **{k: metrics[k] for k in ("si_snr_db", "event_f1", "event_f1_original") if k in metrics}}
    print("train-codec: " + json.dumps(summary))
    return summary


def _init_quantizer(model: TrainedCodec, world: Any, step: int, recipe: CodecRecipe, seed: int, device: torch.device) -> None:
    """k-means-initialise the codebooks on encoder outputs of `kmeans_batches` training batches."""
    with torch.no_grad():
        embs = [model.embed(training_batch(world, step + i, recipe, seed + 1).to(device)) for i in range(recipe.kmeans_batches)]
    model.init_quantizer(torch.cat(embs, dim=0))  # (B * kmeans_batches, D, T)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value
