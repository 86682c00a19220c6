"""Token arrangements (world_model/arrangements.py): exact round trips, placement, masks, generation helpers, errors.

Each arrangement is checked against a naive loop-by-loop reference layout built here, independently of the
module's index tables.
"""

from __future__ import annotations

import json

import pytest
import torch

from melodjinn.world_model import arrangements as arr_mod
from melodjinn.world_model.arrangements import (
    ArrangedSequence,
    Arrangement,
    ArrangementError,
    DelayArrangement,
    FlattenArrangement,
    MultiStreamArrangement,
    make_arrangement,
)
from melodjinn.world_model.errors import MelodjinnError

torch.set_num_threads(1)

STREAMS = (1, 2, 3)
CODEBOOKS = (1, 2, 4, 8)
FRAMES = (0, 1, 2, 5, 17)
B = 2


def _options(variant: str, S: int, K: int) -> tuple[str, dict]:
    """(arrangement name, options) for a test variant; the multistream variants use uneven delays."""
    if variant == "multistream-offsets":  # non-monotonic stream offsets 0, 2, 1
        return "multistream", {"stream_offsets": [(2 * s) % 3 for s in range(S)]}
    if variant == "multistream-explicit":  # non-monotonic in k, different per stream
        return "multistream", {"delays": [[(s + 3 * k) % 5 for k in range(K)] for s in range(S)]}
    return variant, {}


VARIANTS = ("flatten", "delay", "multistream", "multistream-offsets", "multistream-explicit")


def _delays(name: str, opts: dict, S: int, K: int) -> list[list[int]]:
    """The delay matrix [S][K] a delayed variant should use, computed from the options by hand."""
    if "delays" in opts:
        return opts["delays"]
    off = opts.get("stream_offsets", [0] * S)
    return [[off[s] + k for k in range(K)] for s in range(S)]


def _unique_tokens(S: int, K: int, T: int) -> tuple[torch.Tensor, int]:
    """Tokens whose value encodes (b, s, k, t) uniquely, and a codebook size V just above them."""
    x = torch.arange(B * S * K * T, dtype=torch.long).view(B, S, K, T)  # [B, S, K, T]
    return x, B * S * K * T + 1


def _decode(v: int, S: int, K: int, T: int) -> tuple[int, int, int, int]:
    b, r = divmod(v, S * K * T)
    n, t = divmod(r, T)
    return b, n // K, n % K, t


def _reference(name: str, x: torch.Tensor, V: int, delays: list[list[int]] | None):
    """Naive layout: (tokens, mask, stream_ids, codebook_ids, frame_ids) in the arrangement's layout."""
    Bx, S, K, T = x.shape
    if name == "flatten":
        L = T * S * K
        tok = torch.full((Bx, L), -99, dtype=torch.long)
        mask = torch.zeros(Bx, L, dtype=torch.bool)
        sid, kid, fid = (torch.full((L,), -99, dtype=torch.long) for _ in range(3))
        p = 0
        for t in range(T):
            for s in range(S):
                for k in range(K):
                    tok[:, p], mask[:, p], sid[p], kid[p], fid[p] = x[:, s, k, t], True, s, k, t
                    p += 1
        return tok, mask, sid, kid, fid
    D = max(max(row) for row in delays)
    L = T + D if T else 0
    # canonical [L, S*K] first, then the layout
    tok = torch.full((Bx, L, S * K), V, dtype=torch.long)
    mask = torch.zeros(Bx, L, S * K, dtype=torch.bool)
    fid = torch.full((L, S * K), -1, dtype=torch.long)
    sid = torch.tensor([n // K for n in range(S * K)]).repeat(L, 1)
    kid = torch.tensor([n % K for n in range(S * K)]).repeat(L, 1)
    for s in range(S):
        for k in range(K):
            for t in range(T):
                p = t + delays[s][k]
                tok[:, p, s * K + k], mask[:, p, s * K + k], fid[p, s * K + k] = x[:, s, k, t], True, t
    if name == "delay":
        return tok, mask, sid, kid, fid

    def ms(a: torch.Tensor) -> torch.Tensor:  # [..., L, S*K] -> [..., S, K, L]
        a = a.view(*a.shape[:-1], S, K)
        return a.movedim(-3, -1)

    return ms(tok), ms(mask), ms(sid), ms(kid), ms(fid)


def _position(name: str, tokens: torch.Tensor, p: int) -> torch.Tensor:
    """Tokens [B, N] of position p in an arranged tensor."""
    if name == "flatten":
        return tokens[:, p : p + 1]
    if name == "delay":
        return tokens[:, p]
    return tokens[:, :, :, p].reshape(tokens.shape[0], -1)


# ---- exhaustive round trip and layout ---------------------------------------------------------------------


@pytest.mark.parametrize("T", FRAMES)
@pytest.mark.parametrize("K", CODEBOOKS)
@pytest.mark.parametrize("S", STREAMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_arrange_matches_reference_and_round_trips(variant: str, S: int, K: int, T: int) -> None:
    name, opts = _options(variant, S, K)
    x, V = _unique_tokens(S, K, T)
    a = make_arrangement(name, S, K, codebook_size=V, **opts)
    delays = None if name == "flatten" else _delays(name, opts, S, K)
    seq = a.arrange(x)

    # sequence length
    if name == "flatten":
        L = T * S * K
        assert (a.positions_per_frame, a.tokens_per_position, a.max_delay) == (S * K, 1, 0)
        assert tuple(seq.tokens.shape) == (B, L)
    else:
        D = max(max(r) for r in delays)
        L = T + D if T else 0
        if variant in ("delay", "multistream"):
            assert D == K - 1 and L == (T + K - 1 if T else 0)
        assert (a.positions_per_frame, a.tokens_per_position, a.max_delay) == (1, S * K, D)
        assert tuple(seq.tokens.shape) == ((B, L, S * K) if name == "delay" else (B, S, K, L))
    assert a.num_positions(T) == L == seq.num_positions
    assert a.num_frames(L) == T == seq.num_frames
    assert seq.arrangement == name

    # exact placement, mask and ids against the naive reference
    ref_tok, ref_mask, ref_s, ref_k, ref_f = _reference(name, x, V, delays)
    assert seq.tokens.dtype == torch.long and seq.mask.dtype == torch.bool
    assert torch.equal(seq.tokens, ref_tok)
    assert torch.equal(seq.mask, ref_mask)
    assert int(seq.mask.sum()) == x.numel()  # exactly the real tokens are marked
    assert torch.equal(seq.stream_ids, ref_s)
    assert torch.equal(seq.codebook_ids, ref_k)
    assert torch.equal(seq.frame_ids, ref_f)
    # the special id appears exactly at invalid entries
    assert torch.equal(seq.tokens == a.special_id, ~seq.mask)
    assert a.special_id == V and a.vocab_size == V + 1

    # inverse
    back = a.restore(seq)
    assert back.dtype == torch.long and tuple(back.shape) == (B, S, K, T)
    assert torch.equal(back, x)
    # a bare tensor with trailing dims (e.g. per-entry logits) restores to [B, S, K, T, *trailing]
    payload = torch.stack([seq.tokens.float(), -seq.tokens.float()], dim=-1)
    assert torch.equal(a.restore(payload), torch.stack([x.float(), -x.float()], dim=-1))


@pytest.mark.parametrize("T", FRAMES)
@pytest.mark.parametrize("K", CODEBOOKS)
@pytest.mark.parametrize("S", STREAMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_random_tokens_round_trip(variant: str, S: int, K: int, T: int) -> None:
    name, opts = _options(variant, S, K)
    V = 5  # small codebook: real tokens collide often, the special id 5 must still be told apart
    g = torch.Generator().manual_seed(1000 * S + 100 * K + T)
    x = torch.randint(0, V, (3, S, K, T), generator=g)  # [B, S, K, T]
    a = make_arrangement(name, S, K, codebook_size=V, **opts)
    seq = a.arrange(x)
    assert torch.equal(a.restore(seq), x)
    assert torch.equal(seq.tokens[seq.mask], seq.tokens[seq.mask].clamp(0, V - 1))
    assert bool((seq.tokens[~seq.mask] == V).all())


def test_flatten_has_s_times_k_positions_per_frame() -> None:
    for S in STREAMS:
        for K in CODEBOOKS:
            x, V = _unique_tokens(S, K, 3)
            a = FlattenArrangement(S, K, codebook_size=V)
            seq = a.arrange(x)
            assert a.positions_per_frame == S * K and seq.num_positions == 3 * S * K
            for s in range(S):
                for k in range(K):
                    for t in range(3):
                        p = t * S * K + s * K + k
                        assert torch.equal(seq.tokens[:, p], x[:, s, k, t])
                        assert (int(seq.stream_ids[p]), int(seq.codebook_ids[p])) == (s, k)


@pytest.mark.parametrize("K", CODEBOOKS)
def test_delay_puts_codebook_k_of_frame_t_at_position_t_plus_k(K: int) -> None:
    S, T = 2, 6
    x, V = _unique_tokens(S, K, T)
    seq = DelayArrangement(S, K, codebook_size=V).arrange(x)
    for s in range(S):
        for k in range(K):
            for t in range(T):
                assert torch.equal(seq.tokens[:, t + k, s * K + k], x[:, s, k, t])
            # before its delay and after its last frame, a slot holds the special id
            assert bool((seq.tokens[:, :k, s * K + k] == V).all())
            assert bool((seq.tokens[:, T + k :, s * K + k] == V).all())


def test_multistream_puts_token_at_t_plus_codebook_delay_plus_stream_offset() -> None:
    S, K, T = 3, 4, 5
    offsets = [0, 3, 1]
    x, V = _unique_tokens(S, K, T)
    a = MultiStreamArrangement(S, K, codebook_size=V, stream_offsets=offsets)
    seq = a.arrange(x)
    assert seq.num_positions == T + (K - 1) + 3
    for s in range(S):
        for k in range(K):
            for t in range(T):
                assert torch.equal(seq.tokens[:, s, k, t + k + offsets[s]], x[:, s, k, t])


def test_multistream_default_holds_what_delay_holds() -> None:
    S, K, T = 3, 4, 7
    x = torch.randint(0, 9, (2, S, K, T), generator=torch.Generator().manual_seed(0))
    ms = make_arrangement("multistream", S, K, codebook_size=9).arrange(x).tokens  # [B, S, K, L]
    dl = make_arrangement("delay", S, K, codebook_size=9).arrange(x).tokens  # [B, L, S*K]
    assert torch.equal(ms.movedim(3, 1).reshape(2, T + K - 1, S * K), dl)


def test_multistream_parallel_pattern_has_no_padding() -> None:
    S, K, T = 2, 4, 5
    x = torch.randint(0, 9, (2, S, K, T), generator=torch.Generator().manual_seed(1))
    a = MultiStreamArrangement(S, K, codebook_size=9, codebook_delays=[0] * K)
    seq = a.arrange(x)
    assert a.max_delay == 0 and seq.num_positions == T
    assert bool(seq.mask.all()) and torch.equal(seq.tokens, x)
    assert a.frames_complete(1) == 1  # every token of frame 0 is predicted in one pass


def test_adding_a_stream_keeps_existing_positions() -> None:
    S, K, T = 2, 3, 4
    a = MultiStreamArrangement(S, K, codebook_size=9, stream_offsets=[0, 1])
    b = a.with_added_stream([2, 3, 4])
    assert b.num_streams == 3 and b.delays[:2] == a.delays and b.delays[2] == (2, 3, 4)
    x = torch.randint(0, 9, (2, S + 1, K, T), generator=torch.Generator().manual_seed(2))
    old = a.arrange(x[:, :S]).tokens  # [B, S, K, T + 3]
    new = b.arrange(x).tokens  # [B, S+1, K, T + 4]
    assert torch.equal(new[:, :S, :, : old.shape[-1]], old)
    assert bool((new[:, :S, :, old.shape[-1] :] == 9).all())
    assert torch.equal(b.restore(b.arrange(x)), x)


def test_stream_lag_staggers_streams_and_places_added_streams_after_the_last() -> None:
    K = 2
    a = MultiStreamArrangement(3, K, codebook_size=5, stream_lag=1)
    assert a.delays == ((0, 1), (1, 2), (2, 3))
    assert a.delays == MultiStreamArrangement(3, K, codebook_size=5, stream_offsets=[0, 1, 2]).delays
    grown = MultiStreamArrangement(1, K, codebook_size=5, stream_lag=2).with_added_stream()
    assert grown.delays == ((0, 1), (2, 3)) and grown.stream_lag == 2
    # the lag survives a save/load round trip, so a stored model grows the same way
    stored = make_arrangement(**json.loads(json.dumps(grown.config())))
    assert stored == grown and stored.with_added_stream().delays[-1] == (4, 5)
    # stream s's frame t is predicted one position after stream s-1's: it sees that frame in its context
    x = torch.randint(0, 5, (1, 3, K, 4), generator=torch.Generator().manual_seed(5))
    seq = a.arrange(x)
    for s in range(1, 3):
        assert torch.equal(seq.frame_ids[s, 0, 1:], seq.frame_ids[s - 1, 0, :-1])
    assert torch.equal(a.restore(seq), x)


def test_integer_input_of_other_width_is_accepted_and_returned_as_int64() -> None:
    x = torch.randint(0, 7, (1, 2, 2, 3), dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    a = make_arrangement("delay", 2, 2, codebook_size=7)
    seq = a.arrange(x)
    assert seq.tokens.dtype == torch.long
    assert torch.equal(a.restore(seq), x.long())
    # scatter_step writes into the caller's buffer whatever its integer dtype
    buf = torch.zeros_like(x)
    for p in range(seq.num_positions):
        assert a.scatter_step(buf, p, a.gather_step(x, p)) is buf
    assert buf.dtype == torch.int32 and torch.equal(buf, x)


# ---- generation helpers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("T", FRAMES)
@pytest.mark.parametrize("K", (1, 2, 4))
@pytest.mark.parametrize("S", STREAMS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_steps_cover_every_entry_once(variant: str, S: int, K: int, T: int) -> None:
    name, opts = _options(variant, S, K)
    x, V = _unique_tokens(S, K, T)
    a = make_arrangement(name, S, K, codebook_size=V, **opts)
    seq = a.arrange(x)
    L = seq.num_positions
    buffer = torch.full_like(x, -1)  # [B, S, K, T], filled step by step
    frames_of_position = a.position_frames(T)
    assert tuple(frames_of_position.shape) == (L,)
    seen = set()
    for p in range(L):
        e = a.step_entries(p, T)
        pos = _position(name, seq.tokens, p)  # [B, N]
        # the entries of step p are exactly the real tokens at position p, in their slots
        real_slots = pos[0].ne(V).nonzero().view(-1)
        assert torch.equal(e.slots, real_slots) and len(e) == real_slots.numel()
        for slot, s, k, t in zip(e.slots.tolist(), e.streams.tolist(), e.codebooks.tolist(), e.frames.tolist()):
            assert _decode(int(pos[0, slot]), S, K, T) == (0, s, k, t)
            assert (s, k, t) not in seen
            seen.add((s, k, t))
        # gather reads the position from frame-aligned tokens; scatter writes it back
        assert torch.equal(a.gather_step(x, p), pos)
        a.scatter_step(buffer, p, pos)
        # frames_complete: leading frames fully written, the next one not
        done = a.frames_complete(p + 1, T)
        assert bool((buffer[..., :done] >= 0).all())
        if done < T:
            assert bool((buffer[..., done] < 0).any())
        # the frame a position steps through: the newest frame it holds, clamped to the last frame in the tail
        lead = p // (S * K) if name == "flatten" else p - min(min(r) for r in _delays(name, opts, S, K))
        if 0 <= lead < T:
            assert int(frames_of_position[p]) == lead == max(e.frames.tolist())
        else:
            assert int(frames_of_position[p]) == (0 if lead < 0 else T - 1)
    assert len(seen) == S * K * T
    assert torch.equal(buffer, x)
    assert a.frames_complete(L, T) == T


def test_open_ended_steps_hold_every_slot_once_past_the_delays() -> None:
    a = MultiStreamArrangement(2, 3, codebook_size=8, stream_offsets=[0, 2])
    assert len(a.step_entries(0)) == 1  # only s0 k0 has no delay
    e = a.step_entries(1000)  # no end given: every slot holds a token
    assert len(e) == 6 and e.frames.tolist() == [1000 - d for row in a.delays for d in row]
    f = FlattenArrangement(2, 3, codebook_size=8).step_entries(6 * 50 + 4)
    assert (f.streams.tolist(), f.codebooks.tolist(), f.frames.tolist()) == ([1], [1], [50])


def test_gather_step_puts_special_id_in_empty_slots() -> None:
    a = DelayArrangement(1, 3, codebook_size=4)
    x = torch.tensor([[[[1, 2], [3, 0], [2, 2]]]])  # [1, 1, 3, 2]
    assert a.gather_step(x, 0).tolist() == [[1, 4, 4]]
    assert a.gather_step(x, 1).tolist() == [[2, 3, 4]]
    assert a.gather_step(x, 3).tolist() == [[4, 4, 2]]


# ---- descriptions -----------------------------------------------------------------------------------------


def _docstring_has(doc: str, picture: str) -> bool:
    lines = [line.strip() for line in doc.splitlines()]
    want = picture.splitlines()
    return any(lines[i : i + len(want)] == want for i in range(len(lines)))


@pytest.mark.parametrize(
    "doc, arrangement, T",
    [
        (arr_mod.__doc__, FlattenArrangement(2, 3, codebook_size=4), 4),
        (arr_mod.__doc__, DelayArrangement(2, 3, codebook_size=4), 4),
        (arr_mod.__doc__, MultiStreamArrangement(2, 3, codebook_size=4, stream_offsets=[0, 1]), 4),
        (FlattenArrangement.__doc__, FlattenArrangement(2, 3, codebook_size=4), 2),
        (DelayArrangement.__doc__, DelayArrangement(1, 4, codebook_size=4), 3),
        (MultiStreamArrangement.__doc__, MultiStreamArrangement(2, 2, codebook_size=4, stream_offsets=[0, 2]), 3),
    ],
)
def test_docstring_diagrams_match_the_code(doc: str, arrangement: Arrangement, T: int) -> None:
    picture = arrangement.diagram(T)
    assert picture.count("\n") >= 2
    assert _docstring_has(doc, picture), f"docstring diagram out of date; the code draws:\n{picture}"


@pytest.mark.parametrize(
    "name, opts",
    [
        ("flatten", {}),
        ("delay", {}),
        ("delay", {"codebook_delays": [0, 2, 1]}),
        ("multistream", {}),
        ("multistream", {"stream_offsets": [1, 0]}),
        ("multistream", {"delays": [[0, 0, 1], [2, 1, 0]]}),
        ("multistream", {"stream_lag": 1}),
    ],
)
def test_config_rebuilds_an_equal_arrangement(name: str, opts: dict) -> None:
    a = make_arrangement(name, 2, 3, codebook_size=16, **opts)
    cfg = json.loads(json.dumps(a.config()))
    b = make_arrangement(**cfg)
    assert b == a and hash(b) == hash(a) and type(b) is type(a)
    assert b != make_arrangement(name, 2, 3, codebook_size=17, **opts)
    x = torch.randint(0, 16, (1, 2, 3, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(b.arrange(x).tokens, a.arrange(x).tokens)


def test_default_arrangement_is_multistream() -> None:
    assert arr_mod.DEFAULT_ARRANGEMENT == "multistream"
    assert isinstance(make_arrangement(arr_mod.DEFAULT_ARRANGEMENT, 2, 4, codebook_size=8), MultiStreamArrangement)


# ---- errors -----------------------------------------------------------------------------------------------


def test_errors_are_value_errors_and_melodjinn_errors() -> None:
    assert issubclass(ArrangementError, ValueError) and issubclass(ArrangementError, MelodjinnError)


def test_unknown_name_lists_the_choices() -> None:
    message = r"unknown arrangement 'interleave'; choose one of: flatten, delay, multistream"
    with pytest.raises(ValueError, match=message):
        make_arrangement("interleave", 2, 4, codebook_size=8)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'delay' has no option\(s\) stream_offsets \(its options: codebook_delays\)"):
        make_arrangement("delay", 2, 4, codebook_size=8, stream_offsets=[0, 1])
    with pytest.raises(ValueError, match=r"'flatten' has no option\(s\) codebook_delays \(its options: none\)"):
        make_arrangement("flatten", 2, 4, codebook_size=8, codebook_delays=[0, 1, 2, 3])


@pytest.mark.parametrize("name", ["flatten", "delay", "multistream"])
@pytest.mark.parametrize(
    "shape, message",
    [
        ((2, 4, 5), r"tokens must have 4 dims \[B, S, K, T\].*got shape \(2, 4, 5\)"),
        ((1, 2, 4, 5, 1), r"tokens must have 4 dims \[B, S, K, T\].*got shape \(1, 2, 4, 5, 1\)"),
        ((1, 3, 4, 5), r"tokens have 3 streams .* num_streams=2"),
        ((1, 2, 2, 5), r"tokens have 2 codebooks .* num_codebooks=4"),
    ],
)
def test_bad_token_shapes(name: str, shape: tuple, message: str) -> None:
    a = make_arrangement(name, 2, 4, codebook_size=8)
    with pytest.raises(ValueError, match=message):
        a.arrange(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("name", ["flatten", "delay", "multistream"])
def test_bad_token_values_and_types(name: str) -> None:
    a = make_arrangement(name, 1, 2, codebook_size=8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\).*found values in \[0, 8\]"):
        a.arrange(torch.tensor([[[[0, 8], [1, 2]]]]))  # 8 is the special id, not a token
    with pytest.raises(ValueError, match=r"found values in \[-1, 2\]"):
        a.arrange(torch.tensor([[[[0, -1], [1, 2]]]]))
    with pytest.raises(ValueError, match=r"integer tensor .* got torch.float32"):
        a.arrange(torch.zeros(1, 1, 2, 3))
    with pytest.raises(ValueError, match=r"must be a torch.Tensor"):
        a.arrange([[[[0]]]])


@pytest.mark.parametrize(
    "name, opts, message",
    [
        ("delay", {"codebook_delays": [0, -1, 2]}, r"codebook_delays must be >= 0 .*\[0, -1, 2\]"),
        ("multistream", {"codebook_delays": [0, 1, -2]}, r"codebook_delays must be >= 0"),
        ("multistream", {"stream_offsets": [0, -1]}, r"stream_offsets must be >= 0 .*\[0, -1\]"),
        ("multistream", {"delays": [[0, 1, 2], [0, -3, 1]]}, r"delays\[1\] must be >= 0"),
        ("delay", {"codebook_delays": [0, 1]}, r"codebook_delays must have 3 entries \(one per codebook\), got 2"),
        ("multistream", {"stream_offsets": [0, 1, 2]}, r"stream_offsets must have 2 entries \(one per stream\), got 3"),
        ("multistream", {"delays": [[0, 1, 2]]}, r"delays must have one row per stream \(num_streams=2\), got 1"),
        ("multistream", {"delays": [[0, 1, 2], [0, 1]]}, r"delays\[1\] must have 3 entries"),
        ("multistream", {"stream_offsets": [0, 1.5]}, r"stream_offsets\[1\] must be an integer, got 1.5"),
        ("multistream", {"stream_offsets": 2}, r"stream_offsets must be a list of 2 integers"),
        ("multistream", {"delays": [[0, 1, 2]] * 2, "stream_offsets": [0, 1]}, r"either delays .* not both"),
        ("multistream", {"stream_offsets": [0, 1], "stream_lag": 1}, r"either stream_offsets or stream_lag"),
        ("multistream", {"stream_lag": -1}, r"stream_lag must be >= 0"),
    ],
)
def test_bad_delays(name: str, opts: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_arrangement(name, 2, 3, codebook_size=8, **opts)


@pytest.mark.parametrize(
    "args, message",
    [
        ((0, 4, 8), r"num_streams must be >= 1, got 0"),
        ((2, 0, 8), r"num_codebooks must be >= 1, got 0"),
        ((2, 4, 0), r"codebook_size must be >= 1, got 0"),
        ((2.0, 4, 8), r"num_streams must be an integer, got 2.0"),
        ((True, 4, 8), r"num_streams must be an integer, got True"),
    ],
)
@pytest.mark.parametrize("name", ["flatten", "delay", "multistream"])
def test_bad_sizes(name: str, args: tuple, message: str) -> None:
    S, K, V = args
    with pytest.raises(ValueError, match=message):
        make_arrangement(name, S, K, codebook_size=V)


def test_bad_restore_input() -> None:
    x = torch.randint(0, 8, (1, 2, 3, 4), generator=torch.Generator().manual_seed(5))
    delay = make_arrangement("delay", 2, 3, codebook_size=8)
    ms = make_arrangement("multistream", 2, 3, codebook_size=8)
    flat = make_arrangement("flatten", 2, 3, codebook_size=8)
    seq = delay.arrange(x)
    with pytest.raises(ValueError, match=r"cannot restore a 'delay' sequence with the 'multistream' arrangement"):
        ms.restore(seq)
    with pytest.raises(ValueError, match=r"delay: 2 positions is not a valid length"):
        delay.restore(torch.zeros(1, 2, 6, dtype=torch.long))  # T + 2 positions needs >= 3
    with pytest.raises(ValueError, match=r"flatten: 7 positions is not a valid length"):
        flat.restore(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \[B, L, S\*K\] with S\*K=6"):
        delay.restore(torch.zeros(1, 6, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \[B, S=2, K=3, L\]"):
        ms.restore(torch.zeros(1, 3, 2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \[B, S=2, K=3, L\] \(plus optional trailing dims\)"):
        ms.restore(torch.zeros(2, 3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"restore expects an ArrangedSequence or a tensor"):
        delay.restore([1, 2, 3])
    # a special id left at a real entry (a generation step never written) is caught
    bad = seq.tokens.clone()
    bad[0, 0, 0] = 8
    broken = ArrangedSequence(bad, seq.mask, seq.stream_ids, seq.codebook_ids, seq.frame_ids, 4, 6, "delay")
    with pytest.raises(ValueError, match=r"restored tokens must lie in \[0, 8\).*special id 8"):
        delay.restore(broken)


def test_bad_generation_steps() -> None:
    a = make_arrangement("multistream", 2, 3, codebook_size=8)
    buf = torch.zeros(1, 2, 3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"step 6 is past the end of a 4-frame sequence \(6 positions\)"):
        a.step_entries(6, 4)
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        a.step_entries(-1)
    with pytest.raises(ValueError, match=r"values must be \[B, N\] = \[1, 6\], got \(1, 5\)"):
        a.scatter_step(buf, 0, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"step 2: values at real entries must lie in \[0, 8\), got \[0, 8\]"):
        a.scatter_step(buf, 2, torch.tensor([[0, 0, 8, 0, 0, 8]]))
    assert torch.equal(buf, torch.zeros_like(buf))  # a rejected write leaves the buffer alone
    # special ids in slots that hold nothing are ignored
    a.scatter_step(buf, 0, torch.tensor([[5, 8, 8, 6, 8, 8]]))
    assert (int(buf[0, 0, 0, 0]), int(buf[0, 1, 0, 0]), int(buf.sum())) == (5, 6, 11)
    with pytest.raises(ValueError, match=r"num_frames must be >= 0, got -1"):
        a.num_positions(-1)
    with pytest.raises(ValueError, match=r"steps_done must be >= 0, got -2"):
        a.frames_complete(-2)
