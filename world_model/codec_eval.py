"""Codec evaluation (`melodjinn eval-codec`) and speed (`bench_codec`, behind `melodjinn bench codec`).

Quality is measured on held-out clips of a synthetic world (a seed the codec never trained on):
- `si_snr_db`: scale-invariant SNR of the decoded audio against the original, averaged over clips;
- `event_f1`: the drum-hit detector (`events.py`) run on the decoded audio against the ground-truth hits,
  ±1 frame; `event_f1_original` is the same detector on the un-coded audio, the ceiling a codec can reach;
- on a multi-stem world (songs) `stems`: per stem, coded alone, the song listeners' F1 and, for pitched stems, how
  often a held note's codes repeat from frame to frame (`stem_metrics`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from melodjinn.world_model.codec import HOP, SAMPLE_RATE, Codec, codec_info, load_codec, trained_codecs
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.worlds import make_world


@dataclass
class HeldOut:
    """Held-out clips of one world: the audio, and per-frame hit labels where the world has a drum kit."""

    world: Any
    seed: int
    audio: np.ndarray  # (C, N) float32 mixtures
    events: np.ndarray | None  # (C, T) int64 labels of the (single) drum stem, or None
    stems: np.ndarray | None = None  # (C, S, N) stems of a multi-stem world (songs), else None
    stem_events: np.ndarray | None = None  # (C, S, T) their labels


def heldout_clips(world_cfg: Any, seed: int, num_clips: int) -> HeldOut:
    if num_clips < 1:
        raise ConfigError(f"need at least one held-out clip, got num_clips={num_clips}")
    world = make_world(world_cfg, seed=seed)
    clips = [world.clip(i) for i in range(num_clips)]
    audio = np.stack([c.mix for c in clips])
    has_kit = hasattr(world, "sounds") and all(c.events.shape[0] == 1 for c in clips)
    events = np.stack([c.events[0] for c in clips]) if has_kit else None
    if clips[0].stems.shape[0] > 1:
        return HeldOut(world, seed, audio, events, np.stack([c.stems for c in clips]), np.stack([c.events for c in clips]))
    return HeldOut(world, seed, audio, events)


def si_snr_db(estimate: np.ndarray, target: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """(C, N), (C, N) → (C,) scale-invariant SNR in dB (both signals made zero-mean)."""
    estimate = estimate - estimate.mean(axis=-1, keepdims=True)
    target = target - target.mean(axis=-1, keepdims=True)
    scale = (estimate * target).sum(-1, keepdims=True) / ((target**2).sum(-1, keepdims=True) + eps)
    projection = scale * target
    noise = estimate - projection
    return 10 * np.log10(((projection**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))


def roundtrip(codec: Codec, audio: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(C, N) audio → decoded (C, N) and codes (C, K, T), in batches."""
    decoded, codes = [], []
    device = getattr(codec, "device", torch.device("cpu"))
    for start in range(0, len(audio), batch_size):
        x = torch.from_numpy(audio[start : start + batch_size]).to(device)[:, None]  # (B, 1, N)
        c = codec.encode(x)  # (B, K, T)
        y = codec.decode(c)[:, 0, : audio.shape[-1]]  # (B, N)
        decoded.append(y.float().cpu().numpy())
        codes.append(c.cpu().numpy())
    return np.concatenate(decoded), np.concatenate(codes)


def evaluate_codec(codec: Codec, heldout: HeldOut, batch_size: int = 8) -> dict[str, Any]:
    """Quality of `codec` on `heldout`: SI-SNR, event F1 (decoded and original), codebook use."""
    from melodjinn.world_model.events import DrumHitDetector, event_scores

    decoded, codes = roundtrip(codec, heldout.audio, batch_size)
    energetic = (heldout.audio**2).sum(-1) > 0  # a clip without a single hit has no defined SI-SNR
    result: dict[str, Any] = {
        "num_clips": int(len(heldout.audio)),
        "si_snr_db": float(np.mean(si_snr_db(decoded[energetic], heldout.audio[energetic]))) if energetic.any() else None,
    }
    if heldout.events is not None:
        detector = DrumHitDetector.for_world(heldout.world)
        decoded_hits = detector.detect(decoded)
        coded = event_scores(decoded_hits, heldout.events)
        original = event_scores(detector.detect(heldout.audio), heldout.events)
        names = getattr(heldout.world, "drum_names", [str(d + 1) for d in range(detector.num_drums)])
        # A codec typically loses one drum outright (the quiet hi-hat); the per-drum F1 shows which.
        by_drum = {name: event_scores(np.where(decoded_hits == d + 1, d + 1, 0), np.where(heldout.events == d + 1, d + 1, 0))["f1"]
                   for d, name in enumerate(names)}
        result |= {"event_f1": coded["f1"], "event_precision": coded["precision"], "event_recall": coded["recall"],
                   "event_f1_by_drum": by_drum, "event_f1_original": original["f1"],
                   "num_events": int((heldout.events > 0).sum())}
    else:
        result |= {"event_f1": None, "event_f1_original": None}
    used = [len(np.unique(codes[:, k])) / codec.codebook_size for k in range(codes.shape[1])]
    result["codebook_usage"] = float(np.mean(used))  # fraction of each codebook the held-out audio uses
    if heldout.stems is not None:
        result["stems"] = stem_metrics(codec, heldout, batch_size)
    return result


def stem_metrics(codec: Codec, heldout: HeldOut, batch_size: int = 8) -> dict[str, dict[str, Any]]:
    """Per stem of a song-world clip set, coded one stem at a time (as a multi-stream world model codes them):
    - `listener_f1`: the song listeners of `eval-world` on the decoded stem against the labels, ±1 frame, and
      `listener_f1_original` on the un-coded stem (the ceiling);
    - `held_code_repeat` (pitched stems): per codebook, the share of frames inside held notes (≥ 24 frames, their
      first and last 4 left out) whose code repeats the previous frame's — what a token model must predict there.
    """
    from melodjinn.world_model.events import event_f1
    from melodjinn.world_model.song_eval import StemListener

    C, S, N = heldout.stems.shape
    decoded, codes = roundtrip(codec, heldout.stems.reshape(C * S, N), batch_size)
    decoded, codes = decoded.reshape(C, S, -1), codes.reshape(C, S, *codes.shape[1:])
    names = list(heldout.world.stem_names)
    listener = StemListener(names)
    heard, original = listener.listen(decoded)["events"], listener.listen(heldout.stems)["events"]
    labels = heldout.stem_events
    out: dict[str, dict[str, Any]] = {}
    for s, name in enumerate(names):
        row: dict[str, Any] = {"listener_f1": round(event_f1(heard[:, s], labels[:, s], tolerance_frames=1), 3),
                               "listener_f1_original": round(event_f1(original[:, s], labels[:, s], tolerance_frames=1), 3)}
        if name != "drums":
            same, n = np.zeros(codes.shape[2]), 0
            for c in range(C):
                starts = np.flatnonzero(labels[c, s] > 0)
                for a, b in zip(starts, [*starts[1:], labels.shape[-1]]):
                    if b - a >= 24:
                        held = codes[c, s, :, a + 4 : b - 4]  # (K, frames)
                        same += (held[:, 1:] == held[:, :-1]).sum(-1)
                        n += held.shape[-1] - 1
            row["held_code_repeat"] = [round(float(x), 3) for x in same / n] if n else None
        out[name] = row
    return out


# --------------------------------------------------------------------------------------------------------------
# melodjinn eval-codec


def _codec_node(cfg: DictConfig) -> dict[str, Any]:
    """The codec config node with the top-level `checkpoint=` shortcut applied."""
    node = OmegaConf.to_container(cfg.codec, resolve=True)
    checkpoint = cfg.get("checkpoint")
    if checkpoint not in (None, ""):
        key = "checkpoint" if node.get("name") in trained_codecs() else "checkpoint_path"
        node[key] = str(checkpoint)
    return node  # type: ignore[return-value]


def eval_codec(cfg: DictConfig) -> dict[str, Any]:
    """Print one JSON line of codec metrics on held-out clips of `cfg.world` (seed `eval_seed`); return it."""
    from melodjinn.world_model.runtime import resolve_device

    device = resolve_device(str(cfg.get("device", "cpu")))
    codec = load_codec(_codec_node(cfg), device=device)
    eval_seed = int(cfg.eval_seed)
    trained_on = _training_seed(codec)
    if trained_on is not None and trained_on == eval_seed:
        raise ConfigError(f"eval_seed={eval_seed} is the seed this codec was trained on; pick another (e.g. eval_seed=1000)")
    heldout = heldout_clips(cfg.world, eval_seed, int(cfg.num_clips))
    tic = time.perf_counter()
    metrics = evaluate_codec(codec, heldout, int(cfg.get("batch_size", 8)))
    result = {
        "codec": codec_info(codec),
        "checkpoint": getattr(codec, "checkpoint_dir", getattr(codec, "source", None)),
        "world": str(cfg.world.name),
        "eval_seed": eval_seed,
        "threads": torch.get_num_threads(),
        **metrics,
        "seconds": round(time.perf_counter() - tic, 2),
    }
    print(json.dumps(result))
    return result


def _training_seed(codec: Codec) -> int | None:
    directory = getattr(codec, "checkpoint_dir", None)
    if directory is None:
        return None
    from melodjinn.world_model.artifacts import read_json

    seed = read_json(f"{directory}/config.json").get("config", {}).get("seed")
    return None if seed is None else int(seed)


# --------------------------------------------------------------------------------------------------------------
# melodjinn bench codec


def _bench_audio(seconds: float) -> np.ndarray:
    """(N,) deterministic drum-world audio of the requested length, so every run times the same input."""
    from melodjinn.world_model.drum_world import DrumWorld

    world = DrumWorld(seed=0)
    n = int(seconds * SAMPLE_RATE)
    parts, i = [], 0
    while sum(len(p) for p in parts) < n:
        parts.append(world.clip(i).mix)
        i += 1
    return np.concatenate(parts)[:n]


def time_codec(codec: Codec, audio: np.ndarray, repeats: int) -> dict[str, float]:
    """Encode and decode real-time factors (audio seconds per wall second; best of `repeats`) at batch 1."""
    device = getattr(codec, "device", torch.device("cpu"))
    x = torch.from_numpy(audio).to(device)[None, None]  # (1, 1, N)
    seconds = len(audio) / codec.sample_rate
    codes = codec.encode(x)  # warm-up (allocations, lazy init)
    codec.decode(codes)
    enc, dec = [], []
    for _ in range(repeats):
        tic = time.perf_counter()
        codes = codec.encode(x)
        _sync(device)
        enc.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        codec.decode(codes)
        _sync(device)
        dec.append(time.perf_counter() - tic)
    return {"encode_rtf": round(seconds / min(enc), 2), "decode_rtf": round(seconds / min(dec), 2),
            "roundtrip_rtf": round(seconds / (min(enc) + min(dec)), 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_codec(cfg: DictConfig) -> dict[str, Any]:
    """Real-time factors of the configured codec (and of EnCodec when `encodec_checkpoint` is set)."""
    from melodjinn.world_model.codec import EncodecCodec
    from melodjinn.world_model.runtime import resolve_device

    seconds, repeats = float(cfg.get("seconds", 10.0)), int(cfg.get("repeats", 3))
    if seconds <= 0 or repeats < 1:
        raise ConfigError(f"bench: need seconds > 0 and repeats >= 1, got seconds={seconds}, repeats={repeats}")
    device = resolve_device(str(cfg.get("device", "cpu")))
    audio = _bench_audio(seconds)
    codecs: list[Any] = [load_codec(_codec_node(cfg), device=device)]
    encodec_file = cfg.get("encodec_checkpoint")
    if encodec_file not in (None, "") and codecs[0].name != "encodec_24khz":
        codecs.append(EncodecCodec(float(cfg.get("encodec_bandwidth", 6.0)), str(encodec_file)).to(device))
    results = {}
    for codec in codecs:
        results[codec.name] = {**codec_info(codec), **time_codec(codec, audio, repeats)}
    return {"target": "codec", "threads": torch.get_num_threads(), "device": str(device), "batch": 1,
            "audio_seconds": round(len(audio) / SAMPLE_RATE, 3), "repeats": repeats, "hop": HOP, "codecs": results}
