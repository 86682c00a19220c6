"""Artefact directories: `config.json` (full resolved config + code version) beside safetensors weights.

Every write goes to a temporary file in the same directory and is renamed into place, so a kill at any moment
leaves either the old file or the new one, never a torn one. Nothing here unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from melodjinn.world_model.errors import CheckpointError

CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def code_version() -> dict[str, Any]:
    """Package version, plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("melodjinn")
    except PackageNotFoundError:
        pkg = "unknown"
    info: dict[str, Any] = {"melodjinn": pkg, "format": FORMAT_VERSION}
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            info["git"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artefacts should be as shareable as any file
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_files(directory: str | os.PathLike, last: str = CONFIG_FILE) -> Iterator[Path]:
    """Yield an empty temporary directory; on success every file written there is renamed into `directory` (each
    rename atomic), `last` after all others, so it marks a complete set as `config.json` does for
    `save_artifact`. For artefacts that other libraries write as several files (`save_pretrained`); files of
    `directory` that are not rewritten (logs, training state) stay."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".write-", suffix=".tmp", dir=directory))
    try:
        yield tmp
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in sorted(names, key=lambda n: n == last):
            os.chmod(tmp / name, 0o666 & ~_umask())
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); restore or re-create it") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint directory is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-create the checkpoint") from None


def weights_hash(directory: str | os.PathLike, skip: tuple[str, ...] = ("prior",)) -> str:
    """SHA-256 over an artefact's safetensors files (names and bytes), skipping the sub-directories in `skip`
    (a world model's `prior/` is its own artefact): what generated a clip, recorded beside a listener's answer."""
    directory = resolve_checkpoint(directory)
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        relative = path.relative_to(directory)
        if relative.parts[0] in skip:
            continue
        digest.update(str(relative).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_artifact(directory: str | os.PathLike, kind: str, config: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]], extra: dict[str, Any] | None = None) -> Path:
    """Write `<name>.safetensors` for each entry of `tensors`, then `config.json` last (it marks completeness)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, state in tensors.items():
        save_tensors(directory / f"{name}.safetensors", state)
    write_json(directory / CONFIG_FILE, {"kind": kind, "config": config, "code": code_version(), **(extra or {})})
    return directory


def load_artifact_config(directory: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The `config.json` of an artefact directory, checked to be of `kind`."""
    directory = resolve_checkpoint(directory)
    meta = read_json(directory / CONFIG_FILE)
    if meta.get("kind") != kind:
        raise CheckpointError(f"{directory} holds a {meta.get('kind')!r} artefact, expected {kind!r}; point to a {kind} checkpoint")
    fmt = meta.get("code", {}).get("format")
    if fmt != FORMAT_VERSION:
        raise CheckpointError(f"{directory} was written with artefact format {fmt}, this code reads format {FORMAT_VERSION}; re-create it")
    return meta


def shipped_checkpoints_dir() -> Path:
    return Path(str(resources.files("melodjinn.checkpoints")))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint path as given, or the name of a shipped one (`codec-drums` → the packaged directory)."""
    path = Path(path)
    if (path / CONFIG_FILE).exists():
        return path
    shipped = shipped_checkpoints_dir() / path.name
    if len(path.parts) <= 2 and (shipped / CONFIG_FILE).exists() and (path.parts[0] in (path.name, "checkpoints")):
        return shipped
    if path.exists():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a melodjinn checkpoint (or an interrupted write; re-run training)")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist; shipped ones: {', '.join(list_shipped()) or 'none'}")


def list_shipped() -> list[str]:
    root = shipped_checkpoints_dir()
    return sorted(p.name for p in root.iterdir() if (p / CONFIG_FILE).exists()) if root.exists() else []
