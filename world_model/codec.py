"""Codecs: waveform (B, 1, N) ⇄ discrete codes (B, K, T).

Three implementations share the `Codec` interface:
- `EncodecCodec`: pretrained EnCodec 24 kHz (the `encodec` package) from a local checkpoint file;
- `TinyCodec`: the same encodec building blocks at small width, trained by this project (`train-codec`);
- `AdditiveCodec` (`additive_codec.py`): a phase-free codec, magnitude spectra in and a sinusoid bank out, also
  trained here. It and `TinyCodec` share `TrainedCodec` (quantizer, training API, persistence).

`load_codec(cfg.codec)` builds any of them from its config node (`configs/codec/*.yaml`).

All are deterministic: in eval mode encoding is a nearest-neighbour search, so the same audio always gives the
same codes. Codes are int64 in [0, codebook_size); T = ceil(N / 320) frames at 75 frames/s.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError, MelodjinnError

SAMPLE_RATE = 24_000
HOP = 320
FRAME_RATE = SAMPLE_RATE / HOP  # 75.0

ENCODEC_CHECKPOINT_NAME = "encodec_24khz-d7cc33bc.th"
ENCODEC_URL = "https://dl.fbaipublicfiles.com/encodec/v0/" + ENCODEC_CHECKPOINT_NAME
ENCODEC_BANDWIDTHS = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}  # kbps → codebooks
ARTIFACT_KIND = "codec"
WEIGHTS_NAME = "codec"  # → codec.safetensors


@runtime_checkable
class Codec(Protocol):
    sample_rate: int  # 24_000
    frame_rate: float  # 75.0 (hop 320)
    num_codebooks: int  # K
    codebook_size: int  # V

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) float → (B, K, T) int64 codes, T = ceil(N / hop)."""
        ...

    def decode(self, codes: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        """(B, K, T) int64 → (B, 1, T * hop) float waveform. `start_frame`: where the codes sit in a longer
        sequence; a codec whose audio depends on absolute time (the additive codec's sinusoids) needs it, the
        convolutional codecs are time-invariant and ignore it."""
        ...


# --------------------------------------------------------------------------------------------------------------
# encodec without torchaudio


class TorchaudioUnavailable(MelodjinnError, ImportError):
    """Something reached for torchaudio through encodec; melodjinn does not install it."""


class _TorchaudioStandIn(types.ModuleType):
    """Takes torchaudio's place while `encodec` imports; any use says why it is absent and what to use."""

    def __getattr__(self, name: str) -> Any:
        # Dunder probes (copy, inspect, pickling, import machinery) must see an ordinary missing attribute.
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise TorchaudioUnavailable(
            f"torchaudio.{name} is not available: melodjinn runs encodec without torchaudio (no build matches "
            "every torch) and does audio file I/O with soundfile and resampling with soxr instead; use "
            "melodjinn's audio helpers rather than encodec.utils / encodec's command line"
        )


def _torchaudio_works() -> bool:
    try:
        importlib.import_module("torchaudio")
    except (ImportError, OSError):  # OSError: a torchaudio build whose native library does not match torch
        return False
    return True


def import_encodec() -> types.ModuleType:
    """`import encodec`, working whether or not a usable torchaudio is installed.

    encodec 0.1.1 imports torchaudio at import time but only uses it for file I/O and resampling, which
    melodjinn never calls. When torchaudio cannot be imported, a stand-in is registered as
    `sys.modules['torchaudio']` for encodec's import; encodec keeps its reference, so touching
    `encodec.utils.torchaudio.<anything>` raises an ImportError that explains the situation. Afterwards the
    previous `sys.modules` entry is put back: a stand-in left there would make other libraries' availability
    probes (`importlib.util.find_spec("torchaudio")` raises on a module without a spec) crash or lie.
    A real, working torchaudio is left alone.
    """
    if "encodec" in sys.modules and "encodec.model" in sys.modules:
        return sys.modules["encodec"]
    if _torchaudio_works():
        return importlib.import_module("encodec")
    missing = object()
    previous = sys.modules.get("torchaudio", missing)
    stand_in = _TorchaudioStandIn("torchaudio", "stand-in registered by melodjinn: torchaudio is not importable")
    sys.modules["torchaudio"] = stand_in
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module("encodec")
    finally:
        if sys.modules.get("torchaudio") is stand_in:
            if previous is missing:
                del sys.modules["torchaudio"]
            else:
                sys.modules["torchaudio"] = previous  # e.g. None, which a caller used to block the import


@contextmanager
def _quiet_weight_norm():
    """encodec builds its convs with the legacy `torch.nn.utils.weight_norm`, which warns on every layer."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*weight_norm.*is deprecated", category=FutureWarning)
        yield


# --------------------------------------------------------------------------------------------------------------
# shared input checks


def _check_waveform(waveform: torch.Tensor, device: torch.device) -> torch.Tensor:
    if not isinstance(waveform, torch.Tensor) or waveform.dim() != 3 or waveform.shape[1] != 1:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise DataError(f"codec.encode expects a mono waveform tensor of shape (B, 1, N), got {shape}; "
                        "add the channel axis with waveform[:, None] (mix stereo down first)")
    if waveform.shape[-1] == 0:
        raise DataError("codec.encode got an empty waveform (N = 0 samples)")
    if not waveform.is_floating_point():
        raise DataError(f"codec.encode expects float audio in [-1, 1], got dtype {waveform.dtype}")
    return waveform.to(device=device, dtype=torch.float32)


def _check_codes(codes: torch.Tensor, num_codebooks: int, codebook_size: int, device: torch.device) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
        shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise DataError(f"codec.decode expects codes of shape (B, K, T), got {shape}")
    if codes.is_floating_point():
        raise DataError(f"codec.decode expects integer codes, got dtype {codes.dtype}")
    if not 1 <= codes.shape[1] <= num_codebooks:
        raise DataError(f"codec.decode got K={codes.shape[1]} codebooks; this codec has {num_codebooks} "
                        "(a prefix of 1..K codebooks is allowed)")
    if codes.numel():
        lo, hi = (int(v) for v in torch.aminmax(codes))
        if lo < 0 or hi >= codebook_size:
            raise DataError(f"codec.decode got codes outside [0, {codebook_size}): min {lo}, max {hi}")
    return codes.to(device=device, dtype=torch.long)


def codec_info(codec: Codec) -> dict[str, Any]:
    """What a downstream artefact must record to check it is used with the same codec later."""
    return {
        "name": getattr(codec, "name", type(codec).__name__),
        "sample_rate": int(codec.sample_rate),
        "frame_rate": float(codec.frame_rate),
        "num_codebooks": int(codec.num_codebooks),
        "codebook_size": int(codec.codebook_size),
        **getattr(codec, "extra_info", {}),
    }


# --------------------------------------------------------------------------------------------------------------
# EnCodec 24 kHz


def default_encodec_dir() -> Path:
    """Where the package's own download puts the file (torch hub cache), so a once-online machine finds it."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _missing_encodec_message(looked: list[Path]) -> str:
    where = ", ".join(str(p) for p in looked)
    return (
        f"EnCodec 24 kHz weights not found (looked at: {where}). Download {ENCODEC_URL} and put it at "
        f"{default_encodec_dir() / ENCODEC_CHECKPOINT_NAME}, or pass codec.checkpoint_path=/path/to/"
        f"{ENCODEC_CHECKPOINT_NAME} (a file, or a directory holding it); when this machine is online, "
        "codec.allow_download=true fetches it with the encodec package"
    )


def find_encodec_checkpoint(checkpoint_path: str | Path | None) -> Path | None:
    """The local weights file to use, or None when there is none (then only a download can help)."""
    if checkpoint_path is not None and str(checkpoint_path) != "":
        path = Path(checkpoint_path).expanduser()
        if path.is_dir():
            path = path / ENCODEC_CHECKPOINT_NAME
        if not path.is_file():
            raise CheckpointError(_missing_encodec_message([path]))
        return path
    default = default_encodec_dir() / ENCODEC_CHECKPOINT_NAME
    return default if default.is_file() else None


def _load_encodec_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated download, HTML error page saved as .th, a pickle with code in it
        raise CheckpointError(
            f"{path} is not a loadable EnCodec state dict ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            f"re-download it from {ENCODEC_URL}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict; re-download it from {ENCODEC_URL}")
    return state


def build_encodec_24khz() -> nn.Module:
    """The untrained EnCodec 24 kHz model: the architecture `EncodecModel.encodec_model_24khz` builds."""
    encodec = import_encodec()
    with _quiet_weight_norm():
        return encodec.EncodecModel._get_model(
            list(ENCODEC_BANDWIDTHS), SAMPLE_RATE, 1, causal=True, model_norm="weight_norm",
            audio_normalize=False, name="encodec_24khz",
        )


class EncodecCodec(nn.Module):
    """Pretrained EnCodec 24 kHz; `bandwidth` (kbps) picks K = 2/4/8/16/32 codebooks of 1024."""

    name = "encodec_24khz"
    sample_rate = SAMPLE_RATE
    frame_rate = FRAME_RATE
    codebook_size = 1024

    def __init__(self, bandwidth: float = 6.0, checkpoint_path: str | Path | None = None, allow_download: bool = False,
                 state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        bandwidth = float(bandwidth)
        if bandwidth not in ENCODEC_BANDWIDTHS:
            raise ConfigError(f"codec.bandwidth={bandwidth}: EnCodec 24 kHz supports {sorted(ENCODEC_BANDWIDTHS)} kbps")
        self.bandwidth = bandwidth
        self.num_codebooks = ENCODEC_BANDWIDTHS[bandwidth]
        source: str
        if state_dict is None:
            path = find_encodec_checkpoint(checkpoint_path)
            if path is not None:
                state_dict, source = _load_encodec_state(path), str(path)
            elif allow_download:
                state_dict, source = self._download(), ENCODEC_URL
            else:
                raise CheckpointError(_missing_encodec_message([default_encodec_dir() / ENCODEC_CHECKPOINT_NAME]))
        else:
            source = "state_dict"
        self.model = build_encodec_24khz()
        try:
            self.model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise CheckpointError(
                f"EnCodec weights from {source} do not fit the 24 kHz model ({str(exc).splitlines()[0][:300]}...); "
                f"use the original {ENCODEC_CHECKPOINT_NAME} from {ENCODEC_URL}"
            ) from None
        self.model.set_target_bandwidth(bandwidth)
        self.source = source
        self.eval()

    @staticmethod
    def _download() -> dict[str, torch.Tensor]:
        encodec = import_encodec()
        try:
            return encodec.EncodecModel._get_pretrained(ENCODEC_CHECKPOINT_NAME, None)
        except OSError as exc:  # URLError is an OSError: offline, proxy, DNS
            raise CheckpointError(f"downloading EnCodec weights failed ({exc}); " + _missing_encodec_message(
                [default_encodec_dir() / ENCODEC_CHECKPOINT_NAME])) from None

    @property
    def extra_info(self) -> dict[str, Any]:
        return {"bandwidth": self.bandwidth}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        x = _check_waveform(waveform, self.device)  # (B, 1, N)
        emb = self.model.encoder(x)  # (B, D, T)
        codes = self.model.quantizer.encode(emb, self.frame_rate, self.bandwidth)  # (K, B, T)
        return codes.transpose(0, 1).contiguous()  # (B, K, T)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        codes = _check_codes(codes, self.num_codebooks, self.codebook_size, self.device)
        emb = self.model.quantizer.decode(codes.transpose(0, 1))  # (B, D, T)
        return self.model.decoder(emb)[..., : codes.shape[-1] * HOP]  # (B, 1, T * hop)

    def train(self, mode: bool = True):
        # Pretrained and frozen: a training-mode forward would re-run k-means / EMA and change the codebooks.
        return super().train(False)


# --------------------------------------------------------------------------------------------------------------
# Tiny codec


@dataclass
class TinyCodecConfig:
    """Architecture of the tiny codec (stored in its config.json; the code must agree with it to load)."""

    n_filters: int = 8  # SEANet base width; doubles at each of the 4 downsampling stages
    dimension: int = 32  # latent (and codebook vector) dimension
    ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])  # decoder order; product must be 320
    lstm_layers: int = 1  # LSTM layers at the bottleneck of encoder and decoder
    n_residual_layers: int = 1  # residual blocks per stage
    causal: bool = True  # causal convolutions: frame t depends on audio up to its end only
    norm: str = "weight_norm"
    num_codebooks: int = 4  # K
    codebook_size: int = 128  # V
    ema_decay: float = 0.95  # codebook EMA decay (fast: small batches see few vectors per code)
    kmeans_iters: int = 10  # k-means iterations when the quantizer is initialised
    dead_code_threshold: float = 0.5  # EMA usage below which a code is restarted from the batch (training only)
    # Drum-world audio sits near 0.05-0.1 RMS; at that level SEANet's initial weights pass almost nothing of the
    # input through the LSTM bottleneck and training stalls at a silent output. Scaling into the network (and
    # back out) fixes that without touching the encodec blocks.
    input_gain: float = 10.0

    def validate(self) -> "TinyCodecConfig":
        if math.prod(self.ratios) != HOP:
            raise ConfigError(f"codec ratios {self.ratios} give hop {math.prod(self.ratios)}; must be {HOP} (75 frames/s at 24 kHz)")
        if self.num_codebooks < 1 or self.codebook_size < 2:
            raise ConfigError("codec needs num_codebooks >= 1 and codebook_size >= 2")
        if self.input_gain <= 0:
            raise ConfigError(f"codec input_gain={self.input_gain}: must be > 0")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"codec ema_decay={self.ema_decay}: must be in (0, 1)")
        return self


class TrainedCodec(nn.Module):
    """What the codecs this project trains share: a residual VQ between an encoder and a decoder, the training
    API `train-codec` drives, the `Codec` API, and persistence (`config.json` + `codec.safetensors`).

    A subclass sets `name` and `config_class`, builds `embed` (audio → latent) and `decode_latent` (quantised
    latent → audio), and calls `_build_quantizer(K)` in its constructor (a subclass whose codes are more than
    the quantised latent overrides `forward`, `encode` and `decode` too).
    """

    name: str
    config_class: type
    sample_rate = SAMPLE_RATE
    frame_rate = FRAME_RATE

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def _build_quantizer(self, num_codebooks: int) -> None:
        import_encodec()
        from encodec.quantization import ResidualVectorQuantizer

        c = self.config
        # kmeans_init=True leaves the codebooks empty until `init_quantizer` (or the first quantised training
        # forward) fills them from real encoder outputs.
        self.quantizer = ResidualVectorQuantizer(
            dimension=c.dimension, n_q=num_codebooks, bins=c.codebook_size, decay=c.ema_decay, kmeans_init=True,
            kmeans_iters=c.kmeans_iters, threshold_ema_dead_code=c.dead_code_threshold,  # type: ignore[arg-type]
        )
        self.eval()

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, 1, N) → (B, D, T) encoder outputs before quantisation (what the codebooks are fitted to)."""
        raise NotImplementedError

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, D, T) quantised latent → (B, 1, ≥ T·HOP) audio."""
        raise NotImplementedError

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def quantizer_ready(self) -> bool:
        return all(bool(layer._codebook.inited) for layer in self.quantizer.vq.layers)

    # training-time API -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, n_q: int | None = None, quantize: bool = True):
        """(B, 1, N) → reconstruction (B, 1, N), codes (K', B, T) or None, commitment loss (scalar), and the
        encoder's latent (B, D, T) before quantisation.

        `quantize=False` bypasses the quantizer (the warm-up phase); `n_q` < K uses only the first codebooks
        (quantizer dropout).
        """
        n = x.shape[-1]
        emb = self.embed(x)  # (B, D, T)
        if quantize:
            q, codes, commit = self.quantizer.vq(emb, n_q=n_q or self.num_codebooks)  # (B, D, T), (K', B, T), (K',)
            commit = commit.mean()
        else:
            q, codes, commit = emb, None, emb.new_zeros(())
        return self.decode_latent(q)[..., :n], codes, commit, emb

    @torch.no_grad()
    def init_quantizer(self, emb: torch.Tensor) -> None:
        """k-means-initialise every codebook on encoder outputs `emb` (B, D, T), residual by residual."""
        residual = emb.transpose(1, 2).reshape(-1, emb.shape[1])  # (B*T, D)
        for layer in self.quantizer.vq.layers:
            book = layer._codebook
            book.inited.fill_(0)
            book.init_embed_(residual)
            residual = residual - book.dequantize(book.quantize(residual))

    # Codec API ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.quantizer_ready:
            raise CheckpointError(f"this {type(self).__name__} has no trained codebooks; load a trained one "
                                  "(codec.checkpoint=...) or train it (melodjinn train-codec)")
        x = _check_waveform(waveform, self.device)  # (B, 1, N)
        codes = self.quantizer.vq.encode(self.embed(x), n_q=self.num_codebooks)  # (K, B, T)
        return codes.transpose(0, 1).contiguous()  # (B, K, T)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        codes = _check_codes(codes, self.num_codebooks, self.codebook_size, self.device)
        emb = self.quantizer.vq.decode(codes.transpose(0, 1))  # (B, D, T)
        return self.decode_latent(emb)[..., : codes.shape[-1] * HOP]  # (B, 1, T * hop)

    @property
    def extra_info(self) -> dict[str, Any]:
        return {"parameters": sum(p.numel() for p in self.parameters())}

    # persistence ----------------------------------------------------------------------------------------------

    def artifact_config(self, **more: Any) -> dict[str, Any]:
        return {"name": self.name, "model": asdict(self.config), "sample_rate": SAMPLE_RATE, "hop": HOP, **more}

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None, **config_more: Any) -> Path:
        from melodjinn.world_model.artifacts import save_artifact

        return save_artifact(directory, ARTIFACT_KIND, self.artifact_config(**config_more), {WEIGHTS_NAME: self.state_dict()}, extra)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "TrainedCodec":
        """A trained codec from a checkpoint directory (or a shipped name such as `codec-drums`). Called on
        `TrainedCodec`, it builds whichever kind the directory holds; on a subclass, only that kind."""
        from melodjinn.world_model.artifacts import load_artifact_config, load_tensors, resolve_checkpoint

        directory = resolve_checkpoint(directory)
        meta = load_artifact_config(directory, ARTIFACT_KIND)
        saved = meta.get("config", {})
        kind = trained_codecs().get(saved.get("name")) if cls is TrainedCodec else cls
        if kind is None or saved.get("name") != kind.name:
            want = " or ".join(trained_codecs()) if kind is None else kind.name
            article = "an" if want[0] in "aeiou" else "a"
            raise CheckpointError(f"{directory} holds a {saved.get('name')!r} codec, not {article} {want} codec; "
                                  f"use codec.name={saved.get('name')}")
        for key, want in (("sample_rate", SAMPLE_RATE), ("hop", HOP)):
            if saved.get(key) != want:
                raise CheckpointError(f"{directory}: config.json has {key}={saved.get(key)}, this code uses {key}={want}")
        model = kind(_config_from_saved(kind.config_class, saved.get("model"), directory))
        state = load_tensors(directory / f"{WEIGHTS_NAME}.safetensors")
        _check_state(model, state, directory)
        model.load_state_dict(state)
        model.checkpoint_dir = str(directory)
        return model.to(device).eval()


class TinyCodec(TrainedCodec):
    """SEANet encoder/decoder + residual VQ at small width (about 0.7 M parameters, 2.8 MB)."""

    name = "tiny"
    config_class = TinyCodecConfig

    def __init__(self, config: TinyCodecConfig | None = None):
        super().__init__((config or TinyCodecConfig()).validate())
        c = self.config
        import_encodec()
        from encodec.modules import SEANetDecoder, SEANetEncoder

        common = dict(channels=1, dimension=c.dimension, n_filters=c.n_filters, ratios=list(c.ratios), lstm=c.lstm_layers,
                      n_residual_layers=c.n_residual_layers, causal=c.causal, norm=c.norm)
        with _quiet_weight_norm():
            self.encoder = SEANetEncoder(**common)
            self.decoder = SEANetDecoder(**common)
        self._build_quantizer(c.num_codebooks)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.encoder(waveform * self.config.input_gain)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent) / self.config.input_gain


def trained_codecs() -> dict[str, type[TrainedCodec]]:
    """The codecs this project trains, by the name their checkpoints record."""
    from melodjinn.world_model.additive_codec import AdditiveCodec

    return {TinyCodec.name: TinyCodec, AdditiveCodec.name: AdditiveCodec}


def _config_from_saved(config_class: type, saved: Any, directory: Path) -> Any:
    if not isinstance(saved, dict):
        raise CheckpointError(f"{directory}/config.json has no codec model config (config.model); re-create the checkpoint")
    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(saved) - known)
    missing = sorted(known - set(saved))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"fields this code does not know: {', '.join(unknown)}")
        if missing:
            parts.append(f"fields this code needs but the checkpoint lacks: {', '.join(missing)}")
        raise CheckpointError(f"{directory}/config.json does not match this code's {config_class.__name__} ({'; '.join(parts)}); "
                              "use the melodjinn version that wrote it or retrain with melodjinn train-codec")
    try:
        return config_class(**saved).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory}/config.json: {exc}") from None


def _check_state(model: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Name every tensor where the weights file and the architecture from config.json disagree."""
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"{key} has shape {tuple(state[key].shape)} in the weights but {tuple(expected[key].shape)} "
                            "for the architecture in config.json")
            if len(problems) >= 4:
                break
    if problems:
        raise CheckpointError(f"{directory}: weights do not match config.json ({'; '.join(problems)}); "
                              "the directory mixes files from different runs — retrain or restore both files together")


# --------------------------------------------------------------------------------------------------------------
# factory


@dataclass
class TrainedCodecSpec:
    name: str = "tiny"  # tiny | additive: the kind of codec the checkpoint holds
    checkpoint: str = "codec-drums"  # shipped checkpoint name or a directory written by `melodjinn train-codec`


@dataclass
class EncodecSpec:
    name: str = "encodec_24khz"
    bandwidth: float = 6.0  # kbps: 1.5 / 3 / 6 / 12 / 24 → 2 / 4 / 8 / 16 / 32 codebooks
    checkpoint_path: str | None = None  # encodec_24khz-d7cc33bc.th (file or directory); null → torch hub cache
    allow_download: bool = False  # fetch the weights with the encodec package when no local file exists


def load_codec(cfg: Any, device: str | torch.device = "cpu") -> TrainedCodec | EncodecCodec:
    """Build the codec a `codec` config node names (`name: tiny`, `additive` or `encodec_24khz`), in eval mode."""
    from melodjinn.world_model.runtime import to_dataclass

    if cfg is None:
        raise ConfigError("no codec config given; use codec=tiny or codec=encodec_24khz")
    name = cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None)
    if name in trained_codecs():
        spec = to_dataclass(TrainedCodecSpec, cfg, "codec")
        return trained_codecs()[name].load(spec.checkpoint, device=device)
    if name in ("encodec_24khz", "encodec"):
        spec = to_dataclass(EncodecSpec, {**_as_dict(cfg), "name": "encodec_24khz"}, "codec")
        return EncodecCodec(spec.bandwidth, spec.checkpoint_path, spec.allow_download).to(device).eval()
    raise ConfigError(f"codec.name={name!r} is not a codec; use tiny, additive or encodec_24khz")


def _as_dict(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)
