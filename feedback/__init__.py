"""Personalisation from listeners' A/B ratings (reward model and DPO with TRL): not built yet.

The env already takes a learned preference score as its reward (`melodjinn.envs.PreferenceReward`).
"""
