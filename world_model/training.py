"""`melodjinn train-world`: joint training of the LAM and the dynamics on a synthetic world.

Read top to bottom:
  1. data: render + encode the world's train clips once (cached), and held-out clips from `eval_seed`;
  2. model: LAM + dynamics (+ the codec, frozen);
  3. loop: loss = recon_scale · LAM reconstruction + VQ + dynamics cross-entropy, the dynamics conditioned on
     the LAM's (detached) actions; dead-code restarts until `restart_until`; the LAM frozen at `freeze_lam_at`
     (its codes stop flipping, and the dynamics then trains on fixed actions);
  4. every `eval_every` steps: held-out action NMI and token cross-entropy (TensorBoard + progress bar);
     every `checkpoint_every` steps: an atomic checkpoint with the optimiser and RNG state, so `resume=true`
     continues a killed run to the same result as an uninterrupted one.

Growing a model: `init=DIR add_streams=[lead]` starts from the trained model in DIR (its LAM frozen as it is, its
codec, its dynamics with the new streams' embeddings and heads added) instead of a fresh one, and trains on a
world whose stems are DIR's streams followed by the new ones; `model.*` and `codec` are then taken from DIR.
`init_shrink=0.5 init_perturb=0.5` starts the dynamics as half the trained weights plus half a fresh initialisation's
(shrink and perturb): a plain warm start from a model fitted to the same clips ends behind a fresh model. `train=grow`
is the fine-tuning recipe (half the steps at a higher lr; README, "Adding a stream").

Scale-out (world_model/distributed.py): the same command runs under `torchrun --nproc_per_node=N`; the global
batch is drawn once and sharded over the processes (DDP averages gradients), rank 0 logs and checkpoints, and a
checkpoint resumes on any number of processes. On a GPU: bf16 autocast, SDPA attention (the transformer's),
optional torch.compile, gradient accumulation and pinned-memory copies (`precision`, `compile`, `grad_accum`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from melodjinn.world_model.artifacts import load_tensors, read_json, save_tensors, write_json
from melodjinn.world_model.codec import load_codec
from melodjinn.world_model.distributed import (GlobalBatchSampler, all_gather_cat, barrier, check_replicas_in_sync,
                                               gradient_sync, init_distributed, main_first, mean_over_ranks, wrap_ddp)
from melodjinn.world_model.dynamics import DynamicsConfig, expand_actions
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.lam import LAMConfig, codebook_stats
from melodjinn.world_model.metrics import normalized_mutual_info
from melodjinn.world_model.optim import load_optimizer_state, lr_at, optimizer_state
from melodjinn.world_model.runtime import autocast, autocast_dtype, check_schedule, maybe_compile, seed_everything, to_dataclass
from melodjinn.world_model.world_data import WorldTensors, cached_world_tensors
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import make_world

STATE_FILE = "train_state.safetensors"
PROGRESS_FILE = "train_progress.json"


@dataclass
class TrainWorldConfig:
    steps: int = 2000  # optimiser steps in total
    batch_size: int = 16  # clips per step: the global batch, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per process and step (batch_size = processes · grad_accum · micro-batch)
    precision: str = "auto"  # auto (bf16 autocast on a CUDA GPU with bf16, fp32 elsewhere) | fp32 | bf16
    compile: bool = False  # torch.compile the training forward (pays a compile warm-up; for long GPU runs)
    lr: float = 1e-3  # AdamW learning rate (LAM and dynamics)
    weight_decay: float = 0.0
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr · min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    recon_scale: float = 100.0  # weight of the LAM reconstruction loss (waveform MSE is ~1e-3; this brings it near 0.1)
    restart_every: int = 50  # dead-code restart period (steps) ...
    restart_until: int = 600  # ... only before this step: late restarts split NOOP and codes flip
    dead_code_threshold: float = 0.0005  # EMA usage share below which a code counts as dead
    freeze_lam_at: int = 1000  # freeze the LAM at this step at the latest (0 = never); codes drift and split if it trains on
    freeze_when_settled: bool = False  # ... or earlier, once its codes stop changing (checked after restart_until)
    settle_every: int = 50  # steps between code-stability checks on a fixed probe of train clips
    settle_threshold: float = 0.003  # codes count as settled when less than this share of probe steps changed code
    settle_patience: int = 3  # ... for this many checks in a row
    merge_tolerance: float = 0.25  # at freeze, merge codes whose swap raises the total reconstruction loss by < this share (0 = off)
    # (off in the song world's recipe: there every code explains 0.5-6 % of the loss and merging folds all 16 into one)
    merge_clips: int = 64  # train clips used to judge redundant codes
    train_clips: int = 1024  # train clips rendered and encoded once (clip i of the world under `seed`)
    eval_clips: int = 64  # held-out clips from `eval_seed`
    eval_seed: int = 1000  # the held-out split's seed; never used for training
    eval_every: int = 250  # held-out NMI / cross-entropy period (steps)
    checkpoint_every: int = 500  # atomic checkpoint period (steps)
    new_streams_only: bool = False  # with init= and add_streams=: train only the added streams' embeddings and heads

    def validate(self) -> TrainWorldConfig:
        check_schedule(self, "train", ("grad_accum", "restart_every", "settle_every", "train_clips", "eval_clips",
                                       "eval_every", "checkpoint_every"))
        return self


class Trainer:
    """Holds everything a training run needs; `run()` trains from `self.step` to `cfg.steps`."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.train_cfg = to_dataclass(TrainWorldConfig, cfg.train, "train").validate()
        self.out = Path(cfg.out)
        _check_grow_options(cfg, self.train_cfg.new_streams_only)  # before joining a process group
        self.dist = init_distributed(cfg.device)  # torchrun's process group (rank, device), or one process
        self.device = self.dist.device
        seed_everything(int(cfg.seed))  # model init and the first steps' randomness are the seed's, not the caller's
        world_cfg = OmegaConf.to_container(cfg.world, resolve=True)
        self.world = make_world(cfg.world, seed=int(cfg.seed))
        self.init = cfg.get("init")
        if self.init:
            self.model = _grown_model(self.init, list(cfg.get("add_streams") or []), cfg.get("add_streams_like"),
                                      float(cfg.get("init_shrink", 1.0)), float(cfg.get("init_perturb", 0.0)),
                                      self.world, world_cfg, self.device)
            codec = self.model.codec
            if self.train_cfg.new_streams_only:
                self.model.dynamics.freeze_backbone(list(cfg.add_streams))
        else:
            codec = load_codec(cfg.codec, device=self.device)
            lam_cfg = to_dataclass(LAMConfig, cfg.model.lam, "model.lam")
            dyn = OmegaConf.to_container(cfg.model.dynamics, resolve=True)
            dyn.update(streams=list(self.world.stem_names), num_codebooks=codec.num_codebooks,
                       codebook_size=codec.codebook_size, num_actions=lam_cfg.num_actions)
            dyn_cfg = to_dataclass(DynamicsConfig, dyn, "model.dynamics")
            self.model = WorldModel(lam_cfg, dyn_cfg, codec, world=world_cfg).to(self.device)
        t = self.train_cfg
        with main_first(self.dist):  # rank 0 renders and encodes the clips once; the other ranks read its cache
            self.train_data = cached_world_tensors(self.world, codec, t.train_clips, self.out / "cache", world_cfg)
            held_world = make_world(cfg.world, seed=t.eval_seed)
            self.eval_data = cached_world_tensors(held_world, codec, t.eval_clips, self.out / "cache", world_cfg)
        dyn_cfg = self.model.dynamics.cfg  # what generation should assume of the clips it never saw (DynamicsConfig)
        dyn_cfg.window_frames = max(dyn_cfg.window_frames, self.train_data.tokens.shape[-1])
        if not self.init:  # a grown model keeps its base's default section
            dyn_cfg.default_section = int(self.train_data.sections.flatten().bincount().argmax())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.batches = torch.Generator().manual_seed(int(cfg.seed))
        self.sampler = GlobalBatchSampler(len(self.train_data), t.batch_size, self.batches, self.dist)
        if (t.batch_size // self.dist.world_size) % t.grad_accum:
            raise ConfigError(f"train.grad_accum={t.grad_accum}: each process's {t.batch_size // self.dist.world_size} clips must split into that many equal micro-batches")
        self.amp_dtype = autocast_dtype(self.device, t.precision)
        self._wrapped: tuple[bool, nn.Module] | None = None  # (LAM frozen?, the loss module as trained)
        self.step = 0
        self.frozen_actions: torch.Tensor | None = None  # (N, T) per-frame actions once the LAM is frozen
        self.history: list[dict] = []
        self.merges: list[tuple[int, int]] = []
        self.swapped_actions: tuple[int, int] | None = None  # (0, the commonest code) exchanged at freeze
        self.frozen_at: int | None = 0 if self.init else None  # step at which the LAM froze early (a grown model's from the start)
        self.last_probe: torch.Tensor | None = None
        self.settled_checks = 0

    def close(self) -> None:
        """Leave the process group. The DDP wrapper goes first: it holds the group, so the group's threads then stop
        inside `destroy_process_group`, in a known order. (A 2-process CI run once lost a rank after finishing, with
        "terminate called without an active exception"; the cause was not reproduced, this is the clean order.)"""
        self._wrapped = None
        self.dist.close()

    # ---- state ----------------------------------------------------------------------------------------------

    def save(self) -> None:
        """Rank 0 writes (every rank holds the same replica, which is checked first); the others wait for it."""
        check_replicas_in_sync(self.model, self.dist)
        if self.dist.is_main:
            extra = {"train": asdict(self.train_cfg), "resolved_config": OmegaConf.to_container(self.cfg, resolve=True),
                     "step": self.step, "lam_frozen_at": self.frozen_at, "merged_codes": self.merges,
                     "swapped_actions": self.swapped_actions, "processes": self.dist.world_size}
            state = {**optimizer_state(self.opt), "rng.batches": self.batches.get_state(), "rng.torch": torch.get_rng_state(),
                     "step": torch.tensor(self.step), "settle.checks": torch.tensor(self.settled_checks)}
            if self.device.type == "cuda":
                state["rng.cuda"] = torch.cuda.get_rng_state(self.device)
            if self.last_probe is not None:
                state["settle.probe"] = self.last_probe
            # state first, weights + config.json last: config.json's step says which state belongs to it
            save_tensors(self.out / STATE_FILE, state)
            write_json(self.out / PROGRESS_FILE, {"step": self.step, "history": self.history})
            self.model.save(self.out, extra)
        barrier(self.dist)

    def resume(self) -> bool:
        if not (self.out / "config.json").exists():
            return False
        meta = read_json(self.out / "config.json")
        saved = meta.get("resolved_config", {})
        now = OmegaConf.to_container(self.cfg, resolve=True)
        differs = [k for k in ("world", "model", "codec", "seed") if saved.get(k) != now.get(k)]
        if differs:
            raise CheckpointError(f"cannot resume {self.out}: its {', '.join(differs)} config differs from this run's; use the same overrides or a new out=")
        state = load_tensors(self.out / STATE_FILE)
        if int(state["step"]) != meta["step"]:
            raise CheckpointError(f"{self.out}: training state (step {int(state['step'])}) does not match the weights (step {meta['step']}); the run was killed mid-save, re-run without resume")
        loaded = WorldModel.load(self.out, codec=self.model.codec, device=self.device)
        self.model.lam.load_state_dict(loaded.lam.state_dict())
        self.model.dynamics.load_state_dict(loaded.dynamics.state_dict())
        self.model.lam.quantizer.usage.copy_(loaded.lam.quantizer.usage)
        load_optimizer_state(self.opt, state)
        self.batches.set_state(state["rng.batches"])
        torch.set_rng_state(state["rng.torch"])
        if "rng.cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng.cuda"], self.device)
        self.step = meta["step"]
        self.frozen_at = meta.get("lam_frozen_at")
        self.settled_checks = int(state["settle.checks"])
        self.last_probe = state["settle.probe"].to(self.device) if "settle.probe" in state else None
        self.merges = [tuple(m) for m in meta.get("merged_codes", [])]
        swapped = meta.get("swapped_actions")
        self.swapped_actions = tuple(swapped) if swapped else None
        progress = self.out / PROGRESS_FILE
        self.history = read_json(progress)["history"] if progress.exists() else []
        return True

    # ---- one step -------------------------------------------------------------------------------------------

    @property
    def lam_frozen(self) -> bool:
        return self.frozen_at is not None or 0 < self.train_cfg.freeze_lam_at <= self.step

    @torch.no_grad()
    def _check_settled(self) -> None:
        """Label-free early freeze: the write-up's codes flipped when the LAM kept training after converging."""
        t = self.train_cfg
        probe = self.model.lam.infer_actions(self.train_data.mix[: t.merge_clips].to(self.device))
        if self.last_probe is not None:
            changed = float((probe != self.last_probe).float().mean())
            self.settled_checks = self.settled_checks + 1 if changed < t.settle_threshold else 0
            if self.settled_checks >= t.settle_patience:
                self.frozen_at = self.step
        self.last_probe = probe

    @torch.no_grad()
    def _freeze_lam(self) -> None:
        lam = self.model.lam.eval()
        for p in lam.parameters():
            p.requires_grad_(False)
        if self.train_cfg.merge_tolerance > 0 and not self.init:  # a grown model's LAM was merged when it froze
            probe = self.train_data.mix[: self.train_cfg.merge_clips].to(self.device)
            self.merges += lam.merge_redundant_codes(probe, self.train_cfg.merge_tolerance)
        chunks = [lam.infer_actions(self.train_data.mix[i : i + 64].to(self.device)) for i in range(0, len(self.train_data), 64)]
        commonest = int(torch.cat(chunks).flatten().bincount().argmax())
        # DESIGN §7: action 0 is "nothing new" (the commonest transition: silence, decay, holding on); a grown model
        # keeps its base's action ids, fixed when that LAM froze
        if commonest != 0 and not self.init:
            self._swap_actions(0, commonest)
            chunks = [torch.where(c == 0, commonest, torch.where(c == commonest, 0, c)) for c in chunks]
        T = self.train_data.tokens.shape[-1]
        self.frozen_actions = self.model.frame_actions(torch.cat(chunks), T).cpu()

    def _swap_actions(self, a: int, b: int) -> None:
        self.model.swap_actions(a, b)
        self.swapped_actions = (a, b)
        embed = self.model.dynamics.action_embed.weight  # its Adam moments follow the rows they belong to
        for moment in self.opt.state.get(embed, {}).values():
            if torch.is_tensor(moment) and moment.shape == embed.shape:
                moment[[a, b]] = moment[[b, a]]

    def train_step(self) -> dict[str, float]:
        t, model = self.train_cfg, self.model
        if self.lam_frozen and self.frozen_actions is None:
            self._freeze_lam()
        lr = lr_at(self.step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        index = self.sampler.global_batch()  # (B,) the global batch, the same on every rank
        batch = self.train_data.batch(index)
        noise = model.dynamics.training_noise(*batch.sections.shape)  # drawn for the global batch: rank-independent
        frozen = None if self.frozen_actions is None else self.frozen_actions[index]
        model.dynamics.train()
        self.opt.zero_grad(set_to_none=True)
        logs, lam_state = self._forward_backward(batch, noise, frozen)
        logs["lr"] = lr
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
        self.opt.step()
        if lam_state is not None and self.step < t.restart_until and (self.step + 1) % t.restart_every == 0:
            logs["restarted"] = model.lam.quantizer.restart_dead_codes(lam_state[0], t.dead_code_threshold, lam_state[1])  # same on every rank
        self.step += 1
        if (self.frozen_actions is None and t.freeze_when_settled and self.step >= t.restart_until
                and self.step % t.settle_every == 0):
            self._check_settled()
        return logs

    def _loss_module(self) -> nn.Module:
        """WorldLoss as trained: compiled when asked, under DDP when distributed. Rebuilt once the LAM freezes,
        since DDP fixes the set of trained parameters when it wraps a module."""
        frozen = self.frozen_actions is not None
        if self._wrapped is None or self._wrapped[0] != frozen:
            self._wrapped = (frozen, wrap_ddp(maybe_compile(WorldLoss(self.model), self.train_cfg.compile), self.dist))
        return self._wrapped[1]

    def _forward_backward(self, batch: WorldTensors, noise, frozen_actions: torch.Tensor | None):
        """Forward + backward over this process's shard of the global `batch`, in `grad_accum` micro-batches.
        Each micro-batch's loss is scaled so that the gradients, summed over micro-batches and averaged over
        processes by DDP, are those of the global batch's loss: plain means by 1/grad_accum, the LAM's weighted
        reconstruction mean by (its weight sum / the global batch's) · processes. Returns the global batch's logs
        and, while the LAM trains, its (z, step error) gathered over processes for dead-code restarts."""
        t, lam, device = self.train_cfg, self.model.lam, self.device
        module = self._loss_module()
        rows = self.sampler.rows  # this rank's slice of the global batch
        shard = batch.batch(rows).to(device)
        micro = (rows.stop - rows.start) // t.grad_accum
        weights = lam.step_weights(lam.patches(batch.mix)) if frozen_actions is None else None  # (B, J) global
        sums: dict[str, torch.Tensor] = defaultdict(float)
        gathered: dict[str, list[torch.Tensor]] = defaultdict(list)
        pooled = lam.quantizer.one_usage_update() if frozen_actions is None else nullcontext()
        with pooled:  # one VQ usage update per step, from the whole global batch
            for m in range(t.grad_accum):
                part = slice(m * micro, (m + 1) * micro)  # rows of the shard
                glob = slice(rows.start + m * micro, rows.start + (m + 1) * micro)  # the same rows in the global batch
                masks = [None if x is None else x[glob].to(device) for x in noise]
                actions = None if frozen_actions is None else frozen_actions[glob].to(device)
                with gradient_sync(module, sync=m == t.grad_accum - 1):
                    with autocast(device, self.amp_dtype):
                        out = module(shard.mix[part], shard.tokens[part], shard.sections[part], *masks, actions)
                    loss = out["dynamics_ce"] / t.grad_accum
                    sums["dynamics_ce"] += loss.detach()
                    if frozen_actions is None:
                        recon_share = float(weights[glob].sum() / weights.sum()) * self.dist.world_size
                        recon, vq = out["recon_loss"] * recon_share, out["vq_loss"] / t.grad_accum
                        loss = loss + t.recon_scale * recon + vq
                        sums["recon"] += recon.detach()
                        sums["vq"] += vq.detach()
                        for key in ("z", "onset_error", "actions"):
                            gathered[key].append(out[key].detach())
                    loss.backward()
        logs = mean_over_ranks({k: float(v) for k, v in sums.items()}, device)
        logs["loss"] = t.recon_scale * logs.get("recon", 0.0) + logs.get("vq", 0.0) + logs["dynamics_ce"]
        if frozen_actions is not None:
            return logs, None
        z, error, actions = (all_gather_cat(torch.cat(gathered[k])) for k in ("z", "onset_error", "actions"))
        logs.update({f"codebook_{k}": v for k, v in codebook_stats(actions, self.model.num_actions).items()})
        return logs, (z.float(), error.float())

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        model, data = self.model, self.eval_data
        lam_mode, dyn_mode = model.lam.training, model.dynamics.training
        model.lam.eval()
        model.dynamics.eval()
        actions = torch.cat([model.infer_actions(data.mix[i : i + 64].to(self.device)) for i in range(0, len(data), 64)]).cpu()
        events = action_targets(data.events, model.stride, actions.shape[1])
        ce = {**heldout_token_ce(model, data, actions, self.device), **heldout_token_ce(model, data, None, self.device)}
        model.lam.train(lam_mode)
        model.dynamics.train(dyn_mode)
        return {"action_nmi": normalized_mutual_info(actions.numpy(), events), **ce,
                **codebook_stats(actions, model.num_actions)}


class WorldLoss(nn.Module):
    """One micro-batch's training losses as one module call, so that DDP and torch.compile see the LAM and the
    dynamics as one graph. Once the LAM is frozen its per-frame `actions` are given and it is not run."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.lam, self.dynamics = model.lam, model.dynamics

    def forward(self, mix, tokens, sections, frame_mask, null_rows, actions=None) -> dict[str, torch.Tensor]:
        # mix (b, N), tokens (b, S, K, T), sections (b, T), frame_mask (b, T) | None, null_rows (b,) | None,
        # actions (b, T) | None → LAM outputs (while it trains) and "dynamics_ce"
        out: dict[str, torch.Tensor] = {}
        if actions is None:
            out = self.lam(mix)
            actions = expand_actions(out["actions"].detach(), self.lam.cfg.stride, tokens.shape[-1], self.dynamics.null_action)
        _, out["dynamics_ce"] = self.dynamics(tokens, actions, sections, targets=tokens, noise=(frame_mask, null_rows))
        return out


@torch.no_grad()
def token_ce_map(model: WorldModel, data: WorldTensors, actions: torch.Tensor | None, device, batch: int = 32) -> torch.Tensor:
    """Teacher-forced cross-entropy (nats) of every held-out token, (N, S, K, T), given LAM actions (N, J); with
    actions None every frame gets the null action (what the dynamics predict from the tokens alone)."""
    T = data.tokens.shape[-1]
    out = []
    for i in range(0, len(data), batch):
        tokens = data.tokens[i : i + batch].to(device)
        frame_actions = None if actions is None else model.frame_actions(actions[i : i + batch].to(device), T)
        logits, _ = model.dynamics(tokens, frame_actions, data.sections[i : i + batch].to(device))  # (B, S, K, T, V)
        out.append(F.cross_entropy(logits.movedim(-1, 1), tokens, reduction="none").cpu())  # (B, S, K, T)
    return torch.cat(out)


def heldout_token_ce(model: WorldModel, data: WorldTensors, actions: torch.Tensor | None, device, batch: int = 32) -> dict[str, float]:
    """Held-out token cross-entropy (`token_ce_map`) summarised: `token_ce` over every stream, `token_ce_<stream>`
    per stream, and `token_ce_<stream>_onsets` over the frames where one of the stream's events starts (the musical
    decisions; a held note's frames are mostly the codec's detail). With actions None the keys are
    `token_ce_null…`, which compare models whose LAMs differ (a LAM that heard a stream announces its notes; one
    that did not cannot). Not evenly: a dynamics whose LAM heard a stream leaves part of it to the actions and
    scores worse without them (README, "Adding a stream": 0.199 vs 0.188 with its actions)."""
    key = "token_ce" if actions is not None else "token_ce_null"
    return summarise_token_ce(token_ce_map(model, data, actions, device, batch), data.events, model.stream_names, key)


def summarise_token_ce(ce: torch.Tensor, events: torch.Tensor, names: list[str], key: str) -> dict[str, float]:
    """`heldout_token_ce`'s figures from a `token_ce_map` (N, S, K, T) and the clips' events (N, S, T), under `key`."""
    onsets = events > 0
    per_stream = ce.mean((0, 2, 3))
    onset_sums, onset_frames = (ce.mean(2) * onsets).sum((0, 2)), onsets.sum((0, 2))
    out = {key: float(per_stream.mean()), **{f"{key}_{n}": float(v) for n, v in zip(names, per_stream)}}
    out.update({f"{key}_{n}_onsets": float(v / c) for n, v, c in zip(names, onset_sums, onset_frames) if c > 0})
    return out


def _check_grow_options(cfg: DictConfig, new_streams_only: bool) -> None:
    """The growing options (init=, add_streams=, init_shrink/init_perturb, train.new_streams_only) that only make
    sense together."""
    reinitialised = cfg.get("init_shrink", 1.0) != 1.0 or cfg.get("init_perturb", 0.0) != 0.0
    if new_streams_only:
        if not cfg.get("add_streams"):
            raise ConfigError("train.new_streams_only=true trains only the streams being added: give init=DIR "
                              "add_streams=[...], or drop it to train the whole model")
        if reinitialised:
            raise ConfigError("train.new_streams_only=true keeps the backbone frozen, so init_shrink/init_perturb "
                              "would leave it damaged for good: drop them, or train the whole model")
    if not cfg.get("init"):
        if cfg.get("add_streams") or cfg.get("add_streams_like"):
            raise ConfigError("add_streams (and add_streams_like) need init=DIR: the trained model to grow")
        if reinitialised:
            raise ConfigError("init_shrink and init_perturb need init=DIR: the trained model to start from")


def _grown_model(init: str, add_streams: list[str], like: str | None, shrink: float, perturb: float, world,
                 world_cfg: dict, device) -> WorldModel:
    """The trained world model in `init`, its dynamics shrunk and perturbed (`DynamicsModel.shrink_and_perturb`),
    with `add_streams` added (new embeddings and heads, backbone and LAM kept; copies of stream `like`'s when
    given), checked against the world it will train on: its stems must be the model's streams, then the new ones."""
    model = WorldModel.load(init, device=device)
    expected = model.stream_names + add_streams
    if list(world.stem_names) != expected:
        raise ConfigError(f"init={init} has streams {model.stream_names} and add_streams={add_streams}: the world must "
                          f"give stems {expected} in that order (e.g. world.stems=[{','.join(expected)}])")
    if like is not None and not add_streams:
        raise ConfigError(f"add_streams_like={like} needs add_streams=[...]: the streams to start as copies of it")
    model.dynamics.shrink_and_perturb(shrink, perturb)
    for name in add_streams:
        model.dynamics.add_stream(name, like=like)
    model.world = world_cfg
    return model.to(device)


def action_targets(events: torch.Tensor, stride: int, num_actions_steps: int) -> np.ndarray:
    """Ground truth each action should explain: action j explains patch j → j+1, so the label is the event (of
    any stem, combined) that starts in patch j+1. (N, S, T) events → (N, J) labels."""
    events = events.numpy() if torch.is_tensor(events) else events
    N, S, T = events.shape
    combined = np.zeros((N, T), dtype=np.int64)
    base = 1
    for s in range(S):  # a mixed-radix code so that simultaneous events on different stems stay distinct
        combined += events[:, s] * base
        base *= int(events[:, s].max(initial=0)) + 1
    J = num_actions_steps
    labels = np.zeros((N, J), dtype=np.int64)
    for j in range(J):
        window = combined[:, (j + 1) * stride : (j + 2) * stride]
        nonzero = np.where(window > 0, window, 0)
        labels[:, j] = nonzero.max(axis=1) if window.shape[1] else 0  # the (highest-coded) event in the patch
    return labels


def train_world(cfg: DictConfig) -> dict:
    """Train (or resume) a world model; returns the final held-out metrics."""
    out = Path(cfg.out)
    trainer = Trainer(cfg)
    try:
        summary = _train(trainer, out, bool(cfg.resume))
        barrier(trainer.dist)  # every rank reaches teardown together (rank 0 writes its summary after the last save)
        return summary
    finally:
        trainer.close()


def _train(trainer: Trainer, out: Path, resume: bool) -> dict:
    main = trainer.dist.is_main  # rank 0 prints, evaluates and writes TensorBoard logs; every rank trains
    if resume:
        resumed = trainer.resume()
        if main:
            print(f"resuming {out} from step {trainer.step}" if resumed else f"nothing to resume in {out}; starting fresh")
    elif (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a checkpoint; pass resume=true to continue it or choose another out=")
    t = trainer.train_cfg
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"), purge_step=trainer.step) if main else None
    start = time.time()
    bar = tqdm(total=t.steps, initial=trainer.step, desc="train-world", dynamic_ncols=True, disable=not main)
    metrics: dict[str, float] = {}
    while trainer.step < t.steps:
        logs = trainer.train_step()
        bar.update(1)
        if writer is not None:
            for key, value in logs.items():
                writer.add_scalar(f"train/{key}", value, trainer.step)
        if main and (trainer.step % t.eval_every == 0 or trainer.step == t.steps):
            metrics = trainer.evaluate()
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, trainer.step)
            trainer.history.append({"step": trainer.step, "seconds": round(time.time() - start, 1), "loss": logs["loss"], **metrics})
            bar.set_postfix(nmi=f"{metrics['action_nmi']:.3f}", ce=f"{metrics['token_ce']:.3f}", loss=f"{logs['loss']:.3f}")
        if trainer.step % t.checkpoint_every == 0 or trainer.step == t.steps:
            trainer.save()
    bar.close()
    summary = {"out": str(out), "steps": trainer.step, "seconds": round(time.time() - start, 1), "processes": trainer.dist.world_size,
               "lam_frozen_at": t.freeze_lam_at if trainer.frozen_at is None else trainer.frozen_at, "merged_codes": trainer.merges,
               "swapped_actions": trainer.swapped_actions, **metrics}
    if main:
        writer.close()
        print(json.dumps(summary))
    return summary
