"""`melodjinn train-prior checkpoint=DIR out=DIR`: behaviour-clone an action prior on a world model's LAM actions.

Read top to bottom:
  1. data: the LAM's action sequences (with sections) on `data.clips` clips of a world — the checkpoint's own
     world unless `world=...` names another — and on `data.eval_clips` held-out clips from `data.eval_seed`;
     or, with `data.cache=DIR`, on a token cache of real audio (its last `data.eval_share` of windows held out);
  2. model: a small Llama over action and section tokens (agents/prior.py), built from config;
  3. loop: random windows of `prior.context` steps, cross-entropy of each action given what came before
     (sections are inputs, never targets), AdamW with warm-up and cosine decay;
  4. every `eval_every` steps: held-out action perplexity beside the unigram baseline's (action frequencies of
     the training sequences); every `checkpoint_every` steps: the prior (save_pretrained) plus the optimiser
     and RNG state in `out/training/`, so `resume=true` continues a killed run to the same result.

Why the unigram baseline: a prior that only learned how often each action occurs would reach it. Beating it
means the prior learned when actions happen (rhythm, sections) — on worlds whose music has that structure.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from melodjinn.agents.action_sequences import ActionSequences, cache_action_sequences, world_action_sequences
from melodjinn.agents.prior import ActionPrior, PriorModelConfig
from melodjinn.world_model.artifacts import read_json, save_tensors, load_tensors, write_json
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.runtime import check_schedule, resolve_device, seed_everything, to_dataclass
from melodjinn.world_model.optim import load_optimizer_state, lr_at, optimizer_state
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import make_world

TRAINING_DIR = "training"  # optimiser state, progress and TensorBoard logs, beside the prior's files


@dataclass
class PriorDataConfig:
    clips: int = 512  # world clips whose LAM actions are the training sequences (clip i of the world under `seed`)
    eval_clips: int = 64  # held-out clips from `eval_seed`
    eval_seed: int = 1000  # the held-out split's world seed; never used for training
    cache: str | None = None  # a token cache directory (made with the checkpoint's codec) instead of a world
    cache_section: str = "verse"  # the section every cache step gets (a cache holds no song structure)
    window_frames: int = 600  # cache items are read by the LAM in windows of this many frames
    eval_share: float = 0.1  # share of cache windows held out (the last ones)


@dataclass
class TrainPriorConfig:
    steps: int = 1500  # optimiser steps in total
    batch_size: int = 32  # windows of `prior.context` steps per optimiser step
    lr: float = 3e-3  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 100  # linear warm-up, then cosine decay to lr · min_lr_ratio
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    eval_every: int = 250  # held-out perplexity period (steps)
    checkpoint_every: int = 500  # prior + training state period (steps)

    def validate(self) -> TrainPriorConfig:
        check_schedule(self, "train", ("eval_every", "checkpoint_every"))
        return self


def unigram_log_probs(train: ActionSequences) -> torch.Tensor:
    """(A,) log frequencies of the actions in `train`, add-one smoothed so an unseen action is not impossible."""
    counts = torch.from_numpy(train.counts()).double() + 1
    return (counts / counts.sum()).log().float()


@torch.no_grad()
def held_out_perplexity(prior: ActionPrior, held: ActionSequences, unigram: torch.Tensor) -> dict[str, float]:
    """Per-action perplexity of the prior and of the unigram baseline on held-out sequences."""
    nll = count = unigram_nll = 0.0
    for actions, sections in zip(held.actions, held.sections):
        logp = prior.sequence_log_probs(actions[None], sections[None])
        nll -= float(logp.sum())
        unigram_nll -= float(unigram[actions].sum())
        count += len(actions)
    return {"prior_perplexity": math.exp(nll / count), "unigram_perplexity": math.exp(unigram_nll / count),
            "prior_nll": nll / count, "unigram_nll": unigram_nll / count}


def sample_windows(data: ActionSequences, batch_size: int, length: int, generator: torch.Generator):
    """A batch of random windows: actions, sections (B, length) and a mask of real steps (shorter sequences are
    right-padded, which no real step attends to)."""
    actions = torch.zeros(batch_size, length, dtype=torch.long)
    sections = torch.zeros(batch_size, length, dtype=torch.long)
    mask = torch.zeros(batch_size, length)
    picks = torch.randint(len(data), (batch_size,), generator=generator)
    for row, i in enumerate(picks.tolist()):
        seq_len = len(data.actions[i])
        start = int(torch.randint(max(1, seq_len - length + 1), (1,), generator=generator))
        n = min(length, seq_len - start)
        actions[row, :n] = data.actions[i][start : start + n]
        sections[row, :n] = data.sections[i][start : start + n]
        mask[row, :n] = 1
    return actions, sections, mask


def load_sequences(model: WorldModel, cfg: DictConfig, data: PriorDataConfig) -> tuple[ActionSequences, ActionSequences, dict]:
    """Train and held-out action sequences, and a record of where they came from."""
    if data.cache:
        every = cache_action_sequences(model, data.cache, data.window_frames, data.cache_section)
        held_n = max(1, int(round(data.eval_share * len(every))))
        if held_n >= len(every):
            raise ConfigError(f"data.cache={data.cache} gives only {len(every)} windows; need at least 2 to hold one out (shorter data.window_frames?)")
        cut = len(every) - held_n
        split = lambda sl: ActionSequences(every.actions[sl], every.sections[sl], every.num_actions, every.stride)  # noqa: E731
        return split(slice(0, cut)), split(slice(cut, None)), {"cache": str(data.cache), "section": data.cache_section, "windows": len(every)}
    world_cfg = OmegaConf.to_container(cfg.world, resolve=True) if cfg.get("world") else model.world
    if not world_cfg:
        raise ConfigError(f"{cfg.checkpoint} records no world; pass world=drums|songs or data.cache=DIR")
    if data.eval_seed == int(cfg.seed):
        raise ConfigError(f"data.eval_seed={data.eval_seed} equals seed={cfg.seed}; the held-out split must use another seed")
    train = world_action_sequences(model, make_world(world_cfg, seed=int(cfg.seed)), data.clips)
    held = world_action_sequences(model, make_world(world_cfg, seed=data.eval_seed), data.eval_clips)
    return train, held, {"world": world_cfg, "seed": int(cfg.seed), "clips": data.clips, "eval_seed": data.eval_seed}


def train_prior(cfg: DictConfig) -> dict:
    """Train (or resume) an action prior; prints and returns its held-out perplexity beside the unigram's."""
    out = Path(cfg.out)
    state_dir = out / TRAINING_DIR
    data_cfg = to_dataclass(PriorDataConfig, cfg.data, "data")
    model_cfg = to_dataclass(PriorModelConfig, cfg.prior, "prior")
    t = to_dataclass(TrainPriorConfig, cfg.train, "train").validate()
    device = resolve_device(cfg.device)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if (out / "config.json").exists() and not cfg.resume:
        raise ConfigError(f"{out} already holds a prior; pass resume=true to continue it or choose another out=")
    seed_everything(int(cfg.seed))

    # 1. data ----------------------------------------------------------------------------------------------------
    world_model = WorldModel.load(cfg.checkpoint, device=device)
    train, held, source = load_sequences(world_model, cfg, data_cfg)
    unigram = unigram_log_probs(train)
    info = {"world_model": {"checkpoint": str(cfg.checkpoint), "stride": world_model.stride,
                            "lam_sha256": _sha256(world_model.checkpoint_dir / "lam.safetensors")},
            "data": {**source, "train_steps": train.num_steps, "held_out_steps": held.num_steps},
            "resolved_config": resolved}

    # 2. model ---------------------------------------------------------------------------------------------------
    prior = ActionPrior.create(world_model.num_actions, model_cfg, seed=int(cfg.seed), info=info)
    prior.model.to(device)
    opt = torch.optim.AdamW(prior.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    batches = torch.Generator().manual_seed(int(cfg.seed))
    step, history = 0, []
    if cfg.resume and (out / "config.json").exists():
        step, history = _resume(out, prior, opt, batches, resolved, device)
        print(f"resuming {out} from step {step}")
    n_params = sum(p.numel() for p in prior.model.parameters())

    # 3. loop ----------------------------------------------------------------------------------------------------
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(state_dir / "tb"), purge_step=step)
    start = time.time()
    metrics: dict[str, float] = {}
    bar = tqdm(total=t.steps, initial=step, desc="train-prior", dynamic_ncols=True)
    while step < t.steps:
        lr = lr_at(step, t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        actions, sections, mask = sample_windows(train, t.batch_size, model_cfg.context, batches)
        prior.model.train()
        logp = prior.sequence_log_probs(actions.to(device), sections.to(device))  # (B, context)
        loss = -(logp * mask.to(device)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(prior.model.parameters(), t.grad_clip)
        opt.step()
        step += 1
        writer.add_scalar("train/nll", loss.item(), step)
        writer.add_scalar("train/lr", lr, step)
        bar.update(1)
        # 4. evaluation and checkpoints ----------------------------------------------------------------------------
        if step % t.eval_every == 0 or step == t.steps:
            prior.model.eval()
            metrics = held_out_perplexity(prior, held, unigram)
            for key, value in metrics.items():
                writer.add_scalar(f"eval/{key}", value, step)
            history.append({"step": step, "seconds": round(time.time() - start, 1), **metrics})
            bar.set_postfix(ppl=f"{metrics['prior_perplexity']:.4f}", unigram=f"{metrics['unigram_perplexity']:.4f}")
        if step % t.checkpoint_every == 0 or step == t.steps:
            prior.model.eval()
            prior.info.update(step=step, metrics=metrics, train=asdict(t))
            save_tensors(state_dir / "state.safetensors", {**optimizer_state(opt), "rng.batches": batches.get_state(),
                                                           "step": torch.tensor(step)})
            write_json(state_dir / "progress.json", {"step": step, "history": history})
            prior.save(out)  # config.json last: its step names the state that belongs to it
    bar.close()
    writer.close()
    if not cfg.keep_training_files:
        shutil.rmtree(state_dir, ignore_errors=True)
    summary = {"out": str(out), "steps": step, "seconds": round(time.time() - start, 1), "parameters": n_params,
               "train_action_steps": train.num_steps, "held_out_action_steps": held.num_steps, **metrics}
    print(json.dumps(summary))
    return summary


def _resume(out: Path, prior: ActionPrior, opt, batches: torch.Generator, resolved: dict, device) -> tuple[int, list]:
    saved = ActionPrior.load(out, device)
    before = saved.info.get("resolved_config", {})
    differs = [k for k in ("checkpoint", "world", "data", "prior", "seed") if before.get(k) != resolved.get(k)]
    if differs:
        raise CheckpointError(f"cannot resume {out}: its {', '.join(differs)} config differs from this run's; use the same overrides or a new out=")
    state_path = out / TRAINING_DIR / "state.safetensors"
    if not state_path.exists():
        raise CheckpointError(f"{state_path} is missing (trained with keep_training_files=false?); it cannot be resumed, train into a new out=")
    state = load_tensors(state_path)
    if int(state["step"]) != saved.info.get("step"):
        raise CheckpointError(f"{out}: training state (step {int(state['step'])}) does not match the prior (step {saved.info.get('step')}); the run was killed mid-save, re-run without resume")
    prior.model.load_state_dict(saved.model.state_dict())
    load_optimizer_state(opt, state)
    batches.set_state(state["rng.batches"])
    progress = read_json(out / TRAINING_DIR / "progress.json")
    return int(state["step"]), progress["history"]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
