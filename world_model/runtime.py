"""Process-wide runtime settings every command shares: torch threads, seeding, device, schema'd configs.

On a small shared CPU, torch's default of one thread per core over-subscribes as soon as two jobs run;
`threads` is therefore a setting of every command (and reported by every benchmark).
"""

from __future__ import annotations

import os
import random
from dataclasses import fields, is_dataclass
from typing import Any, Sequence, TypeVar

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from melodjinn.world_model.errors import ConfigError

T = TypeVar("T")


def set_threads(threads: int) -> int:
    """Use `threads` intra-op threads (0 = torch's default). Returns the count in effect."""
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = torch default), got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else must be a valid, available torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device={device!r} is not a torch device (use auto, cpu, cuda, cuda:1)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here; use device=cpu or device=auto")
    return dev


PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None = plain fp32). `auto` is bf16 on a CUDA device
    that supports it and fp32 elsewhere: CPU bf16 kernels are slower than fp32 ones on most CPUs, and fp16
    would need a gradient scaler. `bf16` forces it (also on CPU, where it exercises the same code path)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16 support; use precision=fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for forward passes (`autocast_dtype`'s choice); a no-op context for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(module)` when enabled (compiled lazily, on the first call), else the module itself."""
    return torch.compile(module) if enabled else module


def apply_runtime(cfg: DictConfig) -> None:
    """Apply the shared top-level keys (`threads`, `seed`) of a composed command config."""
    if "threads" in cfg:
        set_threads(int(cfg.threads))
    if "seed" in cfg:
        seed_everything(int(cfg.seed))


def check_schedule(recipe: Any, where: str, at_least_one: Sequence[str] = ()) -> None:
    """The checks every training recipe shares, before any data is made: steps >= 1, warmup_steps >= 0,
    batch_size >= 1, lr > 0, and each field named in `at_least_one` (periods, counts) >= 1. A ConfigError names
    `where.key`."""
    if recipe.steps < 1 or recipe.warmup_steps < 0:
        raise ConfigError(f"{where}.steps={recipe.steps}, {where}.warmup_steps={recipe.warmup_steps}: "
                          "need steps >= 1 and warmup_steps >= 0")
    if not recipe.lr > 0:
        raise ConfigError(f"{where}.lr={recipe.lr}: the learning rate must be > 0")
    for name in ("batch_size", *at_least_one):
        if getattr(recipe, name) < 1:
            raise ConfigError(f"{where}.{name}={getattr(recipe, name)}: must be >= 1")


def to_dataclass(schema: type[T], node: Any, where: str) -> T:
    """Validate a config node against a dataclass schema and return the dataclass instance.

    Unknown keys and values of the wrong type fail with a ConfigError naming `where.key`.
    """
    if isinstance(node, schema):
        return node
    if node is None:
        node = {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{where}.{key}: {reason}") from None


def as_plain_dict(obj: Any) -> dict:
    """A dataclass or DictConfig as a plain, JSON-serialisable dict."""
    if is_dataclass(obj):
        return {f.name: as_plain_dict(getattr(obj, f.name)) if is_dataclass(getattr(obj, f.name)) else _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)  # type: ignore[return-value]
    return dict(obj)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value
