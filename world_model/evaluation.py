"""`melodjinn eval-world`: does the world model discover actions, and does it obey them? (DESIGN.md §9)

- action_nmi / action_purity: LAM actions on held-out clips against the ground-truth events they should explain
  (action j ↔ the event starting in patch j+1), actions_used and actions_per_second;
- controllability: inject each used action into held-out contexts, generate, decode, detect the drum hit at the
  injection frame; the action's *meaning* is the event it stands for on real held-out audio (its majority label),
  so a model that ignores actions, or plays the wrong hit, or plays it a frame late, scores low. A model that
  always generates silence scores only on the NOOP action;
- unbidden_hits_per_second: in the same rollouts, NOOP follows the injected action for `noop_frames` frames; hits
  heard there were asked for by no action (a model that plays the world's hit rate whatever the action gets about
  3/s on the default world, one that obeys about 0);
- delta_psnr: Genie's measure — PSNR of the continuation generated with the clip's own LAM actions minus with
  random actions (positive = the actions carry what happens next);
- token_ce: held-out teacher-forced cross-entropy of the dynamics given the LAM's actions (and per stream, and per
  stream on the frames where its events start: `token_ce_<stream>_onsets`); token_ce_null: the same with the null
  action throughout (the dynamics alone, comparable across LAMs);
- token_ce_by_frame: where each stream's token_ce_null lies, per codebook: on the frames where the stream's events
  start, or between them (held notes, decays, rests);
- on the song world, per-section statistics of generated songs against the truth and cross-stream coupling of
  single-pass vs independently generated stems (`song_eval.py`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig

from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.events import DrumHitDetector
from melodjinn.world_model.metrics import contingency, normalized_mutual_info, psnr_db, purity
from melodjinn.world_model.runtime import resolve_device, to_dataclass
from melodjinn.world_model.song_eval import SongEvalConfig, evaluate_songs
from melodjinn.world_model.training import action_targets, heldout_token_ce, summarise_token_ce, token_ce_map
from melodjinn.world_model.world_data import WorldTensors, build_world_tensors
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import FRAME_RATE, HOP, make_world


@dataclass
class EvalWorldConfig:
    eval_seed: int = 1000  # held-out split (must differ from the training seed)
    clips: int = 64  # held-out clips for NMI / token CE
    min_action_share: float = 0.002  # an action counts as used when it explains at least this share of steps
    contexts_per_action: int = 16  # controllability: injections per used action
    context_frames: int = 45  # prompt length before the injected action
    continuation_frames: int = 8  # frames generated after the injection (the hit lands in the first)
    noop_frames: int = 40  # frames of NOOP generated after each injection, where no hit was asked for
    tolerance_frames: int = 1  # the detected hit may be this many frames after the injection frame
    psnr_clips: int = 16  # delta_psnr: clips continued with LAM vs random actions
    psnr_frames: int = 60  # frames generated for delta_psnr
    temperature: float = 0.0  # sampling temperature for evaluation (0 = greedy, deterministic)
    songs: SongEvalConfig = field(default_factory=SongEvalConfig)  # song world only: sections and coupling


@torch.no_grad()
def lam_actions(model: WorldModel, data: WorldTensors, device) -> np.ndarray:
    return torch.cat([model.infer_actions(data.mix[i : i + 64].to(device)) for i in range(0, len(data), 64)]).cpu().numpy()


def action_meanings(actions: np.ndarray, labels: np.ndarray, num_actions: int, min_share: float) -> dict[int, int]:
    """Used action → the ground-truth label it mostly explains on held-out audio."""
    meanings = {}
    total = actions.size
    for a in range(num_actions):
        mask = actions == a
        if mask.sum() >= max(1, min_share * total):
            values, counts = np.unique(labels[mask], return_counts=True)
            meanings[a] = int(values[counts.argmax()])
    return meanings


@torch.no_grad()
def controllability(model: WorldModel, world, meanings: dict[int, int], cfg: EvalWorldConfig, device) -> dict:
    """Inject each used action after a held-out context; detect which drum starts at the injection frame."""
    detector = DrumHitDetector.for_world(world)
    noop = next((a for a, label in meanings.items() if label == 0), model.null_action)
    # coarse actions (stride s) explain a whole patch: inject for the s frames of a patch-aligned one, look for the
    # hit anywhere in it (plus the tolerance)
    s = model.stride
    P = max(s, cfg.context_frames // s * s)
    quiet_from = s + cfg.tolerance_frames  # frames after P where the injected hit may no longer land
    G = max(cfg.continuation_frames, quiet_from + 1, quiet_from + cfg.noop_frames)
    held = _quiet_contexts(world, model.codec, cfg.contexts_per_action, P)
    prompt = held.tokens[:, :, :, :P].to(device)  # (C, S, K, P)
    prompt_actions = model.frame_actions(model.infer_actions(held.mix[:, : P * HOP].to(device)), P)
    results, exact, unbidden = {}, {}, {}
    for action, meaning in sorted(meanings.items()):
        actions = torch.full((len(prompt), P + G), noop, dtype=torch.long, device=device)
        actions[:, :P] = prompt_actions
        actions[:, P - 1 : P - 1 + s] = action  # a[P-1] is the transition into frame P: the injected event starts at P
        gen = torch.Generator(device="cpu").manual_seed(action)
        out = model.generate(prompt, G, actions, held.sections[:, : P + G].to(device), temperature=cfg.temperature,
                             generator=gen, decode=True)
        audio = out["audio"].sum(1).cpu().numpy()  # (C, N)
        detected = detector.detect(audio)  # (C, T)
        hits, on_time = 0, 0
        for row in detected:
            window = row[P : P + s + cfg.tolerance_frames]  # the action can cause nothing before frame P
            found = int(next((e for e in window if e > 0), 0))
            hits += found == meaning
            on_time += int(next((e for e in row[P : P + s] if e > 0), 0)) == meaning
        results[action] = hits / len(detected)
        exact[action] = on_time / len(detected)
        unbidden[action] = float((detected[:, P + quiet_from : P + G] > 0).sum(1).mean()) * FRAME_RATE / (G - quiet_from)
    return {
        "controllability": _balanced_over_events(results, meanings, world.num_events),
        "controllability_exact_frame": _balanced_over_events(exact, meanings, world.num_events),
        "unbidden_hits_per_second": float(np.mean(list(unbidden.values()))) if unbidden else 0.0,
        "per_action": {str(a): {"event": meanings[a], "accuracy": round(results[a], 3),
                                "unbidden_hits_per_second": round(unbidden[a], 3)} for a in results},
    }


def _quiet_contexts(world, codec, count: int, prompt_frames: int, quiet_frames: int = 3) -> WorldTensors:
    """Held-out clips whose last `quiet_frames` prompt frames start no event, so a hit found at the injection
    frame cannot be the prompt's own (the detector merges hits closer than its minimum gap)."""
    chosen, index = [], 0
    while len(chosen) < count:
        clip = world.clip(index)
        if not clip.events[:, prompt_frames - quiet_frames : prompt_frames + 1].any():
            chosen.append(index)
        index += 1
    data = build_world_tensors(_Subset(world, chosen), codec, count, progress=False)
    return data


class _Subset:
    """The clips `indices` of `world`, renumbered 0..n-1."""

    def __init__(self, world, indices: list[int]):
        self.world, self.indices = world, indices
        self.name, self.seed, self.stem_names = world.name, world.seed, world.stem_names

    def clip(self, index: int):
        return self.world.clip(self.indices[index])


def _balanced_over_events(accuracy: dict[int, float], meanings: dict[int, int], num_events: int) -> float:
    """Mean over every ground-truth event (NOOP included) of the accuracy of the actions that mean it; an event
    no action stands for scores 0. So silence-only generation cannot score on the many actions meaning NOOP."""
    per_event = []
    for event in range(num_events):
        scores = [accuracy[a] for a, e in meanings.items() if e == event and a in accuracy]
        per_event.append(float(np.mean(scores)) if scores else 0.0)
    return float(np.mean(per_event))


@torch.no_grad()
def delta_psnr(model: WorldModel, data: WorldTensors, actions: np.ndarray, used: list[int], cfg: EvalWorldConfig, device) -> dict:
    n = min(cfg.psnr_clips, len(data))
    T = data.tokens.shape[-1]
    P = max(1, T - cfg.psnr_frames)
    tokens = data.tokens[:n].to(device)
    own = model.frame_actions(torch.from_numpy(actions[:n]).to(device), T)
    rng = torch.Generator().manual_seed(0)
    pool = torch.tensor(used or list(range(model.num_actions)))
    random = model.frame_actions(pool[torch.randint(len(pool), actions[:n].shape, generator=rng)].to(device), T)
    random[:, : P - 1] = own[:, : P - 1]  # same prompt actions; only the continuation's differ
    reference = data.mix[:n, P * HOP :].numpy()
    scores = {}
    for name, acts in (("lam", own), ("random", random)):
        out = model.generate(tokens[..., :P], T - P, acts, data.sections[:n].to(device), temperature=cfg.temperature,
                             generator=torch.Generator().manual_seed(1), decode=True)
        audio = out["audio"].sum(1)[:, P * HOP :].cpu().numpy()
        scores[name] = float(np.mean([psnr_db(a, r) for a, r in zip(audio, reference)]))
    return {"psnr_lam_actions": scores["lam"], "psnr_random_actions": scores["random"], "delta_psnr": scores["lam"] - scores["random"]}


def token_ce_by_frame(ce: torch.Tensor, events: torch.Tensor, names: list[str]) -> dict[str, dict]:
    """Where each stream's held-out token CE lies, from a `token_ce_map` (N, S, K, T) and the clips' events (N, S, T):
    {stream: {"onsets" | "between": {"frames": share of the stream's frames, "ce_per_codebook": [K] mean nats,
    "ce_share": share of the stream's CE}}}. "onsets" are the frames where one of the stream's events starts,
    "between" the rest. On the song world most of a tonal stem's CE is between its onsets, in the residual
    codebooks: which code a held note's spectrum takes next."""
    onsets = events > 0  # (N, S, T)
    out = {}
    for s, name in enumerate(names):
        stream_ce = ce[:, s]  # (N, K, T)
        kinds = {}
        for kind, mask in (("onsets", onsets[:, s]), ("between", ~onsets[:, s])):
            frames = int(mask.sum())
            if frames == 0:
                continue
            masked = stream_ce * mask[:, None]  # (N, K, T)
            kinds[kind] = {"frames": frames / mask.numel(),
                           "ce_per_codebook": [float(v) for v in masked.sum((0, 2)) / frames],
                           "ce_share": float(masked.sum() / stream_ce.sum())}
        out[name] = kinds
    return out


@torch.no_grad()
def evaluate(model: WorldModel, world_cfg, cfg: EvalWorldConfig, device="cpu") -> dict:
    model.eval()
    world = make_world(world_cfg, seed=cfg.eval_seed)
    data = build_world_tensors(world, model.codec, cfg.clips, progress=False)
    actions = lam_actions(model, data, device)  # (N, J)
    labels = action_targets(data.events, model.stride, actions.shape[1])
    meanings = action_meanings(actions, labels, model.num_actions, cfg.min_action_share)
    null_ce = token_ce_map(model, data, None, device)  # (N, S, K, T): the dynamics alone, two summaries of it below
    result = {
        "action_nmi": normalized_mutual_info(actions, labels),
        "action_purity": purity(actions, labels),
        "actions_used": len(meanings),
        "actions_per_second": FRAME_RATE / model.stride,
        **heldout_token_ce(model, data, torch.from_numpy(actions), device),
        **summarise_token_ce(null_ce, data.events, model.stream_names, "token_ce_null"),
        "token_ce_by_frame": token_ce_by_frame(null_ce, data.events, model.stream_names),
        "action_table": contingency(actions, labels).tolist(),
    }
    if world_cfg["name"] == "drums":
        result.update(controllability(model, world, meanings, cfg, device))
    elif world_cfg["name"] == "songs":
        result.update(evaluate_songs(model, world_cfg, cfg.songs, cfg.eval_seed, device))
    result.update(delta_psnr(model, data, actions, sorted(meanings), cfg, device))
    return result


def eval_world(cfg: DictConfig) -> dict:
    device = resolve_device(cfg.device)
    eval_cfg = to_dataclass(EvalWorldConfig, cfg.eval, "eval")
    model = WorldModel.load(cfg.checkpoint, device=device)
    world_cfg = model.world
    if not world_cfg:
        raise ConfigError(f"{cfg.checkpoint} records no world; it cannot be evaluated on synthetic ground truth")
    if eval_cfg.eval_seed == model.meta.get("resolved_config", {}).get("seed"):
        raise ConfigError(f"eval.eval_seed={eval_cfg.eval_seed} is the training seed; choose a held-out seed")
    result = {"checkpoint": str(cfg.checkpoint), **evaluate(model, world_cfg, eval_cfg, device)}
    print(json.dumps(result))
    return result
