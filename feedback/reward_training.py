"""`melodjinn train-reward store=DIR out=DIR`: train a reward model on a listener's A/B answers (TRL RewardTrainer).

Read top to bottom:
  1. data: the decided answers of one listener in a preference store (`ratings` caps how many, oldest first), as
     chosen/rejected clips; the last `eval_share` of them are held out. The codec shape (S, K, V) comes from the
     world model that generated the clips (named in each answer's context, or `checkpoint=`);
  2. model: a small Llama sequence classifier over codec-token words (feedback/reward_model.py), built from config;
  3. training: TRL's `RewardTrainer` on the pairs as chosen/rejected text, loss −log σ(r(chosen) − r(rejected));
     AdamW with warm-up and cosine decay, seeded, on the CPU unless `device` names a GPU. The trainer saves
     nothing (save_strategy "no") and reports nowhere; the reward model is saved here, atomically;
  4. evaluation: pair accuracy — the share of pairs whose chosen clip scores above the rejected one — on the
     training pairs and on the held-out ones. Prints one JSON line.

Why held-out pair accuracy and what it can reach: a listener who answers by a noisy rule (people do; simulated
listeners answer by Bradley-Terry at some temperature) caps it below 1 — at the share of answers that agree with
their own hidden preference. Chance is 0.5; a handful of held-out pairs makes it a coarse figure.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from melodjinn.agents.pretrained import quiet_transformers
from melodjinn.feedback.reward_model import RewardModel, RewardModelConfig
from melodjinn.feedback.store import PreferencePair, listener_pairs
from melodjinn.feedback.trl_setup import prepare_trl, silence
from melodjinn.world_model.artifacts import CONFIG_FILE, load_artifact_config
from melodjinn.world_model.errors import ConfigError, DataError
from melodjinn.world_model.runtime import resolve_device, seed_everything, to_dataclass


@dataclass
class TrainRewardConfig:
    epochs: int = 30  # passes over the training pairs
    batch_size: int = 8  # pairs per optimiser step
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # share of steps spent warming up, then cosine decay to 0
    grad_clip: float = 1.0  # global gradient-norm clip
    center_rewards: float = 0.01  # weight of mean(r²) that keeps scores near zero (TRL's center_rewards_coefficient; 0 = off)


def codec_shape(checkpoint: str) -> tuple[int, int, int]:
    """(S, K, V) of the world model a store's clips came from, read from its config.json (no weights loaded)."""
    dynamics = load_artifact_config(checkpoint, "world-model")["config"]["dynamics"]
    return len(dynamics["streams"]), int(dynamics["num_codebooks"]), int(dynamics["codebook_size"])


def clip_checkpoint(pairs: list[PreferencePair], override: str | None) -> str:
    """The world model that generated the clips: `override`, or the one every answer's context names."""
    if override:
        return str(override)
    named = sorted({str(p.context.get("checkpoint")) for p in pairs})
    if len(named) != 1 or named[0] == "None":
        raise DataError(f"the answers name {len(named)} world models ({', '.join(named)}) as the clips' source; "
                        "pass checkpoint=DIR (the world model whose codec made the tokens) or train on one listener's session")
    return named[0]


def pair_accuracy(reward: RewardModel, pairs: list[PreferencePair]) -> float | None:
    """Share of pairs whose chosen clip scores above the rejected one (None without pairs, e.g. eval_share=0)."""
    if not pairs:
        return None
    chosen = reward.score(stack_clips([p.chosen.tokens for p in pairs]))
    rejected = reward.score(stack_clips([p.rejected.tokens for p in pairs]))
    return float(np.mean(chosen > rejected))


def stack_clips(clips: list) -> np.ndarray:
    """(S, K, T) clips of one length → (B, S, K, T); clips of different lengths are a DataError."""
    lengths = sorted({int(c.shape[-1]) for c in clips})
    if len(lengths) > 1:
        raise DataError(f"the store's clips have different lengths ({lengths} frames); train on one session's answers")
    return np.stack([c.numpy() for c in clips])


def preference_dataset(reward: RewardModel, pairs: list[PreferencePair]):
    """The pairs in TRL's standard preference format: {"chosen": text, "rejected": text} (texts end in <eos>, so
    TRL adds none)."""
    from datasets import Dataset

    return Dataset.from_dict({"chosen": reward.text(stack_clips([p.chosen.tokens for p in pairs])),
                              "rejected": reward.text(stack_clips([p.rejected.tokens for p in pairs]))})


def reward_trainer(reward: RewardModel, pairs: list[PreferencePair], t: TrainRewardConfig, seed: int, use_cpu: bool,
                   output_dir: str):
    """TRL's RewardTrainer set up for this machine: no bf16, no saving, no reporting, no activation checkpointing."""
    prepare_trl()
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(
        output_dir=output_dir, num_train_epochs=t.epochs, per_device_train_batch_size=t.batch_size,
        learning_rate=t.lr, weight_decay=t.weight_decay, warmup_steps=t.warmup_ratio, lr_scheduler_type="cosine",
        max_grad_norm=t.grad_clip, center_rewards_coefficient=t.center_rewards or None, seed=seed, data_seed=seed,
        bf16=False, save_strategy="no", report_to=[], use_cpu=use_cpu, activation_checkpointing=False,
        max_length=None, logging_strategy="no", dataloader_num_workers=0,
    )
    return silence(RewardTrainer(model=reward.model, args=args, train_dataset=preference_dataset(reward, pairs),
                                 processing_class=reward.tokenizer))


def train_reward(cfg: DictConfig) -> dict:
    """Train a reward model on one listener's answers; prints and returns its pair accuracies."""
    out = Path(cfg.out)
    model_cfg = to_dataclass(RewardModelConfig, cfg.model, "model")
    t = to_dataclass(TrainRewardConfig, cfg.train, "train")
    if (out / CONFIG_FILE).exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a model; pass overwrite=true to replace it or choose another out=")
    if not 0 <= float(cfg.eval_share) < 1:
        raise ConfigError(f"eval_share must lie in [0, 1), got {cfg.eval_share}")
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed))

    # 1. data ----------------------------------------------------------------------------------------------------
    listener, pairs = listener_pairs(cfg.store, cfg.listener, cfg.ratings)
    held_n = int(round(float(cfg.eval_share) * len(pairs)))
    train, held = pairs[: len(pairs) - held_n], pairs[len(pairs) - held_n :]
    if len(train) < 2:
        raise DataError(f"{cfg.store}: listener {listener!r} has {len(pairs)} decided answers ({held_n} held out); "
                        "a reward model needs at least 2 to train on — rate more comparisons")
    checkpoint = clip_checkpoint(pairs, cfg.checkpoint)
    streams, num_codebooks, codebook_size = codec_shape(checkpoint)
    frames = int(pairs[0].chosen.tokens.shape[-1])
    info = {"store": str(cfg.store), "listener": listener, "world_model": checkpoint, "frames": frames,
            "pairs": {"train": len(train), "held_out": len(held), "answer_ids": [p.answer_id for p in pairs]},
            "resolved_config": OmegaConf.to_container(cfg, resolve=True)}

    # 2. model ---------------------------------------------------------------------------------------------------
    reward = RewardModel.create(streams, num_codebooks, codebook_size, model_cfg, seed=int(cfg.seed), info=info)
    for pair in pairs:  # a clip from another codec fails here with a clear message, before any training
        reward.check(pair.chosen.tokens[None]), reward.check(pair.rejected.tokens[None])
    n_params = sum(p.numel() for p in reward.model.parameters())

    # 3. training ------------------------------------------------------------------------------------------------
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="melodjinn-reward-") as scratch, quiet_transformers():  # TRL wants an output_dir; it stays empty
        trainer = reward_trainer(reward, train, t, int(cfg.seed), use_cpu=device.type == "cpu", output_dir=scratch)
        result = trainer.train()
    reward.model = trainer.model.eval()
    seconds = time.time() - start

    # 4. evaluation ----------------------------------------------------------------------------------------------
    metrics = {"train_accuracy": pair_accuracy(reward, train), "held_out_accuracy": pair_accuracy(reward, held),
               "train_loss": float(result.training_loss)}
    reward.info.update(metrics=metrics, train=asdict(t))
    reward.save(out)
    summary = {"out": str(out), "listener": listener, "train_pairs": len(train), "held_out_pairs": len(held),
               "parameters": n_params, "steps": int(result.global_step), "seconds": round(seconds, 1), **metrics}
    print(json.dumps(summary))
    return summary
