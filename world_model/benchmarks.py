"""`melodjinn bench generation`: how fast the dynamics generates, per arrangement, with and without the KV cache,
per number of streams (one multistream pass vs a stream-by-stream cascade), and end to end with codec decoding.
Figures are wall seconds on this process (and CPU seconds where a busy machine makes wall time noisy); the thread
count comes with them."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from melodjinn.world_model.dynamics import DynamicsConfig, DynamicsModel, time_generation
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import FRAME_RATE


def _model(base: DynamicsConfig, arrangement: str, streams: int | None = None) -> DynamicsModel:
    names = list(base.streams) if streams is None else [f"stream{s}" for s in range(streams)]
    cfg = DynamicsConfig(**{**base.__dict__, "arrangement": arrangement, "arrangement_options": {}, "streams": names})
    torch.manual_seed(0)
    return DynamicsModel(cfg).eval()


def stream_scaling(base: DynamicsConfig, context_frames: int, frames: int, counts=(1, 2, 4), repeats: int = 3) -> dict:
    """Per-frame time of `multistream` generating S streams in one pass, S in `counts`, against a stream-by-stream
    cascade (each stream generated after, and conditioned on, the ones before it: S passes per frame). The
    cascade is timed as S single-stream passes per frame — a lower bound, since its later stages also read the
    earlier streams. Best of `repeats` per figure (CPU seconds of this process; wall seconds beside)."""
    def best(model: DynamicsModel) -> tuple[float, float]:
        runs = [time_generation(model, context_frames=context_frames, frames=frames, seed=r) for r in range(repeats)]
        return min(r["cpu_seconds_per_frame"] for r in runs), min(r["seconds_per_frame"] for r in runs)

    single_cpu, single_wall = best(_model(base, "multistream", 1))
    rows = {}
    for S in counts:
        cpu, wall = (single_cpu, single_wall) if S == 1 else best(_model(base, "multistream", S))
        rows[str(S)] = {"multistream_ms_per_frame": 1e3 * cpu, "multistream_wall_ms_per_frame": 1e3 * wall,
                        "cascade_ms_per_frame": 1e3 * S * single_cpu}
    top = str(max(counts))
    return {"per_streams": rows, "context_frames": context_frames,
            f"multistream_ratio_S{top}_vs_S1": rows[top]["multistream_ms_per_frame"] / rows["1"]["multistream_ms_per_frame"],
            f"cascade_ratio_S{top}_vs_S1": float(max(counts)), "ratio_target": 1.3}


@torch.inference_mode()
def bench_generation(cfg: DictConfig) -> dict:
    b = cfg.generation
    world_model = WorldModel.load(b.checkpoint)
    base = world_model.dynamics.cfg
    result: dict = {"model": {"dim": base.dim, "layers": base.layers, "streams": len(base.streams), "codebooks": base.num_codebooks,
                              "codebook_size": base.codebook_size, "checkpoint": str(b.checkpoint)}}
    per_arrangement = {}
    for name in ("flatten", "delay", "multistream"):
        timing = time_generation(_model(base, name), context_frames=int(b.context_frames), frames=int(b.frames))
        per_arrangement[name] = {"frames_per_second": 1.0 / timing["seconds_per_frame"], "realtime_factor": timing["realtime_factor"]}
    result["arrangements"] = per_arrangement
    result["flatten_slowdown"] = per_arrangement["multistream"]["frames_per_second"] / per_arrangement["flatten"]["frames_per_second"]
    result["flatten_slowdown_target"] = 0.7 * base.num_codebooks * len(base.streams)
    multistream = _model(base, "multistream")
    cached = time_generation(multistream, context_frames=int(b.cache_context_frames), frames=int(b.frames))
    uncached = time_generation(multistream, context_frames=int(b.cache_context_frames), frames=max(4, int(b.frames) // 10), use_cache=False)
    result["kv_cache"] = {"context_frames": int(b.cache_context_frames), "cached_frames_per_second": 1 / cached["seconds_per_frame"],
                          "uncached_frames_per_second": 1 / uncached["seconds_per_frame"],
                          "speedup": uncached["seconds_per_frame"] / cached["seconds_per_frame"]}
    result["streams"] = stream_scaling(base, int(b.context_frames), int(b.frames))
    frames = int(float(b.seconds_with_decoding) * FRAME_RATE)
    prompt = torch.zeros(1, len(base.streams), base.num_codebooks, 1, dtype=torch.long)
    actions = torch.zeros(1, frames + 1, dtype=torch.long)
    world_model.generate(prompt, 8, actions[:, :9], temperature=1.0, decode=True)  # warm-up
    start = time.perf_counter()
    world_model.generate(prompt, frames, actions, temperature=1.0, generator=torch.Generator().manual_seed(0), decode=True)
    seconds = time.perf_counter() - start
    result["with_decoding"] = {"audio_seconds": frames / FRAME_RATE, "wall_seconds": seconds, "realtime_factor": frames / FRAME_RATE / seconds}
    return result
