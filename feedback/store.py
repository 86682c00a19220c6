"""The preference store: every answered A/B comparison is on disk the moment it is answered.

A store is a directory:

    preferences.sqlite            one row per answer; WAL journal, synchronous=FULL, one transaction per answer
    clips/<sha256>.wav            what the listener heard (the continuation's mix, 24 kHz)
    clips/<sha256>.safetensors    the same clip as the models read it: codec tokens (S, K, T), the frame-level
                                  actions (J,) and sections (J,) that the action prior sees

A clip's name is the SHA-256 of its audio samples, so the row's `hash_a` names the file and a clip heard twice is
stored once. Clip files are written (atomically) before the row that points to them, so a crash at any moment
leaves every committed row with its files; at worst an unreferenced clip file is left over.

Reading back: `answers()` gives the rows as dicts; `pairs()` the decided ones (A or B, not tie or skip) as
`PreferencePair(chosen, rejected)`, the form the reward model and DPO train on; `listener_pairs(directory, ...)` is
what their commands call: one listener's pairs, with the errors a user can meet (no store, whose ratings, too few).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from melodjinn.world_model.artifacts import load_tensors, save_tensors
from melodjinn.world_model.audio_io import write_audio
from melodjinn.world_model.errors import ConfigError, DataError
from melodjinn.world_model.worlds import SAMPLE_RATE

DATABASE = "preferences.sqlite"
CLIPS = "clips"
SCHEMA_VERSION = 1
CHOICES = ("A", "B", "tie", "skip")  # what a listener can answer ("replay" is not an answer: it plays again)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    listener TEXT NOT NULL,          -- who answered (a name; simulated listeners are named by their preference)
    session TEXT NOT NULL,           -- the listening session the comparison belongs to
    context TEXT NOT NULL,           -- JSON: how the shared context was made (checkpoint, prompt seed, section...)
    checkpoint_hash TEXT NOT NULL,   -- SHA-256 of the world model's weights that generated both clips
    hash_a TEXT NOT NULL,            -- clip A's audio hash; its files are clips/<hash>.wav and .safetensors
    hash_b TEXT NOT NULL,
    policy_a TEXT NOT NULL,          -- what generated each clip (e.g. "prior", "prior-dpo")
    policy_b TEXT NOT NULL,
    actions_a TEXT NOT NULL,         -- JSON list: the env step actions of clip A
    actions_b TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
    replays INTEGER NOT NULL,        -- how often the listener asked to hear the pair again
    latency_s REAL NOT NULL,         -- seconds from the end of playback to the answer
    answered_at TEXT NOT NULL        -- ISO 8601, UTC
);
"""


@dataclass
class Clip:
    """One continuation: what was heard and what produced it."""

    audio: np.ndarray  # (N,) mix at 24 kHz
    tokens: torch.Tensor  # (S, K, T) codec tokens
    actions: torch.Tensor  # (J,) frame-level actions as the action prior reads them
    sections: torch.Tensor  # (J,) the section of each of those frames
    step_actions: list[int]  # the env step actions (what a policy chose)
    policy: str  # a label for what generated it

    @cached_property
    def hash(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.audio, dtype=np.float32).tobytes()).hexdigest()


@dataclass
class Comparison:
    """What a listener is asked about: two continuations of one context."""

    session: str
    index: int  # position in the session
    context: dict[str, Any]  # JSON-able: how the context was made
    a: Clip
    b: Clip
    prompt_audio: Optional[np.ndarray] = None  # (N,) the context itself, played before the clips
    sample_rate: int = SAMPLE_RATE


@dataclass
class StoredClip:
    """A clip read back from the store (the audio stays in its WAV file)."""

    hash: str
    audio_file: Path
    tokens: torch.Tensor  # (S, K, T)
    actions: torch.Tensor  # (J,)
    sections: torch.Tensor  # (J,)
    step_actions: list[int]
    policy: str


@dataclass
class PreferencePair:
    chosen: StoredClip
    rejected: StoredClip
    listener: str
    context: dict[str, Any] = field(default_factory=dict)
    answer_id: int = 0


class PreferenceStore:
    """A directory of answered comparisons (see the module docstring). Opening creates it if needed; use as a
    context manager or call `close()`."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise DataError(f"{self.directory} is a file; a preference store is a directory (pass a new or existing one)")
        database = self.directory / DATABASE
        if self.directory.exists() and any(self.directory.iterdir()) and not database.exists():
            raise DataError(f"{self.directory} is not empty and holds no {DATABASE}: not a preference store; "
                            "pass an empty or new directory, or an existing store")
        (self.directory / CLIPS).mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(database, isolation_level=None)  # explicit transactions only
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{database} is not a readable SQLite database ({exc}); restore it from a backup, or "
                            "point to a new store directory (nothing was changed)") from None
        self._check_version()

    def _check_version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise DataError(f"{self.directory / DATABASE} has schema version {row[0]}, this code reads "
                            f"{SCHEMA_VERSION}; use the Melodjinn version that wrote it")

    def __enter__(self) -> "PreferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    # ---- writing ---------------------------------------------------------------------------------------------

    def record(self, comparison: Comparison, choice: str, listener: str, checkpoint_hash: str,
               latency_s: float = 0.0, replays: int = 0) -> int:
        """Write one answer (clip files first, then the row, in one committed transaction) → its row id."""
        if choice not in CHOICES:
            raise DataError(f"an answer must be one of {', '.join(CHOICES)}, got {choice!r}")
        for clip in (comparison.a, comparison.b):
            self._write_clip(clip)
        row = (listener, comparison.session, json.dumps(comparison.context, sort_keys=True), checkpoint_hash,
               comparison.a.hash, comparison.b.hash, comparison.a.policy, comparison.b.policy,
               json.dumps([int(a) for a in comparison.a.step_actions]), json.dumps([int(a) for a in comparison.b.step_actions]),
               choice, int(replays), float(latency_s), datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
        with self._transaction():
            cursor = self.db.execute(
                "INSERT INTO answers (listener, session, context, checkpoint_hash, hash_a, hash_b, policy_a, policy_b, "
                "actions_a, actions_b, choice, replays, latency_s, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row)
        return int(cursor.lastrowid)

    def _write_clip(self, clip: Clip) -> None:
        name = clip.hash
        wav, tensors = self._clip_files(name)
        if not wav.exists():
            write_audio(wav, np.asarray(clip.audio, dtype=np.float32), subtype="FLOAT")
        if not tensors.exists():
            save_tensors(tensors, {"tokens": clip.tokens.to(torch.int32), "actions": clip.actions.to(torch.int32),
                                   "sections": clip.sections.to(torch.int32)})

    def _clip_files(self, name: str) -> tuple[Path, Path]:
        return self.directory / CLIPS / f"{name}.wav", self.directory / CLIPS / f"{name}.safetensors"

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- reading ---------------------------------------------------------------------------------------------

    def answers(self, listener: Optional[str] = None) -> list[dict[str, Any]]:
        """Every answer in the order given (optionally one listener's), as dicts of the table's columns."""
        query, args = "SELECT * FROM answers", ()
        if listener is not None:
            query, args = query + " WHERE listener = ?", (listener,)
        cursor = self.db.execute(query + " ORDER BY id", args)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def listeners(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT listener FROM answers ORDER BY listener")]

    def pairs(self, listener: Optional[str] = None, limit: Optional[int] = None) -> list[PreferencePair]:
        """The decided answers (A or B) as chosen/rejected pairs, oldest first; `limit` keeps the first ones."""
        out = []
        for row in self.answers(listener):
            if row["choice"] not in ("A", "B"):
                continue
            a, b = self.clip(row["hash_a"], row["policy_a"], row["actions_a"]), self.clip(row["hash_b"], row["policy_b"], row["actions_b"])
            chosen, rejected = (a, b) if row["choice"] == "A" else (b, a)
            out.append(PreferencePair(chosen, rejected, row["listener"], json.loads(row["context"]), int(row["id"])))
            if limit is not None and len(out) >= limit:
                break
        return out

    def clip(self, name: str, policy: str = "", step_actions: str | list[int] = "[]") -> StoredClip:
        wav, tensors = self._clip_files(name)
        if not wav.exists():
            raise DataError(f"{wav} is missing: the store at {self.directory} lost a clip file; restore it from a backup")
        data = load_tensors(tensors)
        steps = json.loads(step_actions) if isinstance(step_actions, str) else list(step_actions)
        return StoredClip(name, wav, data["tokens"].long(), data["actions"].long(), data["sections"].long(), steps, policy)


def listener_pairs(store_dir: str | Path, listener: Optional[str], ratings: Optional[int]) -> tuple[str, list[PreferencePair]]:
    """The decided pairs of one listener (the store's only one when `listener` is None), the first `ratings` of
    them when given → (listener, pairs)."""
    if not (Path(store_dir) / DATABASE).exists():
        raise DataError(f"{store_dir} holds no preference store ({DATABASE} missing); record ratings with "
                        "`melodjinn rate store=DIR` first, or point store= at an existing one")
    if ratings is not None and int(ratings) < 1:
        raise ConfigError(f"ratings={ratings}: must be >= 1, or null for every decided pair")
    with PreferenceStore(store_dir) as store:
        names = store.listeners()
        if listener is None:
            if len(names) != 1:
                raise ConfigError(f"{store_dir} holds answers of {len(names)} listeners "
                                  f"({', '.join(names) or 'none'}); pick one with listener=NAME")
            listener = names[0]
        elif listener not in names:
            raise DataError(f"{store_dir} holds no answers of listener {listener!r}; it holds {', '.join(names) or 'none'}")
        pairs = store.pairs(listener, limit=ratings)
    if not pairs:
        raise DataError(f"{store_dir} holds no decided pairs (A or B) of listener {listener!r}: ties and skips say "
                        "nothing to learn from; record more comparisons (`melodjinn rate`)")
    if ratings is not None and len(pairs) < int(ratings):
        raise DataError(f"ratings={ratings} asked, but {store_dir} holds only {len(pairs)} decided pairs of listener "
                        f"{listener!r}; pass ratings<={len(pairs)} or record more comparisons")
    return listener, pairs
