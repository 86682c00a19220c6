"""The batched simulator behind every env: B rows of music, one dynamics session, one backbone pass per frame.

`MusicBatch` is what `MusicWorldEnv` (B = 1), `MusicVectorEnv` (B = N) and the stable-baselines3 adapter share,
so a single env and a row of a batch run the same code and differ only in float rounding.

    reset(seeds, options)    prompts (drawn from the world's data, or given) → one DynamicsSession for all rows
    step(actions)            (B,) latent codes → frames_per_step new frames per row, observation, reward, info

Rows step in lockstep and every episode lasts `max_steps` steps (they only truncate), so all rows end and reset
together. Each row has its own numpy Generator (which prompt it draws) and its own torch Generator (the
session's sampling draws per row), so row i of a batch seeded s_i replays the single env seeded s_i.

An action is a latent code a in [0, A). With frames_per_step F > 1 and action_hold="first", a conditions the
step's first frame and the other F - 1 frames get the *rest code* (the code the LAM uses most on the world's
data: "nothing new"); with "all", a conditions all F frames (right when F equals the LAM stride; for a stride-1
drum model a held hit code plays a roll). In the multistream arrangement a frame's action is committed when its
first codebook is sampled, `lag` = max_delay - min_delay frames before the frame is complete, so the tokens a step
returns end `lag` frames before the frame its action starts (reset runs that lookahead with the rest code).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from gymnasium import spaces
from gymnasium.utils import seeding

from melodjinn.world_model.codec_stream import streaming_decoder
from melodjinn.world_model.errors import ConfigError, MelodjinnError
from melodjinn.world_model.runtime import resolve_device, to_dataclass
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import HOP, SECTIONS, make_world


class EnvError(MelodjinnError, ValueError):
    """A bad action, option or call order for a Melodjinn env. Also a `ValueError`."""


@dataclass
class EnvConfig:
    """What `gymnasium.make("melodjinn/MusicWorld-v0", **kwargs)` accepts besides `reward` and `render_mode`."""

    checkpoint: Optional[str] = None  # world-model directory or shipped name (DrumWorld-v0: "drums")
    max_steps: int = 64  # episode length in steps; the episode truncates there
    frames_per_step: int = 4  # frames (1/75 s each) generated per step
    action_hold: str = "first"  # first: the action conditions the step's first frame, the rest code the others | all
    prompt_frames: int = 75  # frames of a world clip that start each episode (default prompts)
    prompt_seed: int = 1000  # world seed the default prompts come from (1000: the held-out split)
    prompt_clips: int = 256  # default prompts are drawn uniformly from clips [0, prompt_clips) of that world
    observation_frames: int = 16  # complete frames of tokens in the observation
    action_history: int = 8  # past step actions in the observation (A = none yet)
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_k: int = 0  # top-k sampling (0 = off)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    decode_audio: bool = False  # decode every step's frames to audio (info["audio"])
    max_frames: Optional[int] = None  # session buffer (frames; None = the world model's training window); when full,
    # the last half is kept (at least the prompt's length) and the cache rebuilt
    device: str = "cpu"  # torch device of the world model

    def validate(self) -> "EnvConfig":
        if not self.checkpoint:
            raise ConfigError("MusicWorld-v0 needs checkpoint=DIR (a train-world output) or a shipped name such as "
                              "'drums'; gymnasium.make('melodjinn/DrumWorld-v0') uses the shipped drum model")
        for key in ("max_steps", "frames_per_step", "prompt_frames", "prompt_clips", "observation_frames", "action_history"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"env.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_frames is not None and int(self.max_frames) < 1:
            raise ConfigError(f"env.max_frames must be >= 1 or null (the world model's training window), got {self.max_frames}")
        if self.action_hold not in ("first", "all"):
            raise ConfigError(f"env.action_hold must be 'first' or 'all', got {self.action_hold!r}")
        if self.observation_frames > self.prompt_frames:
            raise ConfigError(f"env.observation_frames={self.observation_frames} exceeds env.prompt_frames="
                              f"{self.prompt_frames}: the first observation must be filled by the prompt")
        return self


def env_config(kwargs: dict) -> EnvConfig:
    return to_dataclass(EnvConfig, kwargs, "env").validate()


def env_kwargs(node: Any) -> dict:
    """An `env` config node (configs/env/*.yaml) → keyword arguments for the env classes (reward included)."""
    from omegaconf import DictConfig, OmegaConf

    kwargs = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    env_config({k: v for k, v in kwargs.items() if k != "reward"})  # fail early, naming the bad key
    return kwargs


@lru_cache(maxsize=4)
def load_world_model(checkpoint: str, device: str) -> WorldModel:
    """World models are shared by every env of a process (inference only; sessions snapshot the weights)."""
    return WorldModel.load(checkpoint, device=resolve_device(device))


@dataclass
class Prompt:
    tokens: torch.Tensor  # (S, K, T)
    actions: torch.Tensor  # (T,) per-frame LAM actions (dynamics convention; null where unknown)
    sections: torch.Tensor  # (T,)


class PromptSource:
    """Episode prompts: the first `prompt_frames` of clip i of the model's world (seed `prompt_seed`), encoded with
    the model's codec, with the LAM's actions. Encoded prompts are cached: a vector env reuses them across rows."""

    def __init__(self, model: WorldModel, cfg: EnvConfig):
        self.model, self.frames, self.clips = model, cfg.prompt_frames, cfg.prompt_clips
        self.world = make_world(model.world, seed=cfg.prompt_seed) if model.world.get("name") else None
        self._cache: dict[int, Prompt] = {}
        self._usage: Optional[np.ndarray] = None
        if self.world is not None and self.frames > self.world.clip_frames:
            raise ConfigError(f"env.prompt_frames={self.frames} exceeds the world's clips ({self.world.clip_frames} frames)")

    def clip(self, index: int) -> Prompt:
        if self.world is None:
            raise ConfigError("this world model was not trained on a synthetic world, so there are no default prompts; "
                              "pass reset(options={'prompt': tokens (S, K, T) or audio (S, N)})")
        hit = self._cache.get(index)
        if hit is None:
            clip = self.world.clip(index)
            stems = torch.from_numpy(clip.stems[:, : self.frames * HOP]).to(self.model.codec.device)
            hit = self.from_audio(stems, torch.from_numpy(clip.sections[: self.frames]))
            self._cache[index] = hit
        return hit

    def from_audio(self, stems: torch.Tensor, sections: Optional[torch.Tensor] = None) -> Prompt:
        """(S, N) stem audio → a prompt (tokens, the LAM's actions on the mix, sections)."""
        model = self.model
        tokens = model.encode(stems[None].float())[0]  # (S, K, T)
        T = tokens.shape[-1]
        if stems.shape[-1] >= 2 * HOP * model.stride:
            actions = model.frame_actions(model.infer_actions(stems.sum(0, keepdim=True).float()), T)[0]
        else:
            actions = torch.full((T,), model.null_action, dtype=torch.long)
        if sections is None:
            sections = torch.full((T,), model.dynamics.cfg.default_section, dtype=torch.long)
        return Prompt(tokens.cpu(), actions.cpu(), sections.long().cpu())

    def action_usage(self) -> np.ndarray:
        """(A,) share of frames the LAM gives each code on the world's first clips (all zero without a world)."""
        if self._usage is None:
            self._usage = np.zeros(self.model.num_actions)
            if self.world is not None:
                mix = torch.from_numpy(np.stack([self.world.clip(i).mix for i in range(8)]))
                codes = self.model.infer_actions(mix.to(self.model.codec.device)).flatten().cpu()
                self._usage = torch.bincount(codes, minlength=self.model.num_actions).double().numpy() / codes.numel()
        return self._usage

    def rest_code(self) -> int:
        """The code the LAM uses most ("nothing new"); the null action without a world."""
        usage = self.action_usage()
        return int(usage.argmax()) if usage.any() else self.model.null_action

    def used_codes(self, min_share: float = 0.002) -> list[int]:
        """The codes the LAM uses on the world's audio (every code without a world)."""
        usage = self.action_usage()
        return [a for a in range(len(usage)) if usage[a] >= min_share] if usage.any() else list(range(len(usage)))


@dataclass
class StepBatch:
    """What a reward function sees after a step of all B rows (see rewards.py)."""

    tokens: torch.Tensor  # (B, S, K, F) the frames this step completed
    actions: np.ndarray  # (B,) the actions taken
    history: dict  # the observation before the step (batched arrays): what the action was chosen from
    observation: dict  # the observation after the step
    step: int  # steps done in the episode (1 after the first)
    max_steps: int
    audio: Optional[np.ndarray] = None  # (B, F·HOP) the step's mix audio, when the env decodes
    episode_tokens: Callable[[], torch.Tensor] = field(default=lambda: torch.empty(0))  # (B, S, K, T) held since reset

    @property
    def done(self) -> bool:
        return self.step >= self.max_steps


class MusicBatch:
    """B rows of the world model stepping together. See the module docstring."""

    def __init__(self, cfg: EnvConfig, num_rows: int, reward: Any = None):
        from melodjinn.envs.rewards import make_reward

        self.cfg = cfg
        self.B = int(num_rows)
        if self.B < 1:
            raise ConfigError(f"num_envs must be >= 1, got {num_rows}")
        self.model = load_world_model(str(cfg.checkpoint), cfg.device)
        self.prompts = PromptSource(self.model, cfg)
        dyn = self.model.dynamics
        self.S, self.K, self.V = dyn.num_streams, dyn.cfg.num_codebooks, dyn.cfg.codebook_size
        self.A = self.model.num_actions
        self.device = self.model.codec.device
        arr = dyn.arrangement
        self.lag = arr.max_delay - getattr(arr, "min_delay", 0)
        self.reward_fn = make_reward(reward, self)
        W, C = cfg.observation_frames, dyn.cfg.dim
        # the state is RMS-normalised then scaled by the final norm's weights: |x_i| <= sqrt(C) · max|w|
        bound = float(np.sqrt(C) * dyn.transformer.norm.weight.abs().max().item())
        self.single_observation_space = spaces.Dict({
            "tokens": spaces.MultiDiscrete(np.full(W * self.S * self.K, self.V, dtype=np.int64)),
            "actions": spaces.MultiDiscrete(np.full(cfg.action_history, self.A + 1, dtype=np.int64)),
            "state": spaces.Box(-bound, bound, (C,), np.float32),
            "section": spaces.Discrete(dyn.cfg.num_sections),
            "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
        })
        self.single_action_space = spaces.Discrete(self.A)
        self.rngs: list[Optional[np.random.Generator]] = [None] * self.B
        self.generators = [torch.Generator(device=self.device) for _ in range(self.B)]
        self.session = None
        self.steps = 0
        self.episode_start = 0  # absolute frame where the episode's generated frames begin
        self.rest = torch.full((self.B,), self.prompts.rest_code(), dtype=torch.long, device=self.device)
        self.decoder = streaming_decoder(self.model.codec) if cfg.decode_audio else None

    # ---- episodes -------------------------------------------------------------------------------------------

    def reset(self, seeds: Sequence[Optional[int]], options: Optional[dict] = None) -> dict:
        cfg, model = self.cfg, self.model
        options = dict(options or {})
        unknown = sorted(set(options) - {"prompt", "section"})
        if unknown:
            raise EnvError(f"unknown reset option(s) {unknown}; valid: 'prompt' (tokens (S, K, T) / (B, S, K, T) or "
                           f"audio (S, N)) and 'section' (one of {', '.join(SECTIONS)} or its index)")
        for i, seed in enumerate(seeds):
            if seed is not None or self.rngs[i] is None:
                self.rngs[i], used = seeding.np_random(seed)
                self.generators[i].manual_seed(int(self.rngs[i].integers(2**63 - 1)))
        prompts = self._prompts(options.get("prompt"))
        T0 = prompts[0].tokens.shape[-1]
        if T0 < cfg.observation_frames:
            raise EnvError(f"the prompt has {T0} frames; the observation needs at least observation_frames="
                           f"{cfg.observation_frames}")
        dyn_max = model.dynamics.cfg.max_frames
        if cfg.max_frames:
            buffer = min(cfg.max_frames, dyn_max)
        else:  # the window the model was trained on, stretched (slightly out of what it learned) for a long prompt
            buffer = min(max(model.dynamics.cfg.window_frames or dyn_max, T0 + self.lag + 2), dyn_max)
        if T0 + self.lag + 2 > buffer:
            raise EnvError(f"the prompt has {T0} frames; the session holds {buffer} (env max_frames / the model's "
                           f"max_frames={dyn_max}): pass a shorter prompt")
        section = self._section(options.get("section"), prompts)
        tokens = torch.stack([p.tokens for p in prompts]).to(self.device)
        actions = torch.stack([p.actions for p in prompts]).to(self.device)
        sections = torch.stack([p.sections for p in prompts]).to(self.device)
        plan = torch.cat([sections, section[:, None].expand(self.B, buffer - T0)], 1)
        self.session = model.dynamics.new_session(
            tokens, actions, plan, batch=self.B, max_frames=buffer, context_frames=max(buffer // 2, T0 + self.lag + 1),
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=self.generators,
        )
        self.session.step(self.rest, num_frames=1)  # commits the lookahead frames with the rest code
        if self.cfg.decode_audio:
            self.decoder.reset()
            self.decode(self.session.tokens)  # the codec's state after the prompt
        self.steps = 0
        self.episode_start = self.session.absolute_frames
        self.past_actions = np.full((self.B, cfg.action_history), self.A, dtype=np.int64)
        self.last_observation = self.observation()
        self.reward_fn.reset(self)
        return self.last_observation

    def _prompts(self, prompt: Any) -> list[Prompt]:
        if prompt is None:
            return [self.prompts.clip(int(rng.integers(self.cfg.prompt_clips))) for rng in self.rngs]
        x = torch.as_tensor(np.asarray(prompt) if not isinstance(prompt, torch.Tensor) else prompt)
        S, K = self.S, self.K
        if x.is_floating_point():
            if x.dim() == 1 and S == 1:
                x = x[None]
            if x.dim() != 2 or x.shape[0] != S:
                raise EnvError(f"an audio prompt must be (S={S}, N) float samples at 24 kHz, got {tuple(x.shape)}")
            if x.shape[-1] < HOP:
                raise EnvError(f"the audio prompt has {x.shape[-1]} samples; give at least one frame ({HOP})")
            return [self.prompts.from_audio(x.to(self.device))] * self.B
        if x.dim() == 3:
            x = x[None].expand(self.B, -1, -1, -1)
        if x.dim() != 4 or tuple(x.shape[:3]) != (self.B, S, K):
            raise EnvError(f"a token prompt must be (S={S}, K={K}, T) or (B={self.B}, S, K, T) integers, got {tuple(x.shape)}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.V):
            raise EnvError(f"prompt tokens must lie in [0, {self.V})")
        T = x.shape[-1]
        null = torch.full((T,), self.model.null_action, dtype=torch.long)
        sections = torch.full((T,), self.model.dynamics.cfg.default_section, dtype=torch.long)
        return [Prompt(x[i].long().cpu(), null, sections) for i in range(self.B)]

    def _section(self, section: Any, prompts: list[Prompt]) -> torch.Tensor:
        if section is None:
            return torch.stack([p.sections[-1] for p in prompts])
        n = self.model.dynamics.cfg.num_sections
        if isinstance(section, str):
            if section not in SECTIONS:
                raise EnvError(f"unknown section {section!r}; choose one of {', '.join(SECTIONS)}")
            section = SECTIONS.index(section)
        if isinstance(section, (bool, float)) or not 0 <= int(section) < n:
            raise EnvError(f"section must be a name ({', '.join(SECTIONS)}) or an index in [0, {n}), got {section!r}")
        return torch.full((self.B,), int(section), dtype=torch.long)

    # ---- stepping -------------------------------------------------------------------------------------------

    def check_actions(self, actions: Any) -> np.ndarray:
        """Actions as given → (B,) int64 codes, or a clear error."""
        a = np.asarray(actions)
        if a.shape not in ((self.B,), ()) or (a.shape == () and self.B != 1):
            raise EnvError(f"expected {self.B} action(s), got an array of shape {a.shape}")
        a = a.reshape(self.B)
        if a.dtype.kind not in "iu" and not (a.dtype.kind == "f" and np.all(a == np.round(a))):
            raise EnvError(f"actions must be integer latent codes in [0, {self.A}), got {a.tolist()}")
        if a.min() < 0 or a.max() >= self.A:
            raise EnvError(f"action(s) {a.tolist()} out of range: the world model has {self.A} latent codes, "
                           f"so actions lie in [0, {self.A})")
        return a.astype(np.int64)

    def step(self, actions: Any) -> tuple[dict, np.ndarray, bool, dict]:
        """Advance every row one step → (observation, rewards (B,), truncated, info)."""
        if self.session is None:
            raise EnvError("call reset() before step()")
        if self.steps >= self.cfg.max_steps:
            raise EnvError(f"the episode ended after max_steps={self.cfg.max_steps}; call reset()")
        actions = self.check_actions(actions)
        a = torch.as_tensor(actions, device=self.device)
        if self.cfg.action_hold == "first":  # per started frame: the action, then the rest code (the last column repeats)
            a = torch.stack([a, self.rest], 1)
        new = self.session.step(a, num_frames=self.cfg.frames_per_step)
        self.steps += 1
        self.past_actions[:, :-1] = self.past_actions[:, 1:]  # oldest out, newest in
        self.past_actions[:, -1] = actions
        audio = self.decode(new) if self.cfg.decode_audio else None
        history, obs = self.last_observation, self.observation()
        self.last_observation = obs
        batch = StepBatch(new, actions, history, obs, self.steps, self.cfg.max_steps, audio, self.episode_tokens)
        rewards, terms = self.reward_fn(batch)
        info = {"tokens": new.cpu().numpy(), "frame": np.full(self.B, self.session.absolute_frames)}
        if audio is not None:
            info["audio"] = audio
        info.update({f"reward_{name}": value for name, value in terms.items()})
        return obs, np.asarray(rewards, dtype=np.float64), self.steps >= self.cfg.max_steps, info

    def observation(self) -> dict:
        s, W = self.session, self.cfg.observation_frames
        f = s.frames
        tokens = s.grid[..., f - W : f].permute(0, 3, 1, 2).reshape(self.B, -1)  # frame-major: (B, W·S·K)
        return {
            "tokens": tokens.cpu().numpy().astype(np.int64),
            "actions": self.past_actions.copy(),
            "state": s.hidden.float().cpu().numpy().astype(np.float32),
            "section": s.sec[:, f - 1].cpu().numpy().astype(np.int64),
            "progress": np.full((self.B, 1), self.steps / self.cfg.max_steps, dtype=np.float32),
        }

    def episode_tokens(self) -> torch.Tensor:
        """(B, S, K, T) the frames generated since reset that the session still holds."""
        start = max(self.episode_start - self.session.offset, 0)
        return self.session.tokens[..., start:]

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """(B, S, K, n) the frames that follow the ones decoded so far → (B, n·HOP) their mix audio. The streaming
        decoder carries the codec's state, so the step's audio is what decoding the whole episode would give."""
        B, S, K, n = tokens.shape
        audio = self.decoder.decode(tokens.reshape(B * S, K, n)).view(B, S, n * HOP).sum(1)
        return audio.float().cpu().numpy()
