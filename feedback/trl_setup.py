"""What TRL's trainers need on a machine with no network and a command that prints one JSON line."""

from __future__ import annotations

import os
import warnings


def prepare_trl() -> None:
    """Call before TRL is first imported. Nothing is downloaded (every model and tokenizer here is built locally;
    huggingface_hub reads HF_HUB_OFFLINE when imported), and a deprecation TRL's trainers trigger inside
    transformers is not shown to users, who can do nothing about it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def silence(trainer):
    """Drop the trainer's console callbacks: transformers prints its logs (the final metrics dict among them) to
    stdout, where a command's result line goes. Metrics come back from `trainer.train()` all the same."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    return trainer
