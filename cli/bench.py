"""`melodjinn bench <target>`: speed figures as one JSON line (and returned as a dict).

Benchmarks live beside the code they measure; this maps targets to them. Every result carries the torch
thread count, since on a small CPU it changes figures several-fold.
"""

from __future__ import annotations

import importlib
import json
import platform

import torch
from omegaconf import DictConfig

from melodjinn.world_model.errors import ConfigError

TARGETS = {
    "codec": "melodjinn.world_model.codec_eval:bench_codec",
    "generation": "melodjinn.world_model.benchmarks:bench_generation",
    "ppo": "melodjinn.agents.benchmarks:bench_ppo",
    "env": "melodjinn.envs.benchmarks:bench_env",
    "train": "melodjinn.world_model.benchmarks:bench_train",
}


def bench(cfg: DictConfig) -> dict:
    target = cfg.target
    if target not in TARGETS:
        raise ConfigError(f"bench target {target!r} unknown; choose one of: {', '.join(TARGETS)} (e.g. `melodjinn bench codec`)")
    module, name = TARGETS[target].split(":")
    result = getattr(importlib.import_module(module), name)(cfg)
    result = {"target": target, **result, "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    print(json.dumps(result))
    return result
