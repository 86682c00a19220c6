"""Listening sessions: from one context, two continuations (A/B); a listener answers; the answer is stored at once.

    sampler = ContinuationSampler("drums", steps=32)
    with PreferenceStore("ratings/") as store:
        listening_session(sampler, base_policy, base_policy, listener, store, comparisons=20, seed=0)

`ContinuationSampler` is a two-row `MusicVectorEnv` whose rows get the same seed, so both continuations start from
the same prompt (and share the sampling draws until their actions differ); row 0 is driven by the policy for A,
row 1 by the one for B. Each clip carries what the models need later: the codec tokens (reward model) and the
frame-level actions with their sections (the action prior's DPO), beside the audio the listener heard.

Which policy plays on which side is drawn per comparison, so a listener who always answers "A" favours neither;
the store records the policy behind each side.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from melodjinn.agents.policies import PriorPolicy, PriorScorer, frame_actions, load_policy
from melodjinn.agents.prior import load_prior
from melodjinn.envs import MusicVectorEnv
from melodjinn.envs.policies import RandomPolicy
from melodjinn.feedback.listeners import ConsoleListener, EndSession, Listener, SimulatedListener, ask, make_utility
from melodjinn.feedback.store import CHOICES, Clip, Comparison, PreferenceStore
from melodjinn.world_model.artifacts import CONFIG_FILE, read_json, weights_hash
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.worlds import make_world


class ContinuationSampler:
    """Pairs of continuations of one context from a world model (see the module docstring)."""

    def __init__(self, checkpoint: str, steps: int = 32, **env_options: Any):
        self.checkpoint = str(checkpoint)
        self.env = MusicVectorEnv(num_envs=2, checkpoint=self.checkpoint, max_steps=int(steps),
                                  **{**env_options, "decode_audio": True})
        self.core = self.env.core
        self.steps = int(steps)
        self.checkpoint_hash = weights_hash(self.checkpoint)

    @property
    def num_actions(self) -> int:
        return self.core.A

    def pair(self, context_seed: int, policy_a, policy_b, labels: tuple[str, str] = ("a", "b"),
             section: Optional[str] = None) -> tuple[np.ndarray, Clip, Clip]:
        """One context (the prompt drawn by `context_seed`), continued `steps` steps by each policy →
        (the prompt's audio (N,), clip A, clip B). The policies act on the env's batched observation and reseed with
        `reset(seed)` (`BasePolicy`: every policy Melodjinn ships); one policy object may play both rows."""
        options = {"section": section} if section is not None else None
        obs, _ = self.env.reset(seed=[int(context_seed)] * 2, options=options)
        prompt_audio = self._prompt_audio()
        for policy, seed in ((policy_a, context_seed), (policy_b, context_seed + 1)):
            policy.reset(seed)  # one policy playing both rows ends seeded context_seed + 1
        step_actions, step_sections, audio = [], [], []
        for _ in range(self.steps):
            act_a = np.asarray(policy_a.act(obs)).reshape(-1)
            act_b = act_a if policy_b is policy_a else np.asarray(policy_b.act(obs)).reshape(-1)
            actions = np.array([act_a[0], act_b[-1]], dtype=np.int64)
            step_actions.append(actions)
            step_sections.append(np.asarray(obs["section"]).reshape(-1).copy())
            obs, _, _, _, info = self.env.step(actions)
            audio.append(info["audio"])  # (2, F·HOP): the streaming decoder carries the codec's state
        steps = torch.as_tensor(np.stack(step_actions, 1))  # (2, steps)
        cfg = self.env.config
        frames = frame_actions(steps, cfg.frames_per_step, cfg.action_hold, int(self.core.rest[0]))  # (2, J)
        sections = torch.as_tensor(np.stack(step_sections, 1)).repeat_interleave(cfg.frames_per_step, 1)  # (2, J)
        tokens = self.core.episode_tokens().cpu()  # (2, S, K, T)
        audio = np.concatenate(audio, 1)  # (2, steps·F·HOP)
        clips = [Clip(audio[i], tokens[i], frames[i], sections[i], steps[i].tolist(), labels[i]) for i in range(2)]
        return prompt_audio, clips[0], clips[1]

    def _prompt_audio(self) -> np.ndarray:
        """(N,) the context both continuations follow: the prompt frames before the episode, decoded."""
        s, core = self.core.session, self.core
        episode = core.episode_start - s.offset  # session index of the first generated frame
        return core.model.decode(s.tokens[:1, ..., :episode], start_frame=s.offset).sum(1)[0].float().cpu().numpy()


@dataclass
class SessionSummary:
    session: str
    listener: str
    answered: int  # rows written (every answer, skips included)
    counts: dict[str, int]  # answers by choice
    wins: dict[str, int]  # decided answers won by each policy label


def listening_session(sampler: ContinuationSampler, policy_a, policy_b, listener: Listener, store: PreferenceStore,
                      comparisons: int, seed: int = 0, labels: tuple[str, str] = ("a", "b"),
                      listener_name: Optional[str] = None, section: Optional[str] = None,
                      session: Optional[str] = None) -> SessionSummary:
    """Ask `listener` about `comparisons` fresh contexts, each answer written to `store` before the next pair is
    generated; a listener raising `EndSession` ends it early. Contexts and sides are drawn from `seed`: the same
    seed gives the same contexts."""
    if comparisons < 1:
        raise ConfigError(f"comparisons must be >= 1, got {comparisons}")
    if labels[0] == labels[1] and policy_a is not policy_b:
        raise ConfigError(f"two different policies need different labels, got {labels}")
    name = listener_name or getattr(listener, "name", None) or "listener"
    session = session or uuid.uuid4().hex[:12]
    rng = np.random.default_rng(seed)
    counts = {choice: 0 for choice in CHOICES}
    wins = {label: 0 for label in labels}
    for index in range(int(comparisons)):
        context_seed = int(rng.integers(2**31 - 1))
        swap = bool(rng.integers(2))
        first, second = (policy_b, policy_a) if swap else (policy_a, policy_b)
        shown = (labels[1], labels[0]) if swap else labels
        prompt_audio, clip_a, clip_b = sampler.pair(context_seed, first, second, shown, section)
        context = {"checkpoint": sampler.checkpoint, "context_seed": context_seed, "steps": sampler.steps,
                   "section": section}
        comparison = Comparison(session, index, context, clip_a, clip_b, prompt_audio)
        try:
            answer = ask(listener, comparison)
        except EndSession:
            break
        store.record(comparison, answer.choice, name, sampler.checkpoint_hash, answer.latency_s, answer.replays)
        counts[answer.choice] += 1
        if answer.choice in ("A", "B"):
            wins[shown[0] if answer.choice == "A" else shown[1]] += 1
    return SessionSummary(session, name, sum(counts.values()), counts, wins)


# ---- `melodjinn rate` ---------------------------------------------------------------------------------------------


def prior_policy(prior, sampler: ContinuationSampler, temperature: float = 1.0):
    """An action prior sampled at `temperature`, matched to the sampler's env (its step length, hold rule, rest code)."""
    return PriorPolicy(PriorScorer.for_env(prior, sampler.env), temperature)


def session_policy(spec: Optional[str], sampler: ContinuationSampler, temperature: float):
    """What plays one side: None or "prior" = the world model's own action prior, "random" = uniform over the codes
    the LAM uses, a directory = an action prior (e.g. a `personalise` output) or any saved policy. → (policy, label)"""
    if spec in (None, "prior"):
        return prior_policy(load_prior(sampler.checkpoint), sampler, temperature), "prior"
    if spec == "random":
        return RandomPolicy(sampler.num_actions, actions=sampler.core.prompts.used_codes()), "random"
    path = Path(spec)
    if not (path / CONFIG_FILE).exists():
        raise ConfigError(f"policy {spec!r} is neither 'prior', 'random' nor a directory holding {CONFIG_FILE}")
    if read_json(path / CONFIG_FILE).get("kind") == "policy":
        return load_policy(path), str(path)
    return prior_policy(load_prior(path), sampler, temperature), str(path)


def rate(cfg) -> dict[str, Any]:
    """`melodjinn rate store=DIR`: a listening session (configs/rate.yaml); every answer is on disk at once."""
    sampler = ContinuationSampler(cfg.checkpoint, steps=int(cfg.steps))
    policy_a, label_a = session_policy(cfg.policy_a, sampler, float(cfg.temperature))
    if cfg.policy_b == cfg.policy_a:  # one policy sampled twice: its two rows draw independently
        policy_b, label_b = policy_a, label_a
    else:
        policy_b, label_b = session_policy(cfg.policy_b, sampler, float(cfg.temperature))
    who = cfg.listener
    if who.kind == "simulated":
        world = make_world(sampler.core.model.world) if sampler.core.model.world.get("name") else None
        listener = SimulatedListener(make_utility(str(who.preference), world), float(who.temperature),
                                     float(who.tie_margin), int(cfg.seed), who.name)
    elif who.kind == "console":
        listener = ConsoleListener(who.name or os.environ.get("USER", "listener"), bool(who.headless), who.clips_dir)
    else:
        raise ConfigError(f"listener.kind must be 'console' or 'simulated', got {who.kind!r}")
    with PreferenceStore(cfg.store) as store:
        summary = listening_session(sampler, policy_a, policy_b, listener, store, int(cfg.comparisons), int(cfg.seed),
                                    (label_a, label_b), section=cfg.section)
        result = {**asdict(summary), "store": str(cfg.store), "stored_answers": len(store)}
    print(json.dumps(result))
    return result
