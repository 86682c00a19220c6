"""Personalisation from listeners' A/B ratings.

    listening session ──► preference store ──┬─► reward model (TRL RewardTrainer) ──► PreferenceReward for PPO
    (sessions.py,          (store.py: SQLite   │    (reward_model.py)
     listeners.py)          + clip files)      └─► DPO on the action prior (TRL DPOTrainer; dpo.py)
                                                         └─► win rate under the listener's preference (evaluation.py)

- `sessions.py`: from one context, two continuations (a two-row env sharing the prompt); the listener answers;
  `melodjinn rate` runs a session from the command line.
- `listeners.py`: a person at the console (sounddevice playback, or headless WAV files), or a simulated listener
  with a hidden preference — how the loop is tested without people.
- `store.py`: every answer committed to SQLite the moment it is given, with the clips heard.
- `reward_model.py`, `dpo.py`, `evaluation.py`: what is learned from the answers, and how it is judged.

Data flows one way: feedback uses agents, envs and world_model; none of them imports feedback.
"""
