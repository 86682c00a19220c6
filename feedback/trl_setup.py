"""What TRL's trainers need on a machine with no network and a command that prints one JSON line."""

from __future__ import annotations

import os


def offline() -> None:
    """Nothing is downloaded: every model and tokenizer here is built locally. Set before TRL (and through it
    huggingface_hub) is first imported, as the hub reads it then."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def silence(trainer):
    """Drop the trainer's console callbacks: transformers prints its logs (the final metrics dict among them) to
    stdout, where a command's result line goes. Metrics come back from `trainer.train()` all the same."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer
