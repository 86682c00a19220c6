"""Optimiser helpers shared by every training loop (world model, codec, action prior, PPO agent).

    lr_at(step, lr, warmup_steps, total_steps, min_lr_ratio)   linear warm-up, then cosine decay to lr · min_lr_ratio
    optimizer_state(opt) / load_optimizer_state(opt, flat)     an optimiser's per-parameter state as flat tensors
                                                               ("opt.<param index>.<name>"), for safetensors checkpoints
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate at optimiser step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_state(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Per-parameter state (e.g. Adam's moments and step) as flat tensors; hyper-parameters are the config's."""
    flat = {}
    for idx, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            flat[f"opt.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat


def load_optimizer_state(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    """Restore what `optimizer_state` saved (other keys of `flat` are ignored) into an optimiser of the same params."""
    state_dict = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    state_dict["state"] = state
    opt.load_state_dict(state_dict)
