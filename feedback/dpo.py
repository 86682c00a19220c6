"""`melodjinn personalise store=DIR out=DIR [prior=drums] [listener=NAME] [ratings=N]`: DPO on the action prior.

A listener's A/B answers say which of two continuations of one context they preferred. Direct Preference
Optimisation (TRL's `DPOTrainer`) turns those pairs into a new action prior without a reward model: it raises the
tuned prior's log-ratio against the frozen base prior, log π(chosen)/π_ref(chosen), above the rejected clip's, by a
margin scaled by β (higher β: the tuned prior stays closer to the base). The tuned prior is an ordinary prior
directory, so `PriorPolicy`, the env's prior bonus and the player take it as they take the base.

Read top to bottom:
  1. data: the listener's decided pairs in the store, oldest first (`ratings=N`: the first N, for "how many ratings
     does it take"); the last `train.eval_share` of them are held out;
  2. dataset: each pair as the prior's token text — the prompt is `<bos>` and the first section token (the context
     both clips share), chosen/rejected the rest ` a0 s1 a1 ...`. TRL tokenises it with the prior's own tokenizer
     and appends `<eos>`; the ids are exactly `ActionPrior.encode`'s followed by `<eos>` (tests/test_personalisation.py
     checks it). The loss counts the step actions only (`step_action_collator`): a policy chooses one action per env
     step, the step's other frames are rest codes (or repeats) that the env's hold rule fills in, sections are given
     by the song, and the clip's end is no choice at all — a log-ratio on those would reward the tuned prior for
     re-scoring what no policy decides;
  3. training: `DPOTrainer` with the sigmoid loss, an explicit frozen copy of the base as the reference model, and
     nothing written by the trainer (we save ourselves);
  4. held-out: the implicit-reward accuracy — the share of held-out pairs on which the tuned prior's log-ratio
     against the base is higher for the chosen clip — read with the prior's own action probabilities
     (`ActionPrior.sequence_log_probs`, normalised over actions as `PriorPolicy` samples them); then the tuned
     prior is saved (atomically) with where it came from in its `info`.

Clips longer than the prior's context are cut to their first `context` frames: the prior was trained on windows of
that length, and a DPO sequence is one window.

The recipe (configs/train/dpo.yaml), measured on a simulated snare lover's answers about two samples of the drum
prior (tests/conftest.py `snare_store`; figures in the README):
- 32 pairs a step: with 8, what the tuned prior learned swung with the order of the pairs (its snare share
  0.07-0.28 over three seeds);
- the loss on step actions only (above): it raised an early recipe's win rate from 0.59 to 0.91;
- β 0.05 and 30 steps at lr 1e-3: on 127 answers the tuned prior wins 0.95-1.0 against the base and the swapped-label
  control 0.05-0.13; on 64, 0.75-0.81 against 0.52-0.63: with few answers the control's music also gets more snare,
  and the preference is the gap (perhaps because DPO on samples of the base moves mass to rarer actions whichever
  way the labels point; not measured).
  With Adam, the step budget rather than β is what keeps the tuned prior near the base; a likelihood term on the
  chosen clips (TRL's `sft` loss) did not help.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from melodjinn.agents.pretrained import quiet_transformers
from melodjinn.agents.prior import ActionPrior, load_prior
from melodjinn.feedback.store import PreferencePair, StoredClip, listener_pairs
from melodjinn.feedback.trl_setup import prepare_trl, silence
from melodjinn.world_model.artifacts import CONFIG_FILE, read_json, resolve_checkpoint
from melodjinn.world_model.errors import CheckpointError, ConfigError, DataError
from melodjinn.world_model.runtime import check_schedule, resolve_device, seed_everything, to_dataclass


@dataclass
class DPORecipe:
    beta: float = 0.05  # DPO's β: the log-ratio margin's scale; higher keeps the tuned prior closer to the base
    lr: float = 1e-3  # AdamW peak learning rate (a prior of ~100k parameters barely moves at LLM rates like 1e-6)
    steps: int = 30  # optimiser steps in total
    batch_size: int = 32  # pairs per optimiser step (large batches: the result depends little on the pairs' order)
    warmup_steps: int = 5  # linear warm-up, then linear decay to 0 (the trainer's default schedule)
    weight_decay: float = 0.0  # AdamW weight decay
    eval_share: float = 0.25  # share of the pairs held out for the implicit-reward accuracy (the last ones); 0 = none
    min_train_pairs: int = 8  # fewer training pairs than this is an error: too few to learn a preference from

    def validate(self) -> "DPORecipe":
        check_schedule(self, "train", ("min_train_pairs",))
        if not self.beta > 0:
            raise ConfigError(f"train.beta={self.beta}: must be > 0")
        if not 0 <= self.eval_share < 1:
            raise ConfigError(f"train.eval_share={self.eval_share}: must lie in [0, 1)")
        return self


# ---- 1. data -------------------------------------------------------------------------------------------------------


def split_pairs(pairs: list[PreferencePair], recipe: DPORecipe) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): the last `eval_share` of the pairs are held out."""
    held = int(round(recipe.eval_share * len(pairs)))
    train = len(pairs) - held
    if train < recipe.min_train_pairs:
        raise DataError(f"{len(pairs)} decided pairs leave {train} to train on after holding out {held} "
                        f"(train.eval_share={recipe.eval_share}); DPO needs at least train.min_train_pairs="
                        f"{recipe.min_train_pairs}: record more comparisons, or lower train.eval_share")
    return pairs[:train], pairs[train:]


def check_actions(prior: ActionPrior, pairs: list[PreferencePair]) -> None:
    """The prior must know the actions of the world model that played the clips: compared with that world model's
    action count where its checkpoint (recorded in the pairs' context) is at hand, else with the clips' actions."""
    checkpoint = pairs[0].context.get("checkpoint")
    try:
        world_actions = int(read_json(resolve_checkpoint(checkpoint) / CONFIG_FILE)["config"]["lam"]["num_actions"])
    except (CheckpointError, KeyError, TypeError):
        world_actions = None
    largest = max(int(clip.actions.max()) for pair in pairs for clip in (pair.chosen, pair.rejected))
    if (world_actions is not None and world_actions != prior.num_actions) or largest >= prior.num_actions:
        known = f"the world model {checkpoint} has {world_actions}" if world_actions is not None else f"the clips use up to a{largest}"
        raise ConfigError(f"the prior knows {prior.num_actions} actions but {known}; personalise the prior of the "
                          f"world model the ratings were made with (prior=<that checkpoint>)")


# ---- 2. dataset ----------------------------------------------------------------------------------------------------


def clip_frames(prior: ActionPrior, clip: StoredClip) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip's frame-level actions and sections (J,), cut to the prior's context."""
    return clip.actions[: prior.context], clip.sections[: prior.context]


def preference_rows(prior: ActionPrior, pairs: list[PreferencePair]) -> list[dict[str, str]]:
    """Each pair as DPO text: `prompt` `<bos> s0`, `chosen`/`rejected` ` a0 s1 a1 ...` (TRL appends `<eos>`)."""
    rows = []
    for pair in pairs:
        (a_c, s_c), (a_r, s_r) = clip_frames(prior, pair.chosen), clip_frames(prior, pair.rejected)
        if a_c.shape != a_r.shape or int(s_c[0]) != int(s_r[0]):
            raise DataError(f"answer {pair.answer_id}: its clips differ in length or first section; both continue one "
                            "context, so the store is damaged — restore it from a backup")
        texts = prior.text(torch.stack([a_c, a_r]), torch.stack([s_c, s_r]))  # "<bos> s0 a0 s1 a1 ..." each
        (bos, first, chosen), (_, _, rejected) = (text.split(" ", 2) for text in texts)
        rows.append({"prompt": f"{bos} {first}", "chosen": f" {chosen}", "rejected": f" {rejected}"})
    return rows


def frames_per_step(pairs: list[PreferencePair]) -> int:
    """How many prior frames one env step spans in these clips (J frames for len(step_actions) steps)."""
    spans = {len(clip.actions) // max(len(clip.step_actions), 1) for pair in pairs for clip in (pair.chosen, pair.rejected)}
    if len(spans) != 1 or min(spans) < 1:
        raise DataError(f"the pairs' clips span {sorted(spans)} frames per env step; personalise on ratings made with "
                        "one env setting (a store per frames_per_step)")
    return spans.pop()


def step_action_collator(frames_per_step: int, pad_token_id: int):
    """TRL's preference collator with the loss on the step actions only (see the module docstring)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class StepActionCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)  # input_ids, attention_mask, completion_mask: (2B, L)
            position = torch.arange(batch["input_ids"].shape[1])  # (L,) id j of a sequence is frame (j - 2) / 2's action
            step_action = (position >= 2) & (position % 2 == 0) & ((position - 2) // 2 % frames_per_step == 0)
            batch["completion_mask"] = batch["completion_mask"] * step_action
            return batch

    return StepActionCollator(pad_token_id=pad_token_id)


# ---- 3. training ---------------------------------------------------------------------------------------------------


def dpo_trainer(prior: ActionPrior, pairs: list[PreferencePair], recipe: DPORecipe, seed: int, output_dir: str,
                device: torch.device):
    """A TRL `DPOTrainer` over `pairs` that tunes a copy of `prior` against a frozen copy of it; it writes nothing
    (output_dir only satisfies the trainer)."""
    prepare_trl()
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = copy.deepcopy(prior.model).train()
    reference = copy.deepcopy(prior.model).eval().requires_grad_(False)
    args = DPOConfig(
        output_dir=output_dir, beta=recipe.beta, loss_type=["sigmoid"], learning_rate=recipe.lr,
        max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size, warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay, max_length=None, seed=seed, data_seed=seed,
        bf16=False, use_cpu=device.type == "cpu", activation_checkpointing=False, save_strategy="no", report_to=[],
        logging_strategy="no", dataloader_num_workers=0,
    )
    collator = step_action_collator(frames_per_step(pairs), prior.tokenizer.pad_token_id)
    return silence(DPOTrainer(model=policy, ref_model=reference, args=args,
                              train_dataset=Dataset.from_list(preference_rows(prior, pairs)),
                              processing_class=prior.tokenizer, data_collator=collator))


def tune(prior: ActionPrior, pairs: list[PreferencePair], recipe: DPORecipe, seed: int = 0,
         device: str | torch.device = "cpu") -> ActionPrior:
    """DPO on `pairs` → a new ActionPrior (the base is left as it was). Seeded: same pairs and seed, same prior."""
    seed_everything(seed)
    with tempfile.TemporaryDirectory(prefix="melodjinn-dpo-") as scratch, quiet_transformers():
        trainer = dpo_trainer(prior, pairs, recipe, seed, scratch, torch.device(device))
        trainer.train()
    model = trainer.model.eval()
    return ActionPrior(model, prior.tokenizer, prior.num_actions, prior.context, dict(prior.info))


# ---- 4. held-out metrics -------------------------------------------------------------------------------------------


@torch.no_grad()
def implicit_reward_accuracy(tuned: ActionPrior, reference: ActionPrior, pairs: list[PreferencePair], beta: float) -> dict[str, float]:
    """DPO's implicit reward r = β·log(π_tuned/π_ref) of each clip: the share of pairs where r(chosen) > r(rejected),
    and the mean margin r(chosen) - r(rejected)."""
    if not pairs:
        return {"pairs": 0, "accuracy": None, "mean_margin": None}

    span = frames_per_step(pairs)

    def rewards(clips: list[StoredClip]) -> torch.Tensor:  # (N,)
        actions, sections = (torch.stack(t) for t in zip(*(clip_frames(tuned, clip) for clip in clips)))  # (N, J) each
        log_ratio = tuned.sequence_log_probs(actions, sections) - reference.sequence_log_probs(actions, sections)  # (N, J)
        return beta * log_ratio[:, ::span].sum(1)  # the step actions, as the loss counts them

    margin = rewards([p.chosen for p in pairs]) - rewards([p.rejected for p in pairs])  # (N,)
    return {"pairs": len(pairs), "accuracy": float((margin > 0).float().mean()), "mean_margin": float(margin.mean())}


def personalise_prior(base: ActionPrior, pairs: list[PreferencePair], recipe: DPORecipe, seed: int = 0,
                      device: str | torch.device = "cpu") -> tuple[ActionPrior, dict[str, Any]]:
    """Hold out, tune on the rest, measure → (tuned prior, metrics). What `personalise` and the ratings curve share."""
    check_actions(base, pairs)
    train, held = split_pairs(pairs, recipe)
    started = time.time()
    tuned = tune(base, train, recipe, seed, device)
    metrics = {"train_pairs": len(train), "held_out_pairs": len(held), "seconds": round(time.time() - started, 1),
               "train_accuracy": implicit_reward_accuracy(tuned, base, train, recipe.beta)["accuracy"],
               **{f"held_out_{k}": v for k, v in implicit_reward_accuracy(tuned, base, held, recipe.beta).items() if k != "pairs"}}
    return tuned, metrics


def personalise(cfg: DictConfig) -> dict:
    """The `personalise` command: tune the prior on one listener's ratings, save it to `out`, print one JSON line."""
    recipe = to_dataclass(DPORecipe, cfg.train, "train").validate()
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    base = load_prior(cfg.prior, device)
    if out.resolve() == Path(base.directory).resolve():
        raise ConfigError(f"out={out} is the base prior's own directory ({base.directory}); the tuned prior goes "
                          "beside it, never over it: choose another out=")
    if (out / CONFIG_FILE).exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds an artefact; pass overwrite=true to replace it or choose another out=")
    listener, pairs = listener_pairs(cfg.store, cfg.listener, cfg.ratings)
    tuned, metrics = personalise_prior(base, pairs, recipe, int(cfg.seed), device)
    tuned.info = {
        "world_model": base.info.get("world_model"),
        "personalisation": {"base_prior": str(base.directory), "store": str(cfg.store), "listener": listener,
                            "pairs": len(pairs), "beta": recipe.beta, "steps": recipe.steps, "recipe": asdict(recipe),
                            "seed": int(cfg.seed), "metrics": metrics},
        "resolved_config": OmegaConf.to_container(cfg, resolve=True),
    }
    tuned.save(out)
    summary = {"out": str(out), "listener": listener, "pairs": len(pairs), **metrics}
    print(json.dumps(summary))
    return summary
