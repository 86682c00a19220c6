"""Pluggable rewards for the music envs.

A reward function sees a whole batch step (`core.StepBatch`) and returns one float per row:

    class MyReward:
        name = "mine"
        def reset(self, batch): ...                      # every row starts an episode (batch: core.MusicBatch)
        def __call__(self, step) -> np.ndarray: ...      # (B,) rewards

The env sums its terms (`make_reward`): `reward=` is None (always 0), a function object, a name
("energy_curve"), a dict {"name": ..., "weight": w, **options}, or a list of those. Each term's value also goes
to `info["reward_<name>"]`.

- `EnergyCurveReward`: follow a target loudness curve over the episode (e.g. build then drop), measured from the
  tokens by a per-token loudness model fitted on the world's audio (no decoding needed);
- `ActionPriorBonus`: β · log π_prior(a | history) for any `ActionPrior` (agents/ trains one);
- `PreferenceReward`: a learned listener-preference score of the generated music (its model comes from
  feedback/; anything with `score(tokens) -> (B,)` plugs in; by name, {"name": "preference", "model": DIR} loads
  a reward model that `melodjinn train-reward` saved).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from melodjinn.envs.policies import ActionPrior, PreferenceModel
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.worlds import HOP, make_world

CURVES = {  # (progress, level) points, levels in [0, 1] between the world's quiet and loud frames
    "build_drop": [(0.0, 0.1), (0.7, 0.9), (0.75, 0.05), (1.0, 0.05)],
    "build": [(0.0, 0.1), (1.0, 0.9)],
    "steady": [(0.0, 0.5), (1.0, 0.5)],
}


class LoudnessProbe:
    """Frame loudness (dB) from tokens: a ridge regression on one-hot tokens, ŷ = b + Σ_k w[k, token_k], fitted
    per stem on the world's audio. Codec-agnostic and a gather + sum at run time. `r2` is measured on held-out
    clips (another world seed), so a probe that does not track loudness shows it."""

    def __init__(self, model, fit_clips: int = 16, ridge: float = 1.0):
        if not model.world.get("name"):
            raise ConfigError("the loudness probe is fitted on the model's synthetic world; this checkpoint has none")
        K, V = model.dynamics.cfg.num_codebooks, model.dynamics.cfg.codebook_size
        self.K, self.V = K, V
        x, y = self._data(model, fit_clips, seed=0)
        A = x.T @ x + ridge * np.eye(x.shape[1])
        A[0, 0] -= ridge  # the intercept is not shrunk
        self.weights = np.linalg.solve(A, x.T @ y)  # (1 + K·V,)
        xh, yh = self._data(model, max(fit_clips // 4, 4), seed=1)
        pred = xh @ self.weights
        self.r2 = float(1 - ((pred - yh) ** 2).sum() / ((yh - yh.mean()) ** 2).sum())
        self.quiet, self.loud = (float(v) for v in np.percentile(y, [5, 95]))
        self.table = torch.tensor(self.weights[1:], dtype=torch.float32)  # (K·V,): token v of codebook k at k·V + v
        self.bias = float(self.weights[0])
        self.offsets = (torch.arange(K) * V).view(1, 1, K, 1)

    def _data(self, model, clips: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        world = make_world(model.world, seed=seed)
        data = build_world_tensors(world, model.codec, clips, progress=False)
        N, S, K, T = data.tokens.shape
        stems = torch.stack([torch.from_numpy(world.clip(i).stems) for i in range(N)])
        frames = stems[..., : T * HOP].reshape(N, S, T, HOP)
        y = 10 * torch.log10(frames.pow(2).mean(-1) + 1e-8)  # (N, S, T)
        tok = data.tokens.permute(0, 1, 3, 2).reshape(-1, K)  # (N·S·T, K)
        x = np.zeros((tok.shape[0], 1 + K * self.V))
        x[:, 0] = 1
        rows = np.arange(tok.shape[0])
        for k in range(K):
            x[rows, 1 + k * self.V + tok[:, k].numpy()] = 1
        return x, y.reshape(-1).numpy()

    def decibels(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, K, T) tokens → (B, T) mix loudness in dB (stems add as powers)."""
        db = torch.take(self.table.to(tokens.device), tokens + self.offsets.to(tokens.device)).sum(2) + self.bias  # (B, S, T)
        return db[:, 0] if db.shape[1] == 1 else 10 * torch.log10((10 ** (db / 10)).sum(1))

    def level(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, K, T) → (B, T) loudness on the world's scale: 0 = its quiet frames (5th percentile), 1 = loud (95th)."""
        return ((self.decibels(tokens) - self.quiet) / (self.loud - self.quiet)).clamp(0, 1)


_PROBES: dict[str, LoudnessProbe] = {}


def loudness_probe(model) -> LoudnessProbe:
    key = str(getattr(model, "checkpoint_dir", id(model)))
    if key not in _PROBES:
        _PROBES[key] = LoudnessProbe(model)
    return _PROBES[key]


class EnergyCurveReward:
    """−|loudness over the last `window_frames` − target(progress)|: the music should follow `curve`, a name in
    CURVES or (progress, level) points, linearly interpolated. In [−1, 0] per step."""

    name = "energy_curve"

    def __init__(self, curve: Any = "build_drop", window_frames: int = 19, probe: LoudnessProbe | None = None):
        points = CURVES.get(curve) if isinstance(curve, str) else curve
        if points is None:
            raise ConfigError(f"unknown energy curve {curve!r}; choose one of {', '.join(CURVES)} or give (progress, level) points")
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 1 or np.any(np.diff(pts[:, 0]) < 0):
            raise ConfigError(f"an energy curve is a list of (progress, level) points with increasing progress, got {points!r}")
        self.xs, self.ys = pts[:, 0], pts[:, 1]
        self.window = int(window_frames)
        self.probe = probe

    def target(self, progress: float) -> float:
        return float(np.interp(progress, self.xs, self.ys))

    def reset(self, batch) -> None:
        if self.probe is None:
            self.probe = loudness_probe(batch.model)
        self.levels = self.probe.level(batch.session.tokens[..., -self.window :]).cpu()

    def __call__(self, step) -> np.ndarray:
        self.levels = torch.cat([self.levels, self.probe.level(step.tokens).cpu()], 1)[:, -self.window :]
        return -np.abs(self.levels.mean(1).numpy() - self.target(step.step / step.max_steps))


class ActionPriorBonus:
    """β · log π_prior(a | history): rewards staying likely under an action prior (history = the observation the
    action was chosen from)."""

    name = "prior"

    def __init__(self, prior: ActionPrior, beta: float = 0.1):
        if not hasattr(prior, "log_probs"):
            raise ConfigError("ActionPriorBonus needs a prior with log_probs(observation) -> (B, A) log-probabilities")
        self.prior, self.beta = prior, float(beta)

    def reset(self, batch) -> None:
        pass

    def __call__(self, step) -> np.ndarray:
        logp = np.asarray(self.prior.log_probs(step.history))  # (B, A)
        return self.beta * logp[np.arange(len(step.actions)), step.actions]


class PreferenceReward:
    """A learned preference score of the episode's music. every=None: the score once, at the last step (sparse);
    every=k: every k steps the change in score since the last scoring (the sum is the final score either way)."""

    name = "preference"

    def __init__(self, model: PreferenceModel, every: int | None = None):
        if not hasattr(model, "score"):
            raise ConfigError("PreferenceReward needs a model with score(tokens (B, S, K, T)) -> (B,) scores")
        if every is not None and int(every) < 1:
            raise ConfigError(f"PreferenceReward every must be >= 1 or None, got {every}")
        self.model, self.every = model, every

    def reset(self, batch) -> None:
        self.last = np.zeros(batch.B)

    def __call__(self, step) -> np.ndarray:
        due = step.done or (self.every is not None and step.step % int(self.every) == 0)
        if not due:
            return np.zeros(len(step.actions))
        score = np.asarray(self.model.score(step.episode_tokens()), dtype=np.float64).reshape(-1)
        reward, self.last = score - self.last, score
        return reward


def saved_preference_reward(model: Any, every: int | None = None) -> PreferenceReward:
    """{"name": "preference", "model": DIR}: a PreferenceReward over a reward model saved by `melodjinn train-reward`."""
    if isinstance(model, (str, Path)):
        from melodjinn.feedback.reward_model import RewardModel  # here, not at the top: envs never import feedback

        model = RewardModel.load(model)
    return PreferenceReward(model, every)


BUILTIN = {"energy_curve": EnergyCurveReward, "preference": saved_preference_reward}


class RewardSum:
    """Weighted sum of reward terms; returns (total (B,), {name: (B,) per term})."""

    def __init__(self, terms: Sequence[tuple[float, Any]]):
        self.terms = list(terms)
        names = [getattr(fn, "name", type(fn).__name__) for _, fn in self.terms]
        if len(set(names)) != len(names):
            raise ConfigError(f"reward terms must have distinct names, got {names}")
        self.names = names

    def reset(self, batch) -> None:
        for _, fn in self.terms:
            fn.reset(batch)

    def __call__(self, step) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        total = np.zeros(len(step.actions))
        values = {}
        for name, (weight, fn) in zip(self.names, self.terms):
            values[name] = np.asarray(fn(step), dtype=np.float64).reshape(-1)
            total += weight * values[name]
        return total, values


def make_reward(spec: Any, batch=None) -> RewardSum:
    """A reward spec (see the module docstring) → RewardSum."""
    if spec is None:
        return RewardSum([])
    if isinstance(spec, RewardSum):
        return spec
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    terms = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, dict) or hasattr(item, "keys"):
            options = dict(item)
            name = options.pop("name", None)
            weight = float(options.pop("weight", 1.0))
            if name not in BUILTIN:
                raise ConfigError(f"unknown reward {name!r}; built-in: {', '.join(BUILTIN)} (or pass a reward object)")
            try:
                terms.append((weight, BUILTIN[name](**options)))
            except TypeError as exc:
                raise ConfigError(f"reward {name}: {exc}") from None
        elif callable(item) and hasattr(item, "reset"):
            terms.append((1.0, item))
        else:
            raise ConfigError(f"a reward is a name, a dict with 'name', or an object with reset() and __call__(step); got {item!r}")
    return RewardSum(terms)
