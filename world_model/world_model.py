"""The world model: a latent action model (LAM) and the multi-stream dynamics, bound to one codec.

    mixture waveform ──LAM──► actions (B, T)       a[t] explains frame t → t+1
    tokens (B, S, K, T) + actions + sections ──dynamics──► next tokens
    tokens ──codec.decode per stream──► stems (B, S, N)

A checkpoint directory holds `config.json` (LAM, dynamics and codec configs, the world it was trained on, the
training recipe, the code version), `lam.safetensors`, `dynamics.safetensors` and the codec it was trained with
in `codec/`, so it is self-contained.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from melodjinn.world_model.artifacts import load_artifact_config, load_tensors, resolve_checkpoint, save_artifact
from melodjinn.world_model.codec import TrainedCodec, codec_info, load_codec
from melodjinn.world_model.dynamics import DynamicsConfig, DynamicsModel, expand_actions
from melodjinn.world_model.errors import CheckpointError, DataError
from melodjinn.world_model.lam import LAMConfig, LatentActionModel
from melodjinn.world_model.runtime import to_dataclass

ARTIFACT_KIND = "world-model"
HOP = 320


class WorldModel(nn.Module):
    def __init__(self, lam_cfg: LAMConfig, dynamics_cfg: DynamicsConfig, codec, world: dict | None = None):
        super().__init__()
        if dynamics_cfg.num_actions != lam_cfg.num_actions:
            raise CheckpointError(f"dynamics.num_actions={dynamics_cfg.num_actions} differs from lam.num_actions={lam_cfg.num_actions}")
        self.lam = LatentActionModel(lam_cfg)
        self.dynamics = DynamicsModel(dynamics_cfg)
        self.codec = codec  # not a submodule: its weights live in codec/ and are never trained here
        self.world = world or {}

    @property
    def num_actions(self) -> int:
        return self.lam.cfg.num_actions

    @property
    def null_action(self) -> int:
        return self.dynamics.null_action

    @property
    def stride(self) -> int:
        return self.lam.cfg.stride

    @property
    def stream_names(self) -> list[str]:
        return list(self.dynamics.cfg.streams)

    # ---- actions ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def infer_actions(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, N) mixture → (B, J) LAM actions, one per `stride` frames (J = N // (HOP·stride) − 1)."""
        return self.lam.infer_actions(mix)

    @torch.no_grad()
    def swap_actions(self, a: int, b: int) -> None:
        """Exchange the action ids a and b in the LAM and the dynamics together: the model behaves exactly as
        before with the two ids renamed (train-world uses it to make 0 the "nothing new" action)."""
        self.lam.quantizer.swap_codes(a, b)
        weight = self.dynamics.action_embed.weight
        weight.data[[a, b]] = weight.data[[b, a]]

    def frame_actions(self, actions: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(B, J) LAM actions → (B, T) per-frame actions for the dynamics (null where no action applies)."""
        return expand_actions(actions, self.stride, num_frames, self.null_action)

    # ---- audio ⇄ tokens -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, stems: torch.Tensor) -> torch.Tensor:
        """(B, S, N) stem waveforms → (B, S, K, T) tokens."""
        if stems.dim() != 3 or stems.shape[1] != len(self.stream_names):
            raise DataError(f"stems must be (B, S={len(self.stream_names)}, N) for streams {self.stream_names}, got {tuple(stems.shape)}")
        B, S, N = stems.shape
        codes = self.codec.encode(stems.reshape(B * S, 1, N))
        return codes.view(B, S, *codes.shape[1:])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
        """(B, S, K, T) tokens → (B, S, T·HOP) stem waveforms. `start_frame`: where the tokens sit in a longer
        sequence, for a codec whose audio depends on it (the additive codec's sinusoids run in absolute time)."""
        B, S, K, T = tokens.shape
        return self.codec.decode(tokens.reshape(B * S, K, T), start_frame=start_frame).view(B, S, -1)

    # ---- generation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        num_frames: int,
        actions: torch.Tensor | Callable | None = None,
        sections: Any = None,
        *,
        prompt_actions: torch.Tensor | None = None,
        temperature: Any = 1.0,
        top_k: Any = 0,
        top_p: Any = 1.0,
        guidance_scale: float | None = None,
        generator: Any = None,
        decode: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Continue a prompt by `num_frames` frames.

        prompt: tokens (B, S, K, T0) or stem audio (B, S, N) (encoded with the codec; its LAM actions become the
        prompt's actions). actions: per-frame (B, T0 + num_frames) in the dynamics convention, or a policy
        `policy(session) -> (B,)` called once per new frame. sections: the song's form from frame 0 (prompt
        included) — a plan [(section, frames), ...] (the last section runs on), per-frame ids (B, T) / (T,), or one
        section name or id; None: the section the model's training clips carry most. Past the model's training
        window (`dynamics.cfg.window_frames`) the context rolls over, keeping the actions and the plan. Returns
        {"tokens": (B, S, K, T0 + num_frames)} and, with decode=True, {"audio": (B, S, N)}.
        """
        if prompt.dim() == 3 and prompt.is_floating_point():
            audio = prompt
            prompt = self.encode(audio)
            if prompt_actions is None and audio.shape[-1] >= 2 * HOP * self.stride:
                prompt_actions = self.frame_actions(self.infer_actions(audio.sum(1)), prompt.shape[-1])
        if isinstance(actions, torch.Tensor) and prompt_actions is not None and actions.shape[1] == num_frames:
            actions = torch.cat([prompt_actions, actions], dim=1)
        tokens = self.dynamics.generate(
            prompt, num_frames, actions, sections, prompt_actions=prompt_actions, temperature=temperature,
            top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, generator=generator,
        )
        out = {"tokens": tokens}
        if decode:
            out["audio"] = self.decode(tokens)
        return out

    # ---- save / load --------------------------------------------------------------------------------------------

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        directory = Path(directory)
        codec_dir = directory / "codec"
        if isinstance(self.codec, TrainedCodec) and not (codec_dir / "config.json").exists():
            self.codec.save(codec_dir)
        config = {
            "lam": asdict(self.lam.cfg),
            "dynamics": self.dynamics.config_dict(),
            "codec": {"bundled": isinstance(self.codec, TrainedCodec), **codec_info(self.codec)},
            "world": self.world,
        }
        return save_artifact(directory, ARTIFACT_KIND, config, {"lam": self.lam.state_dict(), "dynamics": self.dynamics.state_dict()}, extra)

    @classmethod
    def load(cls, directory: str | Path, codec=None, device: str | torch.device = "cpu") -> "WorldModel":
        """Load a checkpoint; `codec` (a Codec or a codec config node) overrides the bundled one."""
        directory = resolve_checkpoint(directory)
        meta = load_artifact_config(directory, ARTIFACT_KIND)
        cfg = meta["config"]
        if codec is None:
            if not cfg["codec"].get("bundled"):
                raise CheckpointError(f"{directory} was trained with codec {cfg['codec'].get('name')!r}, which is not bundled; pass codec=... to load it")
            codec = TrainedCodec.load(directory / "codec", device=device)
        elif not hasattr(codec, "encode"):
            codec = load_codec(codec, device=device)
        if codec.num_codebooks != cfg["dynamics"]["num_codebooks"]:
            raise CheckpointError(f"codec has K={codec.num_codebooks} codebooks, the checkpoint's dynamics K={cfg['dynamics']['num_codebooks']}")
        model = cls(to_dataclass(LAMConfig, cfg["lam"], "lam"), to_dataclass(DynamicsConfig, cfg["dynamics"], "dynamics"), codec, cfg.get("world"))
        _load_state(model.lam, load_tensors(directory / "lam.safetensors"), directory / "lam.safetensors")
        model.dynamics.load_weights(load_tensors(directory / "dynamics.safetensors"))
        model.checkpoint_dir = directory
        model.meta = meta
        return model.to(device).eval()


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{path} does not match the code: missing {missing}, unexpected {unexpected}, shape differs {shapes}")
    module.load_state_dict(state)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    shutil.copytree(resolve_checkpoint(src), dst, dirs_exist_ok=True)
