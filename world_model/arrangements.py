"""Token arrangements: how frame-aligned codec tokens become the positions the dynamics transformer steps through.

The codec gives tokens `[B, S, K, T]` (batch, stream, codebook, frame) with values in `[0, V)`. The dynamics
transformer is causal over *positions*; an arrangement says which (stream, codebook, frame) entries sit at
each position, and maps back. Entries of a position that hold no token carry the special id `V` (so token
embeddings have `V + 1` rows) and are `False` in the validity mask.

In the diagrams, `s1 k2` is the slot of stream 1 / codebook 2, a number is the frame whose token sits there,
and `.` is the special id (mask `False`). Example: S = 2 streams, K = 3 codebooks, T = 4 frames.

`flatten` — every codebook of every stream is its own position (K·S positions per frame; frame-major, then
stream, then codebook). Sequence `[B, T*S*K]` of single tokens; each position carries its (stream, codebook)
ids for the embeddings. No padding at all; the model predicts one token per forward pass.

    position  0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20 21 22 23
    stream    0  0  0  1  1  1  0  0  0  1  1  1  0  0  0  1  1  1  0  0  0  1  1  1
    codebook  0  1  2  0  1  2  0  1  2  0  1  2  0  1  2  0  1  2  0  1  2  0  1  2
    frame     0  0  0  0  0  0  1  1  1  1  1  1  2  2  2  2  2  2  3  3  3  3  3  3

`delay` (MusicGen) — codebook k of every stream is delayed by k frames; one position per step holds all
S·K slots (slot = s*K + k). Sequence `[B, T + K - 1, S*K]`.

    position  0  1  2  3  4  5
    s0 k0     0  1  2  3  .  .
    s0 k1     .  0  1  2  3  .
    s0 k2     .  .  0  1  2  3
    s1 k0     0  1  2  3  .  .
    s1 k1     .  0  1  2  3  .
    s1 k2     .  .  0  1  2  3

`multistream` (default) — one position per frame for all streams, with a delay per (stream, codebook):
codebook delays (default k for codebook k) plus a per-stream offset (default 0). Stored stream-major,
`[B, S, K, T + max_delay]`, so that per-stream embeddings and heads take `tokens[:, s]` and a stream can be
added without moving the others. Here with `stream_offsets=(0, 1)`: stream 1 lags stream 0 by one frame, so
when stream 1's frame t is predicted, stream 0's frame t is already in the context.

    position  0  1  2  3  4  5  6
    s0 k0     0  1  2  3  .  .  .
    s0 k1     .  0  1  2  3  .  .
    s0 k2     .  .  0  1  2  3  .
    s1 k0     .  0  1  2  3  .  .
    s1 k1     .  .  0  1  2  3  .
    s1 k2     .  .  .  0  1  2  3

With zero offsets, `multistream` holds exactly what `delay` holds, laid out `[B, S, K, L]` instead of
`[B, L, S*K]`.

Length: `num_positions(T) = T * positions_per_frame + max_delay` for T >= 1, and 0 for T = 0 (an empty input
has no positions). No start position is included: the model prepends its own (all special ids) and predicts
position p from positions < p.

Generation works in frame-aligned space: at step p (= position p), `step_entries(p)` says which
(stream, codebook, frame) entries the position holds and in which slots, `gather_step` reads a position from a
`[B, S, K, T]` buffer (special ids where the position holds nothing), `scatter_step` writes sampled tokens back,
and `frames_complete(p + 1)` says how many leading frames are then fully known.
"""

from __future__ import annotations

import json
import operator
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from melodjinn.world_model.errors import MelodjinnError

__all__ = [
    "ARRANGEMENTS",
    "DEFAULT_ARRANGEMENT",
    "ArrangedSequence",
    "Arrangement",
    "ArrangementError",
    "DelayArrangement",
    "FlattenArrangement",
    "MultiStreamArrangement",
    "StepEntries",
    "TableCache",
    "make_arrangement",
]

_V = TypeVar("_V")

DEFAULT_ARRANGEMENT = "multistream"


class ArrangementError(MelodjinnError, ValueError):
    """Invalid arrangement settings or input tokens. Also a `ValueError`, for callers that catch that."""


@dataclass(frozen=True, eq=False)
class ArrangedSequence:
    """Tokens laid out by an arrangement.

    `tokens` and `mask` have the arrangement's layout with a leading batch dim (flatten `[B, L]`, delay
    `[B, L, S*K]`, multistream `[B, S, K, L]`, L = positions). `mask` is True where an entry holds a real token,
    False where it holds `special_id`; it is an expanded (shared) view, the same for every batch item.
    `stream_ids`, `codebook_ids` and `frame_ids` have the layout without the batch dim: the stream and codebook
    of every entry (also of padding entries, whose slot still belongs to a stream/codebook) and the source
    frame (-1 at padding).
    """

    tokens: Tensor  # int64, layout shape
    mask: Tensor  # bool, layout shape
    stream_ids: Tensor  # int64, layout shape without B
    codebook_ids: Tensor  # int64, layout shape without B
    frame_ids: Tensor  # int64, layout shape without B; -1 where mask is False
    num_frames: int  # T
    num_positions: int  # L
    arrangement: str  # name of the arrangement that made it


@dataclass(frozen=True, eq=False)
class StepEntries:
    """The entries one position (generation step) holds; all tensors `[n]` int64 on CPU, in slot order."""

    slots: Tensor  # [n] index into the position's tokens, in [0, tokens_per_position)
    streams: Tensor  # [n]
    codebooks: Tensor  # [n]
    frames: Tensor  # [n]

    def __len__(self) -> int:
        return int(self.slots.numel())


class TableCache(Generic[_V]):
    """The few index tables a model reuses, keyed by (length, device): built once, least recently used dropped.
    Training and generation ask for the same handful of lengths, so a small cache saves rebuilding every step."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, _V] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], _V]) -> _V:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        value = build()
        self._entries[key] = value
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


class _Tables(NamedTuple):
    """Index tables for one T on one device (L = positions, N = tokens per position)."""

    gather: Tensor  # [L*N] source index into tokens.reshape(B, S*K*T); 0 at padding (masked afterwards)
    valid: Tensor  # [L*N] bool
    inverse: Tensor  # [S*K*T] the arranged entry (in [0, L*N)) holding each source entry
    mask: Tensor  # layout shape without B, bool
    stream_ids: Tensor  # layout shape without B
    codebook_ids: Tensor  # layout shape without B
    frame_ids: Tensor  # layout shape without B


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ArrangementError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ArrangementError(f"{what} must be an integer, got {value!r}") from None


def _positive_int(value: Any, what: str) -> int:
    out = _as_int(value, what)
    if out < 1:
        raise ArrangementError(f"{what} must be >= 1, got {out}")
    return out


def _check_steps_done(steps_done: Any) -> int:
    n = _as_int(steps_done, "steps_done")
    if n < 0:
        raise ArrangementError(f"steps_done must be >= 0, got {n}")
    return n


def _delay_list(values: Any, length: int, what: str, per: str) -> list[int]:
    if isinstance(values, (str, bytes, dict)) or not (hasattr(values, "__len__") and hasattr(values, "__iter__")):
        raise ArrangementError(f"{what} must be a list of {length} integers (one per {per}), got {values!r}")
    items = [_as_int(v, f"{what}[{i}]") for i, v in enumerate(values)]
    if len(items) != length:
        raise ArrangementError(f"{what} must have {length} entries (one per {per}), got {len(items)}: {items}")
    negative = [d for d in items if d < 0]
    if negative:
        raise ArrangementError(f"{what} must be >= 0 (a delay in frames), got {items}")
    return items


class Arrangement(ABC):
    """Maps tokens `[B, S, K, T]` to a sequence of positions and back; see the module docstring.

    Subclasses define the position layout through `_index` (which source entry each (position, slot) holds)
    and `_slot_ids`; arranging and restoring are gathers through cached index tables, so they are exact
    inverses by construction and cost one indexing op each.
    """

    name: ClassVar[str]
    _layout_rank: ClassVar[int]  # dims of the arranged tensor after the batch dim

    def __init__(self, num_streams: int, num_codebooks: int, *, codebook_size: int) -> None:
        self.num_streams = _positive_int(num_streams, "num_streams")  # S
        self.num_codebooks = _positive_int(num_codebooks, "num_codebooks")  # K
        self.codebook_size = _positive_int(codebook_size, "codebook_size")  # V
        self._tables_cache: TableCache[_Tables] = TableCache()

    # ---- shape facts -------------------------------------------------------------------------------------

    @property
    def special_id(self) -> int:
        """The id at entries that hold no token: `codebook_size` (V)."""
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        """Rows a token embedding needs: V real ids plus the special id."""
        return self.codebook_size + 1

    @property
    @abstractmethod
    def positions_per_frame(self) -> int:
        """Positions added per frame (flatten: S*K; delay, multistream: 1)."""

    @property
    @abstractmethod
    def tokens_per_position(self) -> int:
        """Token slots at each position, N (flatten: 1; delay, multistream: S*K)."""

    @property
    @abstractmethod
    def max_delay(self) -> int:
        """Extra positions after the last frame's first position (flatten: 0)."""

    def num_positions(self, num_frames: int) -> int:
        """Sequence length L for T frames: T * positions_per_frame + max_delay, or 0 when T = 0."""
        T = _as_int(num_frames, "num_frames")
        if T < 0:
            raise ArrangementError(f"num_frames must be >= 0, got {T}")
        return 0 if T == 0 else T * self.positions_per_frame + self.max_delay

    def num_frames(self, num_positions: int) -> int:
        """T for a sequence of L positions (the inverse of `num_positions`); raises if no T gives L."""
        L = _as_int(num_positions, "num_positions")
        if L < 0:
            raise ArrangementError(f"num_positions must be >= 0, got {L}")
        if L == 0:
            return 0
        body = L - self.max_delay
        if body < 1 or body % self.positions_per_frame:
            raise ArrangementError(
                f"{self.name}: {L} positions is not a valid length (expected 0 or T * {self.positions_per_frame}"
                f" + {self.max_delay} for some T >= 1)"
            )
        return body // self.positions_per_frame

    # ---- arrange / restore -------------------------------------------------------------------------------

    def arrange(self, tokens: Tensor) -> ArrangedSequence:
        """Lay out tokens `[B, S, K, T]` (integers in [0, V)) as positions; see `ArrangedSequence`."""
        tokens = self._check_tokens(tokens, check_values=True).long()  # [B, S, K, T]
        B, S, K, T = tokens.shape
        L, N = self.num_positions(T), self.tokens_per_position
        tab = self._tables(T, tokens.device)
        flat = tokens.reshape(B, S * K * T)  # [B, S*K*T]
        seq = flat.index_select(1, tab.gather)  # [B, L*N]
        seq = seq.masked_fill(~tab.valid, self.special_id)  # [B, L*N]
        seq = self._to_layout(seq.view(B, L, N))  # layout shape
        return ArrangedSequence(
            tokens=seq,
            mask=tab.mask.expand_as(seq),
            stream_ids=tab.stream_ids,
            codebook_ids=tab.codebook_ids,
            frame_ids=tab.frame_ids,
            num_frames=T,
            num_positions=L,
            arrangement=self.name,
        )

    def restore(self, arranged: ArrangedSequence | Tensor) -> Tensor:
        """Frame-aligned tokens `[B, S, K, T]` back from an arranged sequence (the inverse of `arrange`).

        Also takes a bare tensor in the layout with any trailing dims (e.g. logits `[B, L, S*K, V]` for
        `delay`) and returns `[B, S, K, T, *trailing]`; entries that hold no token are dropped. T follows from L.
        """
        if isinstance(arranged, ArrangedSequence):
            if arranged.arrangement != self.name:
                raise ArrangementError(
                    f"cannot restore a {arranged.arrangement!r} sequence with the {self.name!r} arrangement"
                )
            x = arranged.tokens
            if x.dim() != 1 + self._layout_rank:
                raise ArrangementError(
                    f"{self.name}: arranged tokens must have {1 + self._layout_rank} dims, got shape {tuple(x.shape)}"
                )
        elif isinstance(arranged, Tensor):
            x = arranged
        else:
            raise ArrangementError(f"restore expects an ArrangedSequence or a tensor, got {type(arranged).__name__}")
        if x.dim() < 1 + self._layout_rank:
            raise ArrangementError(
                f"{self.name}: expected {self._layout_desc()} (plus optional trailing dims), got shape"
                f" {tuple(x.shape)}"
            )
        seq = self._from_layout(x)  # [B, L, N, *extra]
        B, L, N = seq.shape[:3]
        extra = tuple(seq.shape[3:])
        T = self.num_frames(L)
        if isinstance(arranged, ArrangedSequence) and arranged.num_frames != T:
            raise ArrangementError(f"sequence says num_frames={arranged.num_frames} but has {L} positions (T={T})")
        tab = self._tables(T, x.device)
        flat = seq.reshape(B, L * N, *extra)  # [B, L*N, *extra]
        out = flat.index_select(1, tab.inverse).view(B, self.num_streams, self.num_codebooks, T, *extra)
        if isinstance(arranged, ArrangedSequence) and out.numel():
            lo, hi = int(out.min()), int(out.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ArrangementError(
                    f"restored tokens must lie in [0, {self.codebook_size}), found values in [{lo}, {hi}]"
                    f" (a special id {self.special_id} at a real entry means a generation step was not written)"
                )
        return out  # [B, S, K, T, *extra]

    # ---- generation --------------------------------------------------------------------------------------

    @abstractmethod
    def step_entries(self, step: int, num_frames: int | None = None) -> StepEntries:
        """The (slot, stream, codebook, frame) entries position `step` holds, frames limited to
        `[0, num_frames)` (None: no end, for open-ended generation). Raises if `step` is outside the sequence."""

    @abstractmethod
    def frames_complete(self, steps_done: int, num_frames: int | None = None) -> int:
        """How many leading frames have every entry at positions `< steps_done` (capped at `num_frames`)."""

    @abstractmethod
    def position_frames(self, num_frames: int) -> Tensor:
        """`[L]` int64: the frame each position steps through — the newest frame it can hold a token of
        (flatten: p // (S*K); delayed: p - min delay), clamped to [0, T-1] at the ends — i.e. the frame whose
        conditioning (action, section) belongs at that position."""

    def gather_step(self, tokens: Tensor, step: int) -> Tensor:
        """The tokens `[B, N]` of position `step`, read from a frame-aligned buffer `[B, S, K, T]`; slots
        that hold nothing get the special id."""
        tokens = self._check_tokens(tokens, check_values=False)  # [B, S, K, T]
        e = self.step_entries(step, tokens.shape[-1])
        out = tokens.new_full((tokens.shape[0], self.tokens_per_position), self.special_id)  # [B, N]
        dev = tokens.device
        out[:, e.slots.to(dev)] = tokens[:, e.streams.to(dev), e.codebooks.to(dev), e.frames.to(dev)]
        return out

    def scatter_step(self, tokens: Tensor, step: int, values: Tensor) -> Tensor:
        """Write the real entries of position `step` from `values [B, N]` into the buffer `tokens [B, S, K, T]`
        (in place; returned). Values in slots that hold nothing are ignored; real ones must be in [0, V)."""
        tokens = self._check_tokens(tokens, check_values=False)  # [B, S, K, T]
        B, N = tokens.shape[0], self.tokens_per_position
        if not isinstance(values, Tensor) or tuple(values.shape) != (B, N):
            shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
            raise ArrangementError(f"{self.name}: values must be [B, N] = [{B}, {N}], got {shape}")
        e = self.step_entries(step, tokens.shape[-1])
        dev = tokens.device
        v = values.to(dev)[:, e.slots.to(dev)]  # [B, n]
        if v.numel():
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ArrangementError(
                    f"step {step}: values at real entries must lie in [0, {self.codebook_size}), got [{lo}, {hi}]"
                )
        tokens[:, e.streams.to(dev), e.codebooks.to(dev), e.frames.to(dev)] = v.to(tokens.dtype)
        return tokens

    # ---- description -------------------------------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        """Arrangement-specific options (JSON-friendly), as `make_arrangement` takes them."""
        return {}

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this arrangement: `make_arrangement(**arrangement.config())`."""
        return {
            "name": self.name,
            "num_streams": self.num_streams,
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            **self.options(),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Arrangement) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.config(), sort_keys=True))

    def __repr__(self) -> str:
        cfg = self.config()
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items() if k != "name")
        return f"{type(self).__name__}({args})"

    def diagram(self, num_frames: int = 4) -> str:
        """ASCII picture of the layout for T frames (the format of the module docstring)."""
        T = _as_int(num_frames, "num_frames")
        L, N = self.num_positions(T), self.tokens_per_position
        index = self._index(T)  # [L, N]
        frames = torch.where(index >= 0, index % max(T, 1), -1)  # [L, N]
        streams, codebooks = self._slot_ids(L)  # [L, N] each
        width = max(len(str(max(L - 1, 0))), 2) + 1

        def row(name: str, cells: Sequence[int]) -> str:
            return name.ljust(8) + "".join(("." if c < 0 else str(c)).rjust(width) for c in cells)

        lines = [row("position", range(L))]
        if N == 1:
            lines += [
                row("stream", streams[:, 0].tolist()),
                row("codebook", codebooks[:, 0].tolist()),
                row("frame", frames[:, 0].tolist()),
            ]
        else:
            for n in range(N):
                lines.append(row(f"s{n // self.num_codebooks} k{n % self.num_codebooks}", frames[:, n].tolist()))
        return "\n".join(lines)

    # ---- internals ---------------------------------------------------------------------------------------

    @abstractmethod
    def _index(self, num_frames: int) -> Tensor:
        """`[L, N]` int64 on CPU: the source entry (s*K + k)*T + t each (position, slot) holds, or -1."""

    @abstractmethod
    def _slot_ids(self, num_positions: int) -> tuple[Tensor, Tensor]:
        """`([L, N], [L, N])` int64 on CPU: stream and codebook of every (position, slot)."""

    def by_position(self, x: Tensor) -> Tensor:
        """This arrangement's layout (with batch and trailing dims) -> `[B, L, N, *extra]`: one position axis and
        one slot axis, whatever the layout, for code that walks the sequence position by position."""
        return self._from_layout(x)

    @abstractmethod
    def _to_layout(self, x: Tensor) -> Tensor:
        """`[B, L, N, *extra]` -> this arrangement's layout (with batch and trailing dims)."""

    @abstractmethod
    def _from_layout(self, x: Tensor) -> Tensor:
        """This arrangement's layout -> `[B, L, N, *extra]`; raises if the layout dims are wrong."""

    @abstractmethod
    def _layout_desc(self) -> str:
        """The layout in words, for messages."""

    def _check_step(self, step: int, num_frames: int | None) -> tuple[int, int | None]:
        p = _as_int(step, "step")
        if p < 0:
            raise ArrangementError(f"step must be >= 0, got {p}")
        T = None if num_frames is None else _as_int(num_frames, "num_frames")
        if T is not None and p >= self.num_positions(T):
            raise ArrangementError(
                f"{self.name}: step {p} is past the end of a {T}-frame sequence ({self.num_positions(T)} positions)"
            )
        return p, T

    def _check_tokens(self, tokens: Tensor, *, check_values: bool) -> Tensor:
        if not isinstance(tokens, Tensor):
            raise ArrangementError(f"tokens must be a torch.Tensor [B, S, K, T], got {type(tokens).__name__}")
        if tokens.dim() != 4:
            raise ArrangementError(
                "tokens must have 4 dims [B, S, K, T] (batch, stream, codebook, frame), "
                f"got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise ArrangementError(f"tokens must be an integer tensor (int64), got {tokens.dtype}")
        _, S, K, _ = tokens.shape
        if S != self.num_streams:
            raise ArrangementError(
                f"{self.name}: tokens have {S} streams (dim 1 of [B, S, K, T]) but the arrangement has "
                f"num_streams={self.num_streams}"
            )
        if K != self.num_codebooks:
            raise ArrangementError(
                f"{self.name}: tokens have {K} codebooks (dim 2 of [B, S, K, T]) but the arrangement has "
                f"num_codebooks={self.num_codebooks}"
            )
        if check_values and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ArrangementError(
                    f"token values must lie in [0, {self.codebook_size}) (codebook_size), found values in [{lo}, {hi}]"
                )
        return tokens

    def _tables(self, num_frames: int, device: torch.device) -> _Tables:
        return self._tables_cache.get((num_frames, str(device)), lambda: self._build_tables(num_frames, device))

    def _build_tables(self, num_frames: int, device: torch.device) -> _Tables:
        T = num_frames
        index = self._index(T)  # [L, N]
        L, N = index.shape
        valid = index >= 0  # [L, N]
        sources = index[valid]  # [S*K*T] each source exactly once
        count = self.num_streams * self.num_codebooks * T
        if sources.numel() != count or (count and torch.bincount(sources, minlength=count).ne(1).any()):
            raise AssertionError(f"{self.name}: layout does not hold every token exactly once")  # a bug, not input
        inverse = torch.empty(count, dtype=torch.long)
        inverse[sources] = torch.arange(L * N).view(L, N)[valid]
        streams, codebooks = self._slot_ids(L)  # [L, N] each
        frames = torch.where(valid, index % max(T, 1), -1)  # [L, N]

        def layout(x: Tensor) -> Tensor:
            return self._to_layout(x.unsqueeze(0))[0].contiguous().to(device)

        return _Tables(
            gather=index.clamp(min=0).reshape(-1).to(device),
            valid=valid.reshape(-1).to(device),
            inverse=inverse.to(device),
            mask=layout(valid),
            stream_ids=layout(streams),
            codebook_ids=layout(codebooks),
            frame_ids=layout(frames),
        )


class FlattenArrangement(Arrangement):
    """Every codebook of every stream is its own position: S*K positions per frame, one token each.

    Order: frame-major, then stream, then codebook; position p = t*S*K + s*K + k. Layout `[B, T*S*K]`.
    Example S = 2, K = 3, T = 2:

        position  0  1  2  3  4  5  6  7  8  9 10 11
        stream    0  0  0  1  1  1  0  0  0  1  1  1
        codebook  0  1  2  0  1  2  0  1  2  0  1  2
        frame     0  0  0  0  0  0  1  1  1  1  1  1

    Each position's (stream, codebook) ids select its embedding and its output head.
    """

    name = "flatten"
    _layout_rank = 1

    @property
    def positions_per_frame(self) -> int:
        return self.num_streams * self.num_codebooks

    @property
    def tokens_per_position(self) -> int:
        return 1

    @property
    def max_delay(self) -> int:
        return 0

    def step_entries(self, step: int, num_frames: int | None = None) -> StepEntries:
        p, _ = self._check_step(step, num_frames)
        t, r = divmod(p, self.positions_per_frame)
        s, k = divmod(r, self.num_codebooks)
        slot, stream, codebook, frame = torch.tensor([[0], [s], [k], [t]], dtype=torch.long)  # 4 x [1]
        return StepEntries(slots=slot, streams=stream, codebooks=codebook, frames=frame)

    def frames_complete(self, steps_done: int, num_frames: int | None = None) -> int:
        n = _check_steps_done(steps_done) // self.positions_per_frame
        return n if num_frames is None else min(n, _as_int(num_frames, "num_frames"))

    def position_frames(self, num_frames: int) -> Tensor:
        L = self.num_positions(num_frames)
        return torch.arange(L) // self.positions_per_frame  # [L]

    def _index(self, num_frames: int) -> Tensor:
        T, SK = num_frames, self.positions_per_frame
        # position t*SK + n holds source n*T + t (n = s*K + k)
        index = torch.arange(SK).view(1, SK) * T + torch.arange(T).view(T, 1)  # [T, SK]
        return index.reshape(T * SK, 1)  # [L, 1]

    def _slot_ids(self, num_positions: int) -> tuple[Tensor, Tensor]:
        n = torch.arange(num_positions) % self.positions_per_frame  # [L] n = s*K + k
        return (n // self.num_codebooks).view(-1, 1), (n % self.num_codebooks).view(-1, 1)

    def _to_layout(self, x: Tensor) -> Tensor:
        return x.squeeze(2)  # [B, L, 1, *e] -> [B, L, *e]

    def _from_layout(self, x: Tensor) -> Tensor:
        return x.unsqueeze(2)  # [B, L, *e] -> [B, L, 1, *e]

    def _layout_desc(self) -> str:
        return "[B, L]"


class _DelayedArrangement(Arrangement):
    """Shared by `delay` and `multistream`: one position per frame; slot (s, k) of position p holds frame
    p - delays[s][k]. Subclasses choose the options and the tensor layout."""

    def __init__(
        self, num_streams: int, num_codebooks: int, *, codebook_size: int, delays: Sequence[Sequence[int]]
    ) -> None:
        super().__init__(num_streams, num_codebooks, codebook_size=codebook_size)
        S, K = self.num_streams, self.num_codebooks
        if isinstance(delays, (str, bytes, dict)) or not (hasattr(delays, "__len__") and hasattr(delays, "__iter__")):
            raise ArrangementError(f"delays must be a list of {S} lists of {K} integers, got {delays!r}")
        rows = list(delays)
        if len(rows) != S:
            raise ArrangementError(
                f"delays must have one row per stream (num_streams={S}), got {len(rows)} rows: {rows!r}"
            )
        self._delays = tuple(
            tuple(_delay_list(row, K, f"delays[{s}]", "codebook")) for s, row in enumerate(rows)
        )  # [S][K]
        self._delay_vec = torch.tensor(self._delays, dtype=torch.long, device="cpu").view(S * K)  # [S*K] slot n = s*K + k

    @property
    def delays(self) -> tuple[tuple[int, ...], ...]:
        """`delays[s][k]`: frames by which codebook k of stream s is delayed."""
        return self._delays

    @property
    def positions_per_frame(self) -> int:
        return 1

    @property
    def tokens_per_position(self) -> int:
        return self.num_streams * self.num_codebooks

    @property
    def max_delay(self) -> int:
        return int(self._delay_vec.max())

    @property
    def min_delay(self) -> int:
        return int(self._delay_vec.min())

    def step_entries(self, step: int, num_frames: int | None = None) -> StepEntries:
        p, T = self._check_step(step, num_frames)
        t = p - self._delay_vec  # [S*K]
        ok = t >= 0 if T is None else (t >= 0) & (t < T)
        slots = ok.nonzero().view(-1)  # [n]
        return StepEntries(
            slots=slots,
            streams=slots // self.num_codebooks,
            codebooks=slots % self.num_codebooks,
            frames=t[slots],
        )

    def frames_complete(self, steps_done: int, num_frames: int | None = None) -> int:
        n = max(_check_steps_done(steps_done) - self.max_delay, 0)
        return n if num_frames is None else min(n, _as_int(num_frames, "num_frames"))

    def position_frames(self, num_frames: int) -> Tensor:
        T = _as_int(num_frames, "num_frames")
        L = self.num_positions(T)
        return (torch.arange(L) - self.min_delay).clamp(0, max(T - 1, 0))  # [L]

    def _index(self, num_frames: int) -> Tensor:
        T = num_frames
        L, SK = self.num_positions(T), self.tokens_per_position
        t = torch.arange(L).view(L, 1) - self._delay_vec.view(1, SK)  # [L, S*K] source frame of each slot
        src = torch.arange(SK).view(1, SK) * T + t  # [L, S*K]
        return torch.where((t >= 0) & (t < T), src, -1)

    def _slot_ids(self, num_positions: int) -> tuple[Tensor, Tensor]:
        n = torch.arange(self.tokens_per_position).repeat(num_positions, 1)  # [L, S*K]
        return n // self.num_codebooks, n % self.num_codebooks


class DelayArrangement(_DelayedArrangement):
    """MusicGen's delay pattern for every stream: codebook k is delayed by k frames (or by
    `codebook_delays[k]`), all S*K slots at one position. Layout `[B, T + K - 1, S*K]`, slot n = s*K + k.
    Example S = 1, K = 4, T = 3:

        position  0  1  2  3  4  5
        s0 k0     0  1  2  .  .  .
        s0 k1     .  0  1  2  .  .
        s0 k2     .  .  0  1  2  .
        s0 k3     .  .  .  0  1  2

    One forward pass per position predicts codebook 0 of frame p, codebook 1 of frame p-1, ... for all streams.
    """

    name = "delay"
    _layout_rank = 2

    def __init__(
        self,
        num_streams: int,
        num_codebooks: int,
        *,
        codebook_size: int,
        codebook_delays: Sequence[int] | None = None,
    ) -> None:
        K = _positive_int(num_codebooks, "num_codebooks")
        S = _positive_int(num_streams, "num_streams")
        cd = list(range(K))
        if codebook_delays is not None:
            cd = _delay_list(codebook_delays, K, "codebook_delays", "codebook")
        super().__init__(S, K, codebook_size=codebook_size, delays=[cd] * S)

    @property
    def codebook_delays(self) -> tuple[int, ...]:
        return self.delays[0]

    def options(self) -> dict[str, Any]:
        return {"codebook_delays": list(self.codebook_delays)}

    def _to_layout(self, x: Tensor) -> Tensor:
        return x  # [B, L, S*K, *e]

    def _from_layout(self, x: Tensor) -> Tensor:
        if x.shape[2] != self.tokens_per_position:
            raise ArrangementError(
                f"delay: expected [B, L, S*K] with S*K={self.tokens_per_position}, got shape {tuple(x.shape)}"
            )
        return x

    def _layout_desc(self) -> str:
        return f"[B, L, S*K={self.tokens_per_position}]"


class MultiStreamArrangement(_DelayedArrangement):
    """One position per frame for all streams, delay per (stream, codebook) = codebook_delays[k] +
    stream_offsets[s] (defaults k and 0), or an explicit `delays` matrix `[S][K]`. Layout
    `[B, S, K, T + max_delay]`: stream s's tokens are `tokens[:, s]`, for its own embeddings and heads.
    Example S = 2, K = 2, T = 3, stream_offsets = (0, 2) (stream 1 is predicted two frames after stream 0):

        position  0  1  2  3  4  5
        s0 k0     0  1  2  .  .  .
        s0 k1     .  0  1  2  .  .
        s1 k0     .  .  0  1  2  .
        s1 k1     .  .  .  0  1  2

    `stream_lag=n` gives stream s the offset s·n: each stream is predicted n frames after the one before it, so it
    sees their current frame (a bass line can land on the kick the drums just played) while every stream is still
    predicted in the one pass per frame; streams added later continue the pattern.

    Every forward pass predicts a token for every stream (one pass per frame, not one per stream); adding a
    stream (`with_added_stream`) leaves the existing streams' positions unchanged. `codebook_delays=(0,) * K`
    gives the parallel pattern: every token of a frame in one pass, L = T (+ stream offsets).
    """

    name = "multistream"
    _layout_rank = 3

    def __init__(
        self,
        num_streams: int,
        num_codebooks: int,
        *,
        codebook_size: int,
        codebook_delays: Sequence[int] | None = None,
        stream_offsets: Sequence[int] | None = None,
        stream_lag: int = 0,
        delays: Sequence[Sequence[int]] | None = None,
    ) -> None:
        S = _positive_int(num_streams, "num_streams")
        K = _positive_int(num_codebooks, "num_codebooks")
        self.stream_lag = _as_int(stream_lag, "stream_lag")
        if self.stream_lag < 0:
            raise ArrangementError(f"stream_lag must be >= 0 (frames between consecutive streams), got {stream_lag}")
        if stream_offsets is not None and self.stream_lag:
            raise ArrangementError("multistream: give either stream_offsets or stream_lag, not both")
        if delays is not None:  # a stored arrangement: the matrix is explicit, stream_lag only places added streams
            if codebook_delays is not None or stream_offsets is not None:
                raise ArrangementError(
                    "multistream: give either delays (a full [S][K] matrix) or codebook_delays/stream_offsets, not both"
                )
            matrix = delays
        else:
            cd = list(range(K))
            if codebook_delays is not None:
                cd = _delay_list(codebook_delays, K, "codebook_delays", "codebook")
            so = [s * self.stream_lag for s in range(S)]
            if stream_offsets is not None:
                so = _delay_list(stream_offsets, S, "stream_offsets", "stream")
            matrix = [[so[s] + cd[k] for k in range(K)] for s in range(S)]
        super().__init__(S, K, codebook_size=codebook_size, delays=matrix)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"delays": [list(row) for row in self.delays]}
        if self.stream_lag:
            opts["stream_lag"] = self.stream_lag
        return opts

    def with_added_stream(self, delays: Sequence[int] | None = None) -> MultiStreamArrangement:
        """The arrangement with one more stream (last), whose codebook delays are `delays` (default: the last
        stream's delays plus `stream_lag`; 0..K-1 without a lag); the existing streams keep their delays, hence
        their positions."""
        K = self.num_codebooks
        if delays is not None:
            row = _delay_list(delays, K, "delays", "codebook")
        elif self.stream_lag:
            row = [d + self.stream_lag for d in self.delays[-1]]
        else:
            row = list(range(K))
        return MultiStreamArrangement(
            self.num_streams + 1, K, codebook_size=self.codebook_size, delays=[*map(list, self.delays), row],
            stream_lag=self.stream_lag,
        )

    def _to_layout(self, x: Tensor) -> Tensor:
        B, L, _, *e = x.shape
        return x.view(B, L, self.num_streams, self.num_codebooks, *e).movedim(1, 3)  # [B, S, K, L, *e]

    def _from_layout(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.num_streams or x.shape[2] != self.num_codebooks:
            raise ArrangementError(
                f"multistream: expected [B, S={self.num_streams}, K={self.num_codebooks}, L], "
                f"got shape {tuple(x.shape)}"
            )
        B, S, K, L, *e = x.shape
        return x.movedim(3, 1).reshape(B, L, S * K, *e)  # [B, L, S*K, *e]

    def _layout_desc(self) -> str:
        return f"[B, S={self.num_streams}, K={self.num_codebooks}, L]"


ARRANGEMENTS: dict[str, type[Arrangement]] = {
    FlattenArrangement.name: FlattenArrangement,
    DelayArrangement.name: DelayArrangement,
    MultiStreamArrangement.name: MultiStreamArrangement,
}

_OPTIONS: dict[str, tuple[str, ...]] = {
    "flatten": (),
    "delay": ("codebook_delays",),
    "multistream": ("codebook_delays", "stream_offsets", "stream_lag", "delays"),
}


def make_arrangement(
    name: str, num_streams: int, num_codebooks: int, *, codebook_size: int, **opts: Any
) -> Arrangement:
    """Build an arrangement by name (`flatten`, `delay`, `multistream`); `opts` are its options:
    delay: codebook_delays; multistream: codebook_delays, stream_offsets or stream_lag, or delays. Inverse of `config()`."""
    if name not in ARRANGEMENTS:
        raise ArrangementError(f"unknown arrangement {name!r}; choose one of: {', '.join(ARRANGEMENTS)}")
    unknown = sorted(set(opts) - set(_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(_OPTIONS[name]) or "none"
        raise ArrangementError(f"arrangement {name!r} has no option(s) {', '.join(unknown)} (its options: {allowed})")
    return ARRANGEMENTS[name](num_streams, num_codebooks, codebook_size=codebook_size, **opts)
