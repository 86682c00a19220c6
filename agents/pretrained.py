"""Artefacts that transformers writes: a small model built from config and its local tokenizer.

The action prior (agents/prior.py) and the reward model (feedback/reward_model.py) are both. A directory holds what
`save_pretrained` writes — `config.json` (the transformers config plus a `melodjinn` entry: the artefact kind, the
code version, and whatever the artefact records about itself), `model.safetensors`, `tokenizer.json`,
`tokenizer_config.json` — each file renamed into place atomically, config.json last, so a directory whose config.json
exists is complete. Loading checks the kind, the format and the files before transformers reads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from melodjinn.world_model.artifacts import CONFIG_FILE, FORMAT_VERSION, atomic_files, code_version, read_json
from melodjinn.world_model.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "tokenizer.json")


class quiet_transformers:
    """transformers shows progress bars for single-file saves and loads, and datasets (under TRL's trainers) for
    every map over a few dozen rows; they would drown our own output."""

    def __enter__(self):
        from datasets.utils import logging as datasets_logging
        from transformers.utils import logging

        self._was = logging.is_progress_bar_enabled(), datasets_logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        datasets_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from datasets.utils import logging as datasets_logging
        from transformers.utils import logging

        if self._was[0]:
            logging.enable_progress_bar()
        if self._was[1]:
            datasets_logging.enable_progress_bar()


def save_pretrained(directory: str | Path, model, tokenizer, kind: str, meta: dict[str, Any]) -> Path:
    """Write `model` and `tokenizer` into `directory` with `kind` and `meta` in config.json's `melodjinn` entry."""
    directory = Path(directory)
    model.config.melodjinn = {"kind": kind, "code": code_version(), **meta}
    with quiet_transformers(), atomic_files(directory) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return directory


def pretrained_meta(directory: str | Path, kind: str, what: str, remedy: str) -> dict[str, Any]:
    """The `melodjinn` entry of a `kind` artefact's config.json, after checking the directory is one and is
    complete; errors name `what` it should be and the `remedy` (e.g. the command that makes one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{what} {directory} does not exist; {remedy}")
    meta = read_json(directory / CONFIG_FILE).get("melodjinn") or {}
    if meta.get("kind") != kind:
        raise CheckpointError(f"{directory} is not {what} (its config.json has kind {meta.get('kind')!r}, expected "
                              f"{kind!r}); {remedy}")
    if meta.get("code", {}).get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written with artefact format {meta.get('code', {}).get('format')}, "
                              f"this code reads {FORMAT_VERSION}; {remedy}")
    for name in WEIGHT_FILES:
        if not (directory / name).exists():
            raise CheckpointError(f"{directory / name} is missing; the directory is incomplete: {remedy}")
    return meta


def load_pretrained(directory: str | Path, model_class) -> tuple[Any, Any]:
    """(model, tokenizer) of a checked directory (see `pretrained_meta`), from safetensors only."""
    from transformers import PreTrainedTokenizerFast

    with quiet_transformers():
        return (model_class.from_pretrained(directory, use_safetensors=True),
                PreTrainedTokenizerFast.from_pretrained(directory))
