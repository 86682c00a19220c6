"""Dynamics — the multi-stream backbone (after Melodia): tokens | actions, sections → next tokens.

A LLaMA-style causal transformer (`transformer.py`) steps through the *positions* of a token arrangement
(`arrangements.py`: `flatten`, `delay`, `multistream`). The input at a position is one vector: the sum of the
token embeddings of every slot the previous position holds (one table per stream and codebook, V + 1 rows with
the special id), plus the action, section (and style) embeddings of the frame the position predicts. Per-stream,
per-codebook heads read the output and predict the tokens of the position itself — for `delay`/`multistream`
every stream and codebook at once, one forward pass per frame; for `flatten` one token per pass.

Which input conditions which prediction (S = 1, K = 2, `multistream` with codebook delays 0, 1; T = 4 frames;
`fN` is a token of frame N, `.` the special id, a[t] the action for the transition t → t+1):

    input index i       0       1       2       3       4
    tokens in         start   pos 0   pos 1   pos 2   pos 3
      s0 k0             .      f0      f1      f2      f3
      s0 k1             .       .      f0      f1      f2
    frame F(i)          0       1       2       3       3  (clamped to T-1 past the last frame)
    action           null    a[0]    a[1]    a[2]    a[2]  = a[F(i) - 1]; frame 0 has no transition
    section         sec[0]  sec[1]  sec[2]  sec[3]  sec[3] = sec[F(i)]
    predicts pos        0       1       2       3       4
      s0 k0            f0      f1      f2      f3       .
      s0 k1             .      f0      f1      f2      f3

F(i) is `arrangement.position_frames(T)[i]`, the newest frame position i holds. So the first tokens of frame
t+1 (here k0, at index t+1) are predicted with a[t] available and no later action — the LAM's convention
(a[t] explains t → t+1). In a delayed arrangement the *later* codebooks of a frame are predicted after the next
actions have entered the context (k1 of frame t+1 at index t+2, which carries a[t+1]): an action is committed
when the first tokens of its frame are sampled, `max_delay - min_delay` frames before that frame is complete.
With `flatten`, or `multistream` with all-zero codebook delays, every token of frame t+1 sees exactly a[0..t].

Training (`forward`) is teacher-forced; random input frames are replaced by a learned mask embedding so the model
must read the action, and whole sequences drop to the null action (id A) so that sampling can use
classifier-free guidance on actions. Generation (`generate`, or `new_session(...).step(...)` for an environment)
steps position by position with the KV cache, in a frame-aligned token buffer.
"""

from __future__ import annotations

import bisect
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from melodjinn.world_model.arrangements import TableCache, make_arrangement
from melodjinn.world_model.errors import CheckpointError, ConfigError, MelodjinnError
from melodjinn.world_model.runtime import as_plain_dict, to_dataclass
from melodjinn.world_model.transformer import Rotary, Transformer, TransformerConfig
from melodjinn.world_model.worlds import SECTIONS

__all__ = [
    "DynamicsConfig",
    "DynamicsError",
    "DynamicsModel",
    "DynamicsSession",
    "expand_actions",
    "section_ids",
    "time_generation",
]

IGNORE_INDEX = -100  # target value that the loss skips (padded frames)


class DynamicsError(MelodjinnError, ValueError):
    """Bad input to the dynamics model (shapes, ranges, sampling settings). Also a `ValueError`."""


@dataclass
class DynamicsConfig:
    streams: List[str] = field(default_factory=lambda: ["mix"])  # stream names, in token order (S of them)
    num_codebooks: int = 4  # K codebooks per stream (the codec's)
    codebook_size: int = 1024  # V token values per codebook; the special id V is added on top
    arrangement: str = "multistream"  # flatten | delay | multistream (see arrangements.py)
    arrangement_options: Dict[str, Any] = field(default_factory=dict)  # its options (codebook_delays, stream_offsets, stream_lag, delays)
    dim: int = 128  # transformer width C (tiny CPU default)
    layers: int = 3  # transformer blocks (3: the real-time budget at batch 1 on one CPU thread)
    heads: int = 4  # attention heads
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * dim
    dropout: float = 0.0  # residual/attention dropout while training
    rope_base: float = 10_000.0  # rotary frequency base
    num_actions: int = 8  # A latent actions (the LAM's codebook); id A is the null action
    num_sections: int = len(SECTIONS)  # song sections: intro, verse, chorus, bridge, outro
    default_section: int = 0  # section of frames a caller gives none for; training sets the one its clips carry most
    # (the drum world's clips are all "verse": an untrained section embedding would condition them on noise)
    num_styles: int = 0  # optional per-clip style ids (0 = no style embedding)
    frame_mask_prob: float = 0.1  # training: chance an input frame's tokens are replaced by the mask embedding
    action_dropout: float = 0.1  # training: chance a whole sequence is conditioned on the null action
    max_frames: int = 2048  # longest sequence (frames) the rotary table and a session's buffer cover
    window_frames: int = 0  # frames the model saw at once in training (its clips' length; training sets it): longer
    # generation rolls the context over rather than attend further back than it learned to (0 = up to max_frames)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"dynamics.{key}: {why}")

        if not self.streams:
            raise bad("streams", "needs at least one stream name")
        for name in self.streams:
            if not isinstance(name, str) or not name or "." in name:
                raise bad("streams", f"stream names must be non-empty strings without '.', got {name!r}")
        if len(set(self.streams)) != len(self.streams):
            raise bad("streams", f"stream names must be unique, got {list(self.streams)}")
        for key in ("num_codebooks", "codebook_size", "dim", "layers", "heads", "num_actions", "num_sections", "max_frames"):
            if int(getattr(self, key)) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.window_frames <= self.max_frames:
            raise bad("window_frames", f"must lie in [0, max_frames={self.max_frames}] (0 = no window), got {self.window_frames}")
        if not 0 <= self.default_section < self.num_sections:
            raise bad("default_section", f"must lie in [0, num_sections={self.num_sections}), got {self.default_section}")
        if self.num_styles < 0:
            raise bad("num_styles", f"must be >= 0 (0 = no styles), got {self.num_styles}")
        if self.dim % self.heads:
            raise bad("dim", f"dim={self.dim} must be divisible by heads={self.heads}")
        for key in ("frame_mask_prob", "action_dropout", "dropout"):
            if not 0.0 <= float(getattr(self, key)) < 1.0:
                raise bad(key, f"must lie in [0, 1), got {getattr(self, key)}")


class _Rows(NamedTuple):
    """Row offsets in the input table: one `embedding_bag` over it builds a whole position's input."""

    mask: int  # learned frame-mask embedding
    start: int  # learned start-of-sequence embedding
    zero: int  # all zeros: fills the start position's remaining slots
    action: int  # A + 1 action rows (the last is null)
    section: int
    style: int
    total: int


class _Tables(NamedTuple):
    """Index tables for T frames (L positions of N slots); built once from the arrangement, cached per T."""

    T: int
    L: int
    N: int
    row_base: Tensor  # (L, N) first embedding row of each slot's (stream, codebook) table
    src: Tensor  # (L, N) flat index of each entry in a token buffer (S*K*T + 2,); SPECIAL cell at padding
    dst: Tensor  # (L, N) like src, but the DUMP cell at padding (writes land there harmlessly)
    frame: Tensor  # (L, N) source frame of each slot, -1 at padding
    codebook: Tensor  # (L, N)
    head: Tensor  # (L, N) head index s*K + k
    cond: Tensor  # (L,) F(i): the frame whose action/section the input predicting position i carries
    cond_list: list  # cond as Python ints, for the generation loop
    complete: list  # complete[P]: frames complete once positions < P have run (arrangement.frames_complete)
    head_list: list  # (flatten) the head of each position's single slot, as Python ints
    identity_heads: bool  # slot n is head n at every position (delay, multistream)
    pred_pos: Tensor  # (S, K, T) the position whose output predicts each entry


class _StreamIO(nn.Module):
    """One stream's token embeddings (K tables of V+1 rows, special id last) and output heads (K × V)."""

    def __init__(self, num_codebooks: int, codebook_size: int, dim: int, zero_embed: bool = False):
        super().__init__()
        K, V, C = num_codebooks, codebook_size, dim
        # zero-initialised embeddings for an added stream: its tokens add exactly 0 to every input at first, so
        # the existing streams' outputs stay bit-identical until it is trained
        self.embed = nn.Parameter(torch.zeros(K, V + 1, C) if zero_embed else torch.randn(K, V + 1, C) * 0.02)
        self.head = nn.Parameter(torch.randn(K, V, C) * 0.02)


class DynamicsModel(nn.Module):
    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        cfg = copy.deepcopy(cfg)
        cfg.streams = list(cfg.streams)
        cfg.arrangement_options = dict(cfg.arrangement_options or {})
        cfg.validate()
        self.cfg = cfg
        try:
            self.arrangement = make_arrangement(
                cfg.arrangement, len(cfg.streams), cfg.num_codebooks, codebook_size=cfg.codebook_size,
                **cfg.arrangement_options,
            )
        except MelodjinnError as exc:
            raise ConfigError(f"dynamics.arrangement: {exc}") from None
        C = cfg.dim
        self.streams = nn.ModuleDict({name: _StreamIO(cfg.num_codebooks, cfg.codebook_size, C) for name in cfg.streams})
        self.start = nn.Parameter(torch.randn(C) * 0.02)
        self.frame_mask = nn.Parameter(torch.randn(C) * 0.02)
        self.action_embed = nn.Embedding(cfg.num_actions + 1, C)
        self.section_embed = nn.Embedding(cfg.num_sections, C)
        self.style_embed = nn.Embedding(cfg.num_styles, C) if cfg.num_styles else None
        for emb in (self.action_embed, self.section_embed, self.style_embed):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        self.register_buffer("_zero", torch.zeros(1, C), persistent=False)
        self.transformer = Transformer(TransformerConfig(
            dim=C, layers=cfg.layers, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout,
            rope_base=cfg.rope_base, max_positions=self.arrangement.num_positions(cfg.max_frames),
        ))
        self._tables_cache: TableCache[_Tables] = TableCache()

    # ---- facts ------------------------------------------------------------------------------------------------

    @property
    def null_action(self) -> int:
        """The action id meaning "no action" (A): frame 0, action dropout, the unconditional guidance branch."""
        return self.cfg.num_actions

    @property
    def num_streams(self) -> int:
        return len(self.cfg.streams)

    def _rows(self) -> _Rows:
        cfg = self.cfg
        tokens = self.num_streams * cfg.num_codebooks * (cfg.codebook_size + 1)
        action = tokens + 3
        section = action + cfg.num_actions + 1
        style = section + cfg.num_sections
        return _Rows(mask=tokens, start=tokens + 1, zero=tokens + 2, action=action, section=section, style=style,
                     total=style + cfg.num_styles)

    def _input_table(self) -> Tensor:
        # (rows, C): every embedding the input sums, so one embedding_bag builds a position (few kernel launches)
        C = self.cfg.dim
        parts = [s.embed.reshape(-1, C) for s in self.streams.values()]
        parts += [self.frame_mask.view(1, C), self.start.view(1, C), self._zero, self.action_embed.weight,
                  self.section_embed.weight]
        if self.style_embed is not None:
            parts.append(self.style_embed.weight)
        return torch.cat(parts)

    def _head_table(self) -> Tensor:
        # (S*K*V, C): head n = s*K + k is rows [n*V, (n+1)*V)
        return torch.cat([s.head.reshape(-1, self.cfg.dim) for s in self.streams.values()])

    def _tables(self, num_frames: int, device: torch.device) -> _Tables:
        def build() -> _Tables:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors: a session builds them, training reuses them
                return self._build_tables(num_frames, device)

        return self._tables_cache.get((num_frames, str(device)), build)

    def _build_tables(self, num_frames: int, device: torch.device) -> _Tables:
        arr, T = self.arrangement, num_frames
        S, K, V = arr.num_streams, arr.num_codebooks, arr.codebook_size
        seq = arr.arrange(torch.zeros(1, S, K, T, dtype=torch.long))

        def by_pos(x: Tensor) -> Tensor:
            return arr.by_position(x.unsqueeze(0))[0]  # layout without B → (L, N)

        stream, codebook, frame = by_pos(seq.stream_ids), by_pos(seq.codebook_ids), by_pos(seq.frame_ids)
        valid = by_pos(seq.mask[0])
        L, N = valid.shape
        head = stream * K + codebook
        flat = head * T + frame.clamp(min=0)
        src = torch.where(valid, flat, S * K * T)
        dst = torch.where(valid, flat, S * K * T + 1)
        pred_pos = torch.empty(S * K * T, dtype=torch.long)
        pred_pos[flat[valid]] = torch.arange(L).view(L, 1).expand(L, N)[valid]
        cond = arr.position_frames(T)
        identity = bool((head == torch.arange(N)).all())
        return _Tables(
            T=T, L=L, N=N, row_base=(head * (V + 1)).to(device), src=src.to(device), dst=dst.to(device),
            frame=frame.to(device), codebook=codebook.to(device), head=head.to(device), cond=cond.to(device),
            cond_list=cond.tolist(), complete=[arr.frames_complete(P, T) for P in range(L + 1)],
            head_list=head[:, 0].tolist() if N == 1 else [], identity_heads=identity,
            pred_pos=pred_pos.view(S, K, T).to(device),
        )

    def _known_positions(self, frames: int) -> int:
        """How many leading positions hold only entries of frames < `frames` (what a prompt fills entirely)."""
        if frames <= 0:
            return 0
        return int((self.arrangement.position_frames(frames + 1) < frames).sum())

    # ---- training ---------------------------------------------------------------------------------------------

    def forward(
        self,
        tokens: Tensor,
        actions: Optional[Tensor] = None,
        sections: Optional[Tensor] = None,
        styles: Optional[Tensor] = None,
        targets: Optional[Tensor] = None,
        *,
        generator: Optional[torch.Generator] = None,
        noise: Optional[tuple[Optional[Tensor], Optional[Tensor]]] = None,
    ):
        """Teacher-forced pass. tokens (B, S, K, T) in [0, V); actions (B, T) in [0, A] with actions[:, t] the
        transition t → t+1 (the last one unused; None = all null); sections (B, T) (None = cfg.default_section);
        styles (B,).
        Returns (logits (B, S, K, T, V), loss) — loss is None unless `targets` (B, S, K, T) is given, normally the
        tokens themselves, with IGNORE_INDEX (-100) at entries to skip (padded frames).
        Frame masking and action dropout apply in training mode only, drawn from `generator` (None = torch's
        global RNG) unless `noise` gives them (see `training_noise`).
        """
        cfg, arr = self.cfg, self.arrangement
        B, S, K, T = self._check_tokens(tokens)
        if T < 1:
            raise DynamicsError("tokens need at least one frame")
        device = tokens.device
        actions = self._check_frames(actions, B, T, "actions", cfg.num_actions + 1, self.null_action, device)
        sections = self._check_frames(sections, B, T, "sections", cfg.num_sections, cfg.default_section, device)
        styles = self._check_styles(styles, B, device)
        tab = self._tables(T, device)
        rows = self._rows()
        seq = arr.by_position(arr.arrange(tokens).tokens)  # (B, L, N)
        L, N = tab.L, tab.N
        tok = seq[:, :-1] + tab.row_base[:-1]  # (B, L-1, N): the input at index i holds position i-1's tokens
        masked, drop = (None, None)
        if self.training:
            masked, drop = noise if noise is not None else self.training_noise(B, T, generator, device)
        if masked is not None:
            masked = masked.to(device)  # (B, T)
            hit = masked[:, tab.frame[:-1].clamp(min=0)] & (tab.frame[:-1] >= 0)  # (B, L-1, N)
            tok = tok.masked_fill(hit, rows.mask)
        start = torch.full((B, 1, N), rows.zero, dtype=torch.long, device=device)
        start[:, :, 0] = rows.start
        tok = torch.cat([start, tok], 1)  # (B, L, N)
        act_frame = (tab.cond - 1).clamp(min=0)  # (L,)
        act = torch.where(tab.cond > 0, actions[:, act_frame], self.null_action)  # (B, L)
        if drop is not None:  # whole sequences, not single frames: the guidance branch is an all-null sequence
            act = act.masked_fill(drop.to(device)[:, None], self.null_action)
        cond = [act + rows.action, sections[:, tab.cond] + rows.section]  # 2 × (B, L)
        if styles is not None:
            cond.append((styles + rows.style)[:, None].expand(B, L))
        idx = torch.cat([tok, torch.stack(cond, -1)], -1)  # (B, L, N + E)
        x = F.embedding_bag(idx.view(B * L, -1), self._input_table(), mode="sum").view(B, L, cfg.dim)
        h = self.transformer(x)  # (B, L, C)
        logits = torch.stack(
            [torch.einsum("bktc,kvc->bktv", h[:, tab.pred_pos[s]], io.head) for s, io in enumerate(self.streams.values())],
            dim=1,
        )  # (B, S, K, T, V)
        loss = None
        if targets is not None:
            if tuple(targets.shape) != (B, S, K, T):
                raise DynamicsError(f"targets must have the tokens' shape {(B, S, K, T)}, got {tuple(targets.shape)}")
            loss = F.cross_entropy(logits.view(-1, cfg.codebook_size), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX)
        return logits, loss

    def training_noise(self, batch: int, frames: int, generator: Optional[torch.Generator] = None, device=None):
        """The training pass's randomness: (B, T) input frames replaced by the mask embedding and (B,) sequences
        conditioned on the null action (None where the option is off). Drawing it for a whole global batch and
        slicing each process's rows keeps distributed training independent of the number of processes."""
        cfg = self.cfg
        masked = torch.rand(batch, frames, generator=generator, device=device) < cfg.frame_mask_prob if cfg.frame_mask_prob > 0 else None
        drop = torch.rand(batch, generator=generator, device=device) < cfg.action_dropout if cfg.action_dropout > 0 else None
        return masked, drop

    # ---- generation -------------------------------------------------------------------------------------------

    def new_session(
        self,
        prompt_tokens: Optional[Tensor] = None,
        actions: Optional[Tensor] = None,
        sections: Any = None,
        styles: Optional[Tensor] = None,
        *,
        batch: Optional[int] = None,
        total_frames: Optional[int] = None,
        max_frames: Optional[int] = None,
        context_frames: Optional[int] = None,
        temperature: Any = 1.0,
        top_k: Any = 0,
        top_p: Any = 1.0,
        guidance_scale: Optional[float] = None,
        generator: Any = None,
        use_cache: bool = True,
        keep_logits: bool = False,
    ) -> DynamicsSession:
        """Start incremental generation from `prompt_tokens` (B, S, K, T0) (None or T0 = 0: from scratch, give
        `batch`). actions (B, T) / sections: per-frame values known up front (see `DynamicsSession`);
        total_frames: end the sequence there (bounded, as `generate`), else open-ended with a `max_frames` buffer
        (default: the model's `window_frames`, else its `max_frames`) that keeps the last `context_frames` (default
        half the buffer) when full; actions and a section plan longer than the buffer carry over rollovers.
        Sampling arguments as in `generate`; keep_logits records the logits every sampled entry was drawn from
        (`session.logits`)."""
        return DynamicsSession(
            self, prompt_tokens, actions, sections, styles, batch=batch, total_frames=total_frames, max_frames=max_frames,
            context_frames=context_frames, temperature=temperature, top_k=top_k, top_p=top_p,
            guidance_scale=guidance_scale, generator=generator, use_cache=use_cache, keep_logits=keep_logits,
        )

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: Optional[Tensor],
        num_frames: int,
        actions: Union[Tensor, Callable[[DynamicsSession], Any], None] = None,
        sections: Any = None,
        styles: Optional[Tensor] = None,
        *,
        prompt_actions: Optional[Tensor] = None,
        batch: Optional[int] = None,
        temperature: Any = 1.0,
        top_k: Any = 0,
        top_p: Any = 1.0,
        guidance_scale: Optional[float] = None,
        generator: Any = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue `prompt_tokens` (B, S, K, T0) by `num_frames` frames → tokens (B, S, K, T0 + num_frames).

        actions: (B, T0 + num_frames) per-frame actions (actions[:, t] = transition t → t+1, the last unused), or a
        policy `policy(session) -> (B,)` called before each new frame (prompt actions then from `prompt_actions`),
        or None (null). sections: (B, T) / (T,) ids, a name or id, or a plan [(section, frames), ...].
        temperature / top_k / top_p: scalars or one per codebook (temperature 0 = greedy; top_k 0 = off).
        guidance_scale: classifier-free guidance on actions, logits = uncond + scale · (cond − uncond), the
        unconditional branch an all-null-action sequence batched into the same forward pass. generator: a
        torch.Generator, or one per batch element (then each element is reproducible on its own).
        """
        B = self._check_tokens(prompt_tokens)[0] if prompt_tokens is not None else batch
        T0 = prompt_tokens.shape[-1] if prompt_tokens is not None else 0
        if not isinstance(num_frames, int) or num_frames < 0:
            raise DynamicsError(f"num_frames must be an int >= 0, got {num_frames!r}")
        policy = actions if callable(actions) else None
        if isinstance(actions, Tensor) and (actions.dim() != 2 or actions.shape[1] < T0 + num_frames - 1):
            raise DynamicsError(f"actions must be (B, T0 + num_frames) = (B, {T0 + num_frames}) (the last may be left "
                                f"out: it is unused), got {tuple(actions.shape)}")
        # past the training window, roll the context over (the model never learned to attend further back)
        window = self.cfg.window_frames
        rolling = 0 < window < T0 + num_frames
        session = self.new_session(
            prompt_tokens, prompt_actions if policy is not None else actions, sections, styles, batch=B,
            total_frames=None if rolling else T0 + num_frames, max_frames=max(window, T0 + 1) if rolling else None,
            temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale, generator=generator,
            use_cache=use_cache,
        )
        if policy is not None:
            frames = [session.step(policy(session)) for _ in range(num_frames)]
        else:
            frames = [session.step(num_frames=num_frames)]
        prompt = session.tokens[..., :0] if prompt_tokens is None else prompt_tokens.to(session.buf.device)
        return torch.cat([prompt, *frames], -1)

    # ---- growing and fine-tuning ------------------------------------------------------------------------------

    def add_stream(self, name: str, delays: Optional[Sequence[int]] = None, like: Optional[str] = None) -> DynamicsModel:
        """Add a stream (in place; returns self): new token embeddings (zero-initialised, so existing outputs stay
        bit-identical until it trains) and heads; the backbone and existing streams are kept exactly.
        `delays`: the new stream's codebook delays (multistream; default 0..K-1). Needs delay or multistream.
        `like`: start the new stream's embeddings and heads as copies of that existing stream's instead. The streams
        share one codec, so a token means the same code in both, and what the backbone learnt about the old
        stream's tokens (e.g. that a held sound repeats its codes) applies at once; the old streams' outputs then
        change from the first step, since the new stream's tokens are no longer zero inputs."""
        arr, cfg = self.arrangement, self.cfg
        if name in self.streams or not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"add_stream: stream name must be new, non-empty and without '.', got {name!r}")
        if like is not None and like not in self.streams:
            raise ConfigError(f"add_stream: like={like!r} is not a stream of this model; streams are {cfg.streams}")
        if arr.name == "multistream":
            new = arr.with_added_stream(delays)
        elif arr.name == "delay":
            if delays is not None and list(delays) != list(arr.codebook_delays):
                raise ConfigError("add_stream: the delay arrangement uses the same codebook delays for every stream; "
                                  "use multistream for per-stream delays")
            new = make_arrangement("delay", arr.num_streams + 1, arr.num_codebooks, codebook_size=arr.codebook_size,
                                   codebook_delays=list(arr.codebook_delays))
        else:
            raise ConfigError(f"add_stream needs the multistream (or delay) arrangement; {arr.name!r} interleaves "
                              "streams by position, so adding one would move every existing token")
        if new.min_delay < arr.min_delay:
            raise ConfigError(f"add_stream: delays {list(new.delays[-1])} go below the smallest existing delay "
                              f"{arr.min_delay}; that would shift which frame's action conditions each position")
        param = self.start
        self.streams[name] = _StreamIO(cfg.num_codebooks, cfg.codebook_size, cfg.dim, zero_embed=True).to(param.device, param.dtype)
        if like is not None:
            with torch.no_grad():
                self.streams[name].embed.copy_(self.streams[like].embed)
                self.streams[name].head.copy_(self.streams[like].head)
        self.arrangement = new
        cfg.streams.append(name)
        cfg.arrangement_options = new.options()
        self._tables_cache.clear()
        needed = new.num_positions(cfg.max_frames)
        rotary = self.transformer.rotary
        if needed > rotary.max_positions:  # the table's rows do not depend on its length: old positions unchanged
            fresh = Rotary(cfg.dim // cfg.heads, needed, cfg.rope_base).to(rotary.cis.device)
            rotary.cis = fresh.cis
            self.transformer.cfg.max_positions = needed
        return self

    @torch.no_grad()
    def shrink_and_perturb(self, shrink: float, perturb: float) -> DynamicsModel:
        """θ ← shrink·θ + perturb·θ_fresh for every parameter (in place; returns self), θ_fresh a fresh initialisation
        of this model (Ash & Adams 2020, "On warm-starting neural network training"). A model warm-started from one
        trained on the same clips ends behind a fresh one; the shrunk weights keep what it learnt, the fresh part
        gives back an initialisation's spread. shrink=1, perturb=0 is a plain warm start: nothing changes and no
        random numbers are drawn."""
        if not (0 < shrink <= 1 and perturb >= 0):
            raise ConfigError(f"shrink_and_perturb: shrink must be in (0, 1] and perturb >= 0, got {shrink}, {perturb}")
        if shrink == 1 and perturb == 0:
            return self
        fresh = DynamicsModel(self.cfg).state_dict()
        for name, p in self.named_parameters():
            p.mul_(shrink).add_(fresh[name].to(p.device, p.dtype), alpha=perturb)
        return self

    def freeze_backbone(self, train_streams: Sequence[str]) -> list[str]:
        """Freeze every parameter except the embeddings and heads of `train_streams` (e.g. a newly added stream);
        returns the names of the parameters left trainable. `unfreeze()` undoes it."""
        unknown = [s for s in train_streams if s not in self.streams]
        if unknown:
            raise ConfigError(f"freeze_backbone: unknown stream(s) {unknown}; streams are {self.cfg.streams}")
        keep = {f"streams.{s}.{p}" for s in train_streams for p in ("embed", "head")}
        for pname, p in self.named_parameters():
            p.requires_grad_(pname in keep)
        return sorted(keep)

    def unfreeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(True)

    # ---- save / load ------------------------------------------------------------------------------------------

    def config_dict(self) -> dict:
        """The config as a plain JSON-friendly dict (streams and arrangement options as they are now)."""
        return as_plain_dict(self.cfg)

    @classmethod
    def from_config_dict(cls, config: dict) -> DynamicsModel:
        """A fresh model from `config_dict()`; unknown keys or bad values raise ConfigError naming the key."""
        return cls(to_dataclass(DynamicsConfig, dict(config), "dynamics"))

    def load_weights(self, state_dict: dict) -> None:
        """`load_state_dict` that names what does not match (missing, unexpected, shape) in a CheckpointError."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(
                "dynamics checkpoint does not match the config: "
                + "; ".join(x for x in (f"missing {missing}" if missing else "",
                                        f"unexpected {unexpected}" if unexpected else "",
                                        f"shape mismatch {shapes}" if shapes else "") if x)
                + " — build the model from the checkpoint's own config.json"
            )
        self.load_state_dict(state_dict)

    # ---- input checks -----------------------------------------------------------------------------------------

    def _check_tokens(self, tokens: Tensor) -> tuple[int, int, int, int]:
        if not isinstance(tokens, Tensor) or tokens.dim() != 4:
            shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise DynamicsError(f"tokens must be a (B, S, K, T) integer tensor, got {shape}")
        B, S, K, T = tokens.shape
        if (S, K) != (self.num_streams, self.cfg.num_codebooks):
            raise DynamicsError(f"tokens have S={S}, K={K}; the model has S={self.num_streams} streams "
                                f"{self.cfg.streams} and K={self.cfg.num_codebooks} codebooks")
        return B, S, K, T

    @staticmethod
    def _check_frames(x, B: int, T: int, what: str, limit: int, default: int, device) -> Tensor:
        if x is None:
            return torch.full((B, T), default, dtype=torch.long, device=device)
        x = torch.as_tensor(x, device=device)
        if x.dim() == 1 and x.shape[0] == T:
            x = x.expand(B, T)
        if tuple(x.shape) != (B, T) or x.dtype.is_floating_point:
            raise DynamicsError(f"{what} must be integers of shape (B, T) = {(B, T)}, got {tuple(x.shape)} {x.dtype}")
        if x.numel() and (int(x.min()) < 0 or int(x.max()) >= limit):
            raise DynamicsError(f"{what} must lie in [0, {limit}), got [{int(x.min())}, {int(x.max())}]")
        return x.long()

    def _check_styles(self, styles, B: int, device) -> Optional[Tensor]:
        n = self.cfg.num_styles
        if n == 0:
            if styles is not None:
                raise DynamicsError("styles given but the model has num_styles=0")
            return None
        if styles is None:
            return torch.zeros(B, dtype=torch.long, device=device)
        styles = torch.as_tensor(styles, device=device).long().reshape(-1).expand(B)
        if int(styles.min()) < 0 or int(styles.max()) >= n:
            raise DynamicsError(f"styles must lie in [0, {n}), got {styles.tolist()}")
        return styles


# ---- helpers ------------------------------------------------------------------------------------------------------


def expand_actions(actions: Tensor, stride: int, num_frames: int, null_action: int) -> Tensor:
    """LAM actions (B, J) at `stride` frames per action → per-frame actions (B, num_frames) in the dynamics'
    convention (out[:, f] conditions frame f+1). Action j explains patch j → j+1 (frames [j·s, (j+1)·s) →
    [(j+1)·s, (j+2)·s)), so it conditions every frame of patch j+1: out[:, f] = actions[:, (f+1)//s - 1], and null
    where that index is < 0 or past the given actions."""
    B, J = actions.shape
    f = torch.arange(num_frames, device=actions.device)
    j = (f + 1) // stride - 1  # (T,)
    ok = (j >= 0) & (j < J)
    out = actions[:, j.clamp(0, max(J - 1, 0))] if J else actions.new_zeros(B, num_frames)
    return torch.where(ok, out, null_action)


def section_ids(sections: Any, batch: int, num_frames: int, num_sections: int = len(SECTIONS)) -> Tensor:
    """Per-frame section ids (B, T) from: (B, T) / (T,) ids (shorter input repeats its last frame), a name or id
    for all frames, or a plan [(section, frames), ...] (the last section runs on to the end)."""
    def one(s) -> int:
        if isinstance(s, str):
            if s not in SECTIONS:
                raise DynamicsError(f"unknown section {s!r}; choose one of {', '.join(SECTIONS)}")
            return SECTIONS.index(s)
        s = int(s)
        if not 0 <= s < num_sections:
            raise DynamicsError(f"section ids must lie in [0, {num_sections}), got {s}")
        return s

    if sections is None:
        return torch.zeros(batch, num_frames, dtype=torch.long)
    if isinstance(sections, (str, int)):
        return torch.full((batch, num_frames), one(sections), dtype=torch.long)
    if isinstance(sections, Tensor):
        x = sections.long().cpu()
        if x.dim() == 1:
            x = x.expand(batch, -1)
        if x.dim() != 2 or x.shape[0] != batch or x.shape[1] == 0:
            raise DynamicsError(f"sections must be (B, T) or (T,) with B={batch}, got {tuple(sections.shape)}")
        if int(x.min()) < 0 or int(x.max()) >= num_sections:
            raise DynamicsError(f"section ids must lie in [0, {num_sections}), got [{int(x.min())}, {int(x.max())}]")
        if x.shape[1] < num_frames:
            x = torch.cat([x, x[:, -1:].expand(batch, num_frames - x.shape[1])], 1)
        return x[:, :num_frames].contiguous()
    plan = list(sections)
    ids: list[int] = []
    for item in plan:
        try:
            s, n = item
        except (TypeError, ValueError):
            raise DynamicsError(f"a section plan is a list of (section, frames) pairs, got item {item!r}") from None
        ids += [one(s)] * int(n)
    if not ids:
        raise DynamicsError("empty section plan")
    ids += [ids[-1]] * max(num_frames - len(ids), 0)
    return torch.tensor(ids[:num_frames], dtype=torch.long).expand(batch, num_frames).contiguous()


def _per_codebook(value: Any, K: int, what: str, cast) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [cast(value)] * K
    if isinstance(value, Tensor) and value.dim() == 0:
        return [cast(value.item())] * K
    items = list(value)
    if len(items) != K:
        raise DynamicsError(f"{what} must be a scalar or one value per codebook (K={K}), got {items}")
    return [cast(v) for v in items]


# ---- incremental generation ---------------------------------------------------------------------------------------


class DynamicsSession:
    """Step-by-step generation with the KV cache: holds the cache, a frame-aligned token buffer and the per-frame
    actions and sections. Frames are *complete* once every codebook of every stream is sampled.

    `step(actions, sections, num_frames)` generates until `num_frames` more frames are complete and returns them
    (B, S, K, num_frames). Its `actions` (B,) become the actions of the frames first touched in that step: frame f
    is conditioned on actions[f-1] the first time a position predicting f runs (then it is fixed). In a delayed
    arrangement that is `max_delay - min_delay` frames ahead of the frames the step completes (see the module
    docstring); `next_frame` says which frame the next action goes to. Actions/sections given at creation for
    future frames are used where a step passes None; an unset action is null, an unset section repeats the last.

    Bounded (`total_frames` given, as `generate` uses): the sequence ends there, like a training crop.
    Open-ended (default): runs as long as wanted; when the buffer of `max_frames` is full, the cache is rebuilt
    from the last `context_frames` complete frames (rotary positions are relative, so this is a fresh crop).
    Batch elements never interact: per-element generators make each reproducible on its own.
    The session snapshots the model's weights when it starts; start a new one after training.
    """

    @torch.inference_mode()
    def __init__(self, model: DynamicsModel, prompt_tokens, actions, sections, styles, *, batch, total_frames, max_frames,
                 context_frames, temperature, top_k, top_p, guidance_scale, generator, use_cache, keep_logits):
        cfg, arr = model.cfg, model.arrangement
        self.model, self.arrangement = model, arr
        device = model.start.device
        if prompt_tokens is None:
            if batch is None:
                raise DynamicsError("give prompt_tokens (B, S, K, T0) or batch=B to start from nothing")
            prompt_tokens = torch.zeros(batch, model.num_streams, cfg.num_codebooks, 0, dtype=torch.long, device=device)
        B, S, K, T0 = model._check_tokens(prompt_tokens)
        if T0 and (int(prompt_tokens.min()) < 0 or int(prompt_tokens.max()) >= cfg.codebook_size):
            raise DynamicsError(f"prompt tokens must lie in [0, {cfg.codebook_size})")
        self.bounded = total_frames is not None
        Tbuf = int(total_frames) if self.bounded else int(max_frames or cfg.window_frames or cfg.max_frames)
        if Tbuf < max(T0, 1):
            raise DynamicsError(f"the session holds {Tbuf} frames (total_frames / max_frames) but the prompt has {T0}; "
                                "pass a shorter prompt or a larger max_frames")
        if arr.num_positions(Tbuf) > model.transformer.rotary.max_positions:
            raise DynamicsError(f"{Tbuf} frames need {arr.num_positions(Tbuf)} positions, more than the model's "
                                f"max_frames={cfg.max_frames} allows; pass fewer frames or raise dynamics.max_frames")
        self.B, self.S, self.K, self.V, self.Tbuf = B, S, K, cfg.codebook_size, Tbuf
        self.tab = tab = model._tables(Tbuf, device)
        self.limit = tab.L if self.bounded else model._known_positions(Tbuf)  # positions this buffer can run
        self.context_frames = int(context_frames or max(Tbuf // 2, 1))
        if not self.bounded and not 0 < self.context_frames < Tbuf:
            raise DynamicsError(f"context_frames must lie in [1, max_frames={Tbuf}), got {self.context_frames}")
        self.special_cell, self.dump_cell = S * K * Tbuf, S * K * Tbuf + 1
        self.buf = torch.full((B, S * K * Tbuf + 2), arr.special_id, dtype=torch.long, device=device)
        self.grid = self.buf[:, : S * K * Tbuf].view(B, S, K, Tbuf)  # frame-aligned view of the buffer
        self.grid[..., :T0] = prompt_tokens.to(device)
        self.act = torch.full((B, Tbuf), -1, dtype=torch.long, device=device)  # act[:, f]: transition f → f+1
        self.sec = torch.full((B, Tbuf), -1, dtype=torch.long, device=device)
        if actions is not None:
            a = torch.as_tensor(actions, device=device).long()
            if a.dim() != 2 or a.shape[0] != B:
                raise DynamicsError(f"actions must be (B, T) with B={B}, got {tuple(a.shape)}")
            if a.numel() and (int(a.min()) < 0 or int(a.max()) > cfg.num_actions):
                raise DynamicsError(f"actions must lie in [0, {cfg.num_actions}] ({cfg.num_actions} = null)")
            n = min(a.shape[1], Tbuf)
            self.act[:, :n] = a[:, :n]
        self.act_preset = n if actions is not None else 0  # leading entries given up front
        # (B, n) actions past the buffer's end, applied after rollovers (open-ended); a bounded session never gets there
        self.act_pending = a[:, Tbuf:] if actions is not None and a.shape[1] > Tbuf and not self.bounded else None
        self.sec_preset = 0  # frames [0, sec_preset) of the buffer hold scheduled sections
        self.sec_pending: Optional[Tensor] = None  # (B, n) scheduled sections past the buffer's end (open-ended)
        self.cond_fixed = 0  # frames whose action/section are fixed
        self.offset = 0  # frames dropped from the front by rollovers
        if sections is not None:
            self.plan_sections(sections)
        self.style = model._check_styles(styles, B, device)
        self.guided = guidance_scale is not None
        self.scale = float(guidance_scale) if self.guided else 1.0
        self.rows = rows = model._rows()
        self.table = model._input_table()
        self.heads_t = model._head_table().t().contiguous()  # (C, S*K*V): mm needs no re-pack per step
        Bx = 2 * B if self.guided else B
        self.E = 2 + (self.style is not None)
        self.cond_rows = torch.zeros(Bx, Tbuf, self.E, dtype=torch.long, device=device)  # bag rows per frame
        if self.style is not None:
            self.cond_rows[:, :, 2] = (self.style.repeat(Bx // B) + rows.style)[:, None]
        if self.guided:  # the unconditional branch: null action everywhere
            self.cond_rows[B:, :, 0] = rows.action + model.null_action
        start = torch.full((tab.N,), rows.zero, dtype=torch.long, device=device)
        start[0] = rows.start
        self.start_rows = start.expand(Bx, tab.N)
        # sampling settings per (position, slot), through each slot's codebook
        self.temperature = torch.tensor(_per_codebook(temperature, K, "temperature", float), device=device)
        self.top_k = torch.tensor(_per_codebook(top_k, K, "top_k", int), device=device)
        self.top_p = torch.tensor(_per_codebook(top_p, K, "top_p", float), device=device)
        if (self.temperature < 0).any() or (self.top_k < 0).any() or ((self.top_p <= 0) | (self.top_p > 1)).any():
            raise DynamicsError("temperature must be >= 0, top_k >= 0 (0 = off), top_p in (0, 1]")
        self.greedy = bool((self.temperature == 0).all())
        self.filtering = bool((self.top_k > 0).any() or (self.top_p < 1).any())
        self.temp_tab = self.temperature[tab.codebook].clamp(min=1e-5)  # (L, N)
        self.greedy_tab = self.temperature[tab.codebook] == 0
        self.topk_tab = torch.where(self.top_k[tab.codebook] > 0, self.top_k[tab.codebook], self.V).clamp(max=self.V)
        self.topp_tab = self.top_p[tab.codebook]
        if generator is None or isinstance(generator, torch.Generator):
            self.generators = generator
        else:
            self.generators = list(generator)
            if len(self.generators) != B or not all(isinstance(g, torch.Generator) for g in self.generators):
                raise DynamicsError(f"generator must be a torch.Generator or a list of B={B} of them")
            self.uniforms = torch.empty(B, tab.N, device=device)  # each row drawn in place from its generator
        # per-position rows as Python lists of views: the step loop indexes lists, not tensors
        self.src_rows, self.dst_rows = list(tab.src.unbind(0)), list(tab.dst.unbind(0))
        self.base_rows = list(tab.row_base.unbind(0))
        # (N, 1) each; None when every temperature is 1 (dividing by 1 changes nothing, so skip the op)
        self.temp_rows = None if bool((self.temperature == 1).all()) else list(self.temp_tab[:, :, None].unbind(0))
        self.step_idx = torch.empty(Bx, tab.N + self.E, dtype=torch.long, device=device)  # one step's bag indices
        self.step_tokens, self.step_cond = self.step_idx[:B, : tab.N], self.step_idx[:, tab.N :]
        self.step_offsets = torch.arange(Bx, device=device) * (tab.N + self.E)  # one bag per sequence
        self.any_greedy = bool((self.temperature == 0).any())
        self.use_cache = use_cache
        self.cache = model.transformer.new_cache(Bx, max_positions=tab.L) if use_cache else None
        self.decoder = model.transformer.decoder() if use_cache else None
        self.logits_buf = None
        if keep_logits:
            self.logits_buf = torch.full((B, S * K * Tbuf + 2, self.V), float("nan"), device=device)
        self.hidden = None  # (B, C) the last position's output state (the conditional branch)
        self.known = self.frames = T0  # frames whose tokens were given / that are complete
        self.positions = 0  # positions run (= inputs in the cache)
        self._prefill()

    # ---- public state ---------------------------------------------------------------------------------------

    @property
    def tokens(self) -> Tensor:
        """(B, S, K, frames) the complete frames held now (prompt included; after a rollover, the window)."""
        return self.grid[..., : self.frames].clone()

    @property
    def actions(self) -> Tensor:
        """(B, frames) per-frame actions, actions[:, t] = transition t → t+1 (null where unset/not yet fixed)."""
        a = self.act[:, : self.frames].clone()
        return a.masked_fill_(a < 0, self.model.null_action)

    @property
    def sections(self) -> Tensor:
        """(B, frames) per-frame section ids."""
        return self.sec[:, : self.frames].clamp(min=0)

    @property
    def logits(self) -> Tensor:
        """(B, S, K, frames, V) the (guided) logits each sampled entry was drawn from; needs keep_logits=True.
        NaN for entries that were never predicted one at a time (prompt entries fed in one prefill). The buffer
        holds B·S·K·max_frames·V floats: meant for tests, scoring and short rollouts."""
        if self.logits_buf is None:
            raise DynamicsError("start the session with keep_logits=True to read logits")
        grid = self.logits_buf[:, : self.special_cell].view(self.B, self.S, self.K, self.Tbuf, self.V)
        return grid[..., : self.frames, :].clone()

    @property
    def next_frame(self) -> int:
        """The first frame whose action is not fixed yet: the next step's action conditions frames from here."""
        return self.cond_fixed

    @property
    def absolute_frames(self) -> int:
        """Complete frames since the session started, prompt included (rollovers do not reset it)."""
        return self.offset + self.frames

    # ---- structure ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def plan_sections(self, plan: Any) -> None:
        """Schedule the song's form from `next_frame` on: a plan [(section, frames), ...] (names or ids), per-frame
        ids (B, n) / (n,), or one section (name or id) from now on. The last planned section runs on after the plan;
        a step's `sections` overrides the frames that step starts only; a new plan replaces the whole schedule.
        An open-ended session keeps the part of a plan that runs past its buffer and applies it after rollovers,
        so a whole song's plan can be given to a session whose window is shorter than the song."""
        if isinstance(plan, Tensor):
            n = plan.shape[-1]
        elif isinstance(plan, (str, int)):
            n = 1
        else:
            try:
                n = sum(int(frames) for _, frames in plan)
            except (TypeError, ValueError):
                raise DynamicsError(f"a section plan is a list of (section, frames) pairs, got {plan!r}") from None
        start = self.cond_fixed
        room = self.Tbuf - start
        # the last planned section runs on to the buffer's end (a step's `sections` may still override frames)
        ids = section_ids(plan, self.B, max(n, room), self.model.cfg.num_sections).to(self.sec.device)
        self.sec[:, start:] = ids[:, :room]
        self.sec_preset = self.Tbuf
        # frames past a bounded session's end are never generated; an open-ended one keeps them for later
        self.sec_pending = ids[:, room:] if ids.shape[1] > room and not self.bounded else None

    # ---- stepping -------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, actions: Any = None, sections: Any = None, num_frames: int = 1) -> Tensor:
        """Generate until `num_frames` more frames are complete; returns them (B, S, K, num_frames).
        actions: (B,) ids in [0, A] (A = null) or an int, for the frames this step starts; or (B, n), column i
        for the i-th frame it starts (the last column for any after the n-th); None = preset / null.
        sections: (B,) ids, an int or a name, for the frames this step starts; None = preset / the previous
        frame's section."""
        if not isinstance(num_frames, int) or num_frames < 0:
            raise DynamicsError(f"num_frames must be an int >= 0, got {num_frames!r}")
        a = self._step_values(actions, self.model.cfg.num_actions + 1, "actions", per_frame=True)
        s = self._step_values(sections, self.model.cfg.num_sections, "sections")
        target = self.frames + num_frames
        if self.bounded and target > self.Tbuf:
            raise DynamicsError(f"the session ends at {self.Tbuf} frames; {self.frames} done, {num_frames} asked")
        chunks, start, started = [], self.frames, 0  # started: frames this step has fixed the conditioning of
        while self.frames < target:
            if self.positions >= self.limit:
                chunks.append(self.grid[..., start : self.frames].clone())
                shift = self._rollover()
                target -= shift
                start = self.frames
            if self.tab.cond_list[self.positions] >= self.cond_fixed:
                # the step's values hold for every frame it starts: fix them once for all its positions, not
                # once per position (the last one runs just before `target` frames are complete)
                last = min(bisect.bisect_left(self.tab.complete, target), self.limit) - 1
                started += self._fix_conditioning(self.tab.cond_list[last], a, s, started)
            self._run(self.positions)
            self.frames = max(self.known, self.tab.complete[self.positions])
        chunks.append(self.grid[..., start:target].clone())
        return torch.cat(chunks, -1) if len(chunks) > 1 else chunks[0]

    def _step_values(self, x, limit: int, what: str, per_frame: bool = False) -> Optional[Tensor]:
        # → (B,) values, or (B, n) per started frame where `per_frame` allows them
        if x is None:
            return None
        if isinstance(x, str):
            x = section_ids(x, 1, 1)[0, 0]
        x = torch.as_tensor(x, device=self.buf.device).long()
        if not (per_frame and x.dim() == 2 and x.shape[0] == self.B and x.shape[1] > 0):
            if x.numel() not in (1, self.B):
                shapes = f"one value or (B={self.B},)" + (" or (B, frames)" if per_frame else "")
                raise DynamicsError(f"{what} must be {shapes}, got shape {tuple(x.shape)}")
            x = x.reshape(-1).expand(self.B)
        lo, hi = torch.aminmax(x)
        if int(lo) < 0 or int(hi) >= limit:
            raise DynamicsError(f"{what} must lie in [0, {limit}), got {x.tolist()}")
        return x

    def _fix_conditioning(self, upto: int, actions: Optional[Tensor], sections: Optional[Tensor], column: int = 0) -> int:
        # fix frames cond_fixed..upto: the step's values where given, else the preset ones, else null / previous.
        # Per-frame actions (B, n): frame cond_fixed takes column `column`, the next ones the following columns.
        # Returns how many frames it fixed.
        g0, g1 = self.cond_fixed, upto + 1
        if g1 <= g0:  # already fixed (a rebuilt cache re-reads fixed frames)
            return 0
        lo = max(g0 - 1, 0)  # act[:, lo : g1-1] conditions frames max(g0, 1)..g1-1
        if g1 - 1 > lo:
            if actions is not None and actions.dim() == 2:
                columns = torch.arange(lo + 1 - g0 + column, g1 - g0 + column, device=actions.device)
                self.act[:, lo : g1 - 1] = actions[:, columns.clamp_(max=actions.shape[1] - 1)]
            elif actions is not None:
                self.act[:, lo : g1 - 1] = actions[:, None]
            elif g1 - 1 > self.act_preset:
                self.act[:, max(lo, self.act_preset) : g1 - 1] = self.model.null_action
        if sections is not None:
            self.sec[:, g0:g1] = sections[:, None]
        elif g1 > self.sec_preset:
            for g in range(max(g0, self.sec_preset), g1):
                self.sec[:, g] = self.sec[:, g - 1] if g > 0 else self.model.cfg.default_section
        self._write_cond_rows(g0, g1)
        self.cond_fixed = g1
        return g1 - g0

    def _write_cond_rows(self, g0: int, g1: int) -> None:
        rows, B, cond = self.rows, self.B, self.cond_rows
        if g0 == 0:  # frame 0 has no transition into it
            cond[:B, 0, 0] = rows.action + self.model.null_action
        g = max(g0, 1)
        if g1 > g:
            cond[:B, g:g1, 0] = self.act[:, g - 1 : g1 - 1] + rows.action
        cond[:B, g0:g1, 1] = self.sec[:, g0:g1] + rows.section
        if self.guided:
            cond[B:, g0:g1, 1] = cond[:B, g0:g1, 1]

    def _inputs(self, p0: int, p1: int) -> Tensor:
        """Input embeddings (Bx, p1 - p0, C) for input indices p0..p1-1 (index i holds position i-1's tokens)."""
        tab, Bx = self.tab, self.cond_rows.shape[0]
        parts = []
        if p0 == 0:
            parts.append(self.start_rows[:, None])
            p0 = 1
        if p1 > p0:
            src = tab.src[p0 - 1 : p1 - 1]  # (n, N)
            tok = self.buf.index_select(1, src.reshape(-1)).view(self.B, -1, tab.N) + tab.row_base[p0 - 1 : p1 - 1]
            parts.append(tok.repeat(2, 1, 1) if self.guided else tok)
        tok = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # (Bx, n, N)
        n = tok.shape[1]
        cond = self.cond_rows[:, tab.cond[p1 - n : p1]]  # (Bx, n, E)
        idx = torch.cat([tok, cond], -1)
        return F.embedding_bag(idx.view(Bx * n, -1), self.table, mode="sum").view(Bx, n, -1)

    def _prefill(self) -> None:
        P0 = self.model._known_positions(self.known)
        if P0:
            self._fix_conditioning(self.tab.cond_list[P0 - 1], None, None)
            if self.use_cache:
                h = self.model.transformer(self._inputs(0, P0), self.cache)
                self.hidden = h[: self.B, -1]
        self.positions = P0
        # positions up to here hold given entries beside the ones to sample: those must not be overwritten
        holds = ((self.tab.frame >= 0) & (self.tab.frame < self.known)).any(1).nonzero()
        self.forced_until = int(holds.max()) + 1 if len(holds) else 0

    def _step_input(self, p: int, f: int) -> Tensor:
        # the input (Bx, C) at index p: position p-1's tokens (or the start) + frame f's conditioning
        idx, B, N = self.step_idx, self.B, self.tab.N
        if p == 0:
            idx[:, :N] = self.start_rows
        else:
            torch.add(self.buf.index_select(1, self.src_rows[p - 1]), self.base_rows[p - 1], out=self.step_tokens)
            if self.guided:
                idx[B:, :N] = self.step_tokens
        self.step_cond.copy_(self.cond_rows[:, f])
        return torch.embedding_bag(self.table, idx.view(-1), self.step_offsets, False, 0)[0]  # mode 0 = sum

    def _run(self, p: int) -> None:
        # run position p, whose frame's conditioning is fixed, and sample its tokens
        tab, B = self.tab, self.B
        if self.use_cache:
            h = self.decoder.step(self._step_input(p, tab.cond_list[p]), self.cache)  # (Bx, C)
        else:  # recompute the whole prefix (the KV-cache benchmark's baseline)
            h = self.model.transformer(self._inputs(0, p + 1))[:, -1]
        if tab.identity_heads:
            logits = torch.mm(h, self.heads_t).view(h.shape[0], tab.N, self.V)  # (Bx, N, V)
        elif tab.N == 1:
            hid = tab.head_list[p]
            logits = torch.mm(h, self.heads_t[:, hid * self.V : (hid + 1) * self.V]).view(h.shape[0], 1, self.V)
        else:  # no built-in arrangement lands here; correct but slow
            w = self.heads_t.t().reshape(-1, self.V, h.shape[-1])[tab.head[p]]  # (N, V, C)
            logits = torch.einsum("bc,nvc->bnv", h, w)
        if self.guided:  # lerp is exact at 0 and 1: scale 1 gives the conditional logits bit for bit
            logits = torch.lerp(logits[B:], logits[:B], self.scale)
        tokens = self._sample(logits, p)  # (B, N)
        dst = self.dst_rows[p]
        if p < self.forced_until:
            dst = torch.where(tab.frame[p] < self.known, self.dump_cell, dst)
        self.buf.index_copy_(1, dst, tokens)  # padding slots all land in the dump cell
        if self.logits_buf is not None:
            self.logits_buf.index_copy_(1, dst, logits)
        self.hidden = h[:B]
        self.positions = p + 1

    def _sample(self, logits: Tensor, p: int) -> Tensor:
        # logits (B, N, V) → tokens (B, N); inverse-CDF sampling with one uniform per slot, so every element draws
        # the same numbers from its own generator however the batch is made up
        if self.greedy:
            return logits.argmax(-1)
        B, N, V = logits.shape
        u = self._uniforms(B, N, logits.device)  # (B, N)
        x = logits if self.temp_rows is None else logits / self.temp_rows[p]
        if self.filtering:
            x, order = x.sort(-1, descending=True)
            probs = x.softmax(-1)
            before = probs.cumsum(-1) - probs  # mass of the better tokens
            keep = (torch.arange(V, device=x.device) < self.topk_tab[p][:, None]) & (before < self.topp_tab[p][:, None])
            x = x.masked_fill(~keep, float("-inf"))
        cdf = x.softmax(-1).cumsum_(-1)  # (B, N, V)
        j = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:]).squeeze_(-1).clamp_(max=V - 1)  # (B, N)
        tokens = order.gather(-1, j[..., None])[..., 0] if self.filtering else j
        if self.any_greedy:
            tokens = torch.where(self.greedy_tab[p], logits.argmax(-1), tokens)
        return tokens

    def _uniforms(self, B: int, N: int, device) -> Tensor:
        g = self.generators
        if isinstance(g, list):
            for row, gi in zip(self.uniforms, g):
                torch.rand(N, generator=gi, out=row)
            return self.uniforms
        return torch.rand(B, N, generator=g, device=device)

    @staticmethod
    def _carry_on(buf: Tensor, preset: int, pending: Optional[Tensor], end: int) -> tuple[int, Optional[Tensor]]:
        # after a rollover, move the next pending values (given up front, past the old buffer) into the freed room
        if pending is None or preset != end:
            return preset, pending
        n = min(buf.shape[1] - preset, pending.shape[1])
        buf[:, preset : preset + n] = pending[:, :n]
        return preset + n, (pending[:, n:] if pending.shape[1] > n else None)

    def _rollover(self) -> int:
        """The buffer is full: keep the last `context_frames` complete frames and rebuild the cache from them."""
        if self.bounded:
            raise DynamicsError("bounded session is complete")  # step() checks first; a bug if reached
        W = min(self.context_frames, self.frames)
        shift = self.frames - W
        if shift <= 0:
            raise DynamicsError(f"cannot make room: context_frames={self.context_frames} >= the {self.frames} "
                                f"frames held; lower context_frames")
        Tb = self.Tbuf
        self.grid[..., :W] = self.grid[..., shift : self.frames].clone()
        self.grid[..., W:] = self.arrangement.special_id
        for buf in (self.act, self.sec):  # fixed actions of frames not yet complete are kept and reused
            buf[:, : Tb - shift] = buf[:, shift:].clone()
            buf[:, Tb - shift :] = -1
        if self.logits_buf is not None:
            grid = self.logits_buf[:, : self.special_cell].view(self.B, self.S, self.K, Tb, self.V)
            grid[..., :W, :] = grid[..., shift : self.frames, :].clone()
            grid[..., W:, :] = float("nan")
        self.cond_fixed -= shift
        self.act_preset, self.sec_preset = max(self.act_preset - shift, 0), max(self.sec_preset - shift, 0)
        # actions and a plan longer than the buffer go on
        self.act_preset, self.act_pending = self._carry_on(self.act, self.act_preset, self.act_pending, Tb - shift)
        self.sec_preset, self.sec_pending = self._carry_on(self.sec, self.sec_preset, self.sec_pending, Tb - shift)
        self._write_cond_rows(0, self.cond_fixed)
        self.offset += shift
        self.known = self.frames = W
        if self.cache is not None:
            self.cache.length = 0
        self._prefill()
        return shift


def time_generation(
    model: DynamicsModel,
    context_frames: int = 1000,
    frames: int = 50,
    *,
    use_cache: bool = True,
    batch: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """Time per generated frame after a `context_frames` prompt (open-ended session, one frame per step): wall
    seconds and this process's CPU seconds (the latter is what to trust on a shared, busy machine)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, cfg.codebook_size, (batch, model.num_streams, cfg.num_codebooks, context_frames), generator=g)
    lag = 2 * cfg.num_codebooks + 8
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    session = model.new_session(prompt, max_frames=context_frames + frames + lag, temperature=temperature,
                                generator=g, use_cache=use_cache)
    prefill = time.perf_counter() - t0
    session.step(torch.zeros(batch, dtype=torch.long))  # warm-up (includes the lookahead positions)
    actions = [torch.full((batch,), i % cfg.num_actions, dtype=torch.long) for i in range(frames - 1)]
    t0, c0 = time.perf_counter(), time.process_time()
    for a in actions:
        session.step(a)
    n = max(frames - 1, 1)
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    model.train(was_training)
    return {"arrangement": model.arrangement.name, "context_frames": context_frames, "use_cache": use_cache,
            "batch": batch, "prefill_s": prefill, "seconds_per_frame": wall, "cpu_seconds_per_frame": cpu,
            "realtime_factor": 1.0 / (75.0 * wall), "threads": torch.get_num_threads()}
