"""`melodjinn bench generation`: how fast the dynamics generates, per arrangement, with and without the KV cache,
and end to end with codec decoding. Figures are wall seconds on this process; the thread count comes with them."""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from melodjinn.world_model.dynamics import DynamicsConfig, DynamicsModel, time_generation
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import FRAME_RATE


def _model(base: DynamicsConfig, arrangement: str) -> DynamicsModel:
    cfg = DynamicsConfig(**{**base.__dict__, "arrangement": arrangement, "arrangement_options": {}})
    torch.manual_seed(0)
    return DynamicsModel(cfg).eval()


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
    frames = int(float(b.seconds_with_decoding) * FRAME_RATE)
    prompt = torch.zeros(1, len(base.streams), base.num_codebooks, 1, dtype=torch.long)
    actions = torch.zeros(1, frames + 1, dtype=torch.long)
    # the first call at full length sizes the codec's buffers; it is not timed (as in `bench codec`, best of repeats)
    world_model.generate(prompt, frames, actions, temperature=1.0, decode=True)
    runs = []
    for repeat in range(max(int(cfg.repeats), 1)):
        start = time.perf_counter()
        world_model.generate(prompt, frames, actions, temperature=1.0, generator=torch.Generator().manual_seed(repeat), decode=True)
        runs.append(time.perf_counter() - start)
    audio_seconds = frames / FRAME_RATE
    result["with_decoding"] = {"audio_seconds": audio_seconds, "wall_seconds": min(runs), "realtime_factor": audio_seconds / min(runs),
                               "realtime_factor_per_repeat": [audio_seconds / s for s in runs]}
    return result
