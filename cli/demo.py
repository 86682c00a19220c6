"""`melodjinn demo`: the main job on the built-in default — steer the shipped drum world model.

Loads the shipped world model (`checkpoints/drums`, with its tiny codec), prompts it with a held-out drum clip,
and generates a continuation steered by a scripted pattern of the latent actions the LAM discovered (each action
named by the drum it stands for on held-out audio). Writes the prompt and the steered continuation as WAVs to
`out`, and prints one JSON line with what it did and how well the scripted hits landed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from melodjinn.world_model.audio_io import write_audio
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.evaluation import action_meanings, lam_actions
from melodjinn.world_model.events import DrumHitDetector, event_f1
from melodjinn.world_model.runtime import resolve_device
from melodjinn.world_model.training import action_targets
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import FRAME_RATE, HOP, SAMPLE_RATE, make_world


def demo(cfg: DictConfig) -> dict:
    if not float(cfg.seconds) * FRAME_RATE >= 1:
        raise ConfigError(f"seconds={cfg.seconds}: give a positive length to generate (e.g. seconds=6)")
    if int(cfg.beat_frames) < 1:
        raise ConfigError(f"beat_frames={cfg.beat_frames}: the frames between scripted hits must be 1 or more")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    model = WorldModel.load(cfg.checkpoint, device=device)
    if (model.world or {}).get("name") != "drums":
        raise ConfigError(f"checkpoint={cfg.checkpoint} is not a drum world model; the demo scripts drum hits. For a song "
                          "model use `melodjinn play env.checkpoint=... headless=true out=FILE.wav seconds=S` or `melodjinn eval-world`")
    world = make_world(model.world, seed=int(cfg.eval_seed))
    held = build_world_tensors(world, model.codec, 32, progress=False)
    actions = lam_actions(model, held, device)
    meanings = action_meanings(actions, action_targets(held.events, model.stride, actions.shape[1]), model.num_actions, 0.002)
    by_event = {}
    for action, event in sorted(meanings.items()):
        by_event.setdefault(event, action)
    noop = by_event.get(0, model.null_action)

    P = int(cfg.prompt_frames)
    if not 1 <= P <= held.tokens.shape[-1]:
        raise ConfigError(f"prompt_frames={P}: the prompt comes from one held-out clip; give 1 to {held.tokens.shape[-1]}")
    total = int(float(cfg.seconds) * FRAME_RATE)
    prompt = held.tokens[:1, ..., :P].to(device)
    # a scripted beat: every drum the LAM found, one after another, every `beat_frames` frames
    drums = [by_event[e] for e in sorted(by_event) if e > 0]
    script = torch.full((1, P + total), noop, dtype=torch.long, device=device)
    script[:, :P] = model.frame_actions(torch.from_numpy(actions[:1]).to(device), P + total)[:, :P]
    expected = np.zeros(P + total, dtype=np.int64)
    for i, frame in enumerate(range(P + 4, P + total, int(cfg.beat_frames))):
        if drums:
            script[0, frame - 1] = drums[i % len(drums)]  # a[f-1] is the transition into frame f
            expected[frame] = meanings[drums[i % len(drums)]]
    gen = model.generate(prompt, total, script, temperature=float(cfg.temperature),
                         generator=torch.Generator().manual_seed(int(cfg.seed)), decode=True)
    audio = gen["audio"].sum(1)[0].cpu().numpy()
    detected = DrumHitDetector.for_world(world).detect(audio)
    out.mkdir(parents=True, exist_ok=True)
    write_audio(out / "steered.wav", audio, SAMPLE_RATE)
    write_audio(out / "prompt.wav", held.mix[0, : P * HOP].numpy(), SAMPLE_RATE)
    result = {
        "checkpoint": str(cfg.checkpoint),
        "actions": {str(a): world.drum_names[e - 1] if e > 0 else "none" for a, e in meanings.items()} if hasattr(world, "drum_names") else meanings,
        "seconds": total / FRAME_RATE,
        "scripted_hits": int((expected[P:] > 0).sum()),
        "scripted_hit_f1": event_f1(detected[P:], expected[P : P + len(detected) - P]),
        "wrote": [str(out / "steered.wav"), str(out / "prompt.wav")],
    }
    print(json.dumps(result))
    return result
