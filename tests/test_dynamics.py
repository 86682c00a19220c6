"""Dynamics backbone (world_model/dynamics.py): shapes, causality and the action alignment, KV-cache generation,
seeded/batched sampling, guidance, adding a stream, learning from actions, save/load.

Which position holds which entry is computed here by hand from the arrangement rules (not from the model's
tables), so a layout or one-frame action shift in the model shows up as a failed dependency check.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from melodjinn.world_model.dynamics import (
    DynamicsConfig,
    DynamicsError,
    DynamicsModel,
    expand_actions,
    section_ids,
    time_generation,
)
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.transformer import Transformer, TransformerConfig

torch.set_num_threads(1)

V, K, A = 16, 3, 5

VARIANTS = {  # name: (arrangement, options builder(S))
    "flatten": ("flatten", lambda S: {}),
    "delay": ("delay", lambda S: {}),
    "multistream": ("multistream", lambda S: {}),
    "multistream-offsets": ("multistream", lambda S: {"stream_offsets": [s % 2 for s in range(S)]}),
    "parallel": ("multistream", lambda S: {"codebook_delays": [0] * K}),
}


def make(variant: str = "multistream", S: int = 2, seed: int = 0, **kw) -> DynamicsModel:
    arrangement, opts = VARIANTS[variant]
    torch.manual_seed(seed)
    cfg = DynamicsConfig(
        streams=[f"s{i}" for i in range(S)], num_codebooks=K, codebook_size=V, arrangement=arrangement,
        arrangement_options=opts(S), dim=32, layers=2, heads=2, num_actions=A, max_frames=64, **kw,
    )
    return DynamicsModel(cfg).eval()


def data(B: int, S: int, T: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S, K, T), generator=g)
    actions = torch.randint(0, A, (B, T), generator=g)
    sections = torch.randint(0, 5, (B, T), generator=g)
    return tokens, actions, sections


def delays_of(variant: str, S: int) -> list[list[int]]:
    """Hand-written delay matrix [S][K] of a delayed variant."""
    _, opts = VARIANTS[variant]
    o = opts(S)
    cd = o.get("codebook_delays", list(range(K)))
    off = o.get("stream_offsets", [0] * S)
    return [[off[s] + cd[k] for k in range(K)] for s in range(S)]


def hold_position(variant: str, S: int, s: int, k: int, t: int) -> int:
    """The arranged position holding entry (s, k, t), by the arrangement rules."""
    if variant == "flatten":
        return t * S * K + s * K + k
    return t + delays_of(variant, S)[s][k]


def newest_frame(variant: str, S: int, p: int, T: int) -> int:
    """F(p): the frame whose action/section condition the prediction of position p (clamped to [0, T-1])."""
    if variant == "flatten":
        return p // (S * K)
    lo = min(min(row) for row in delays_of(variant, S))
    return max(0, min(p - lo, T - 1))


def entry_grid(variant: str, S: int, T: int, fn) -> torch.Tensor:
    """(S, K, T) tensor of fn(s, k, t)."""
    return torch.tensor([[[fn(s, k, t) for t in range(T)] for k in range(K)] for s in range(S)])


# ---- shapes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flatten", "delay", "multistream"])
@pytest.mark.parametrize("S", [1, 2, 3])
def test_output_shapes(variant, S):
    model = make(variant, S)
    tokens, actions, sections = data(2, S, 7)
    logits, loss = model(tokens, actions, sections)
    assert logits.shape == (2, S, K, 7, V) and loss is None
    logits, loss = model(tokens, actions, sections, targets=tokens)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5  # untrained: near uniform
    out = model.generate(tokens[..., :3], 4, actions, sections, temperature=0)
    assert out.shape == (2, S, K, 7) and torch.equal(out[..., :3], tokens[..., :3])
    assert int(out.min()) >= 0 and int(out.max()) < V


def test_loss_skips_ignored_targets():
    model = make("multistream", 1)
    tokens, actions, sections = data(2, 1, 6)
    targets = tokens.clone()
    targets[1] = -100  # the second clip is padding
    _, loss = model(tokens, actions, sections, targets=targets)
    _, loss0 = model(tokens[:1], actions[:1], sections[:1], targets=tokens[:1])
    assert torch.allclose(loss, loss0, atol=1e-6)


# ---- causality and the action alignment -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_causality(variant):
    """Perturbing one entry changes only the logits of entries held at later positions, and does change some."""
    S, T = 2, 6
    model = make(variant, S)
    tokens, actions, sections = data(1, S, T)
    base, _ = model(tokens, actions, sections)
    hold = entry_grid(variant, S, T, lambda s, k, t: hold_position(variant, S, s, k, t))
    for s, k, t in [(0, 0, 2), (1, 2, 1), (0, 1, 4), (1, 0, 3)]:
        x = tokens.clone()
        x[0, s, k, t] = (x[0, s, k, t] + 1) % V
        out, _ = model(x, actions, sections)
        changed = (out - base).abs().amax(-1)[0] > 0  # (S, K, T)
        allowed = hold > hold[s, k, t]
        assert not (changed & ~allowed).any(), f"{variant}: entry {(s, k, t)} leaked to {changed.nonzero().tolist()}"
        assert changed.any(), f"{variant}: perturbing {(s, k, t)} changed nothing"
    # frame level: tokens of frames >= t+1 never change the predictions of frames <= t that are sampled when their
    # frame first appears (every entry for flatten/parallel; delayed codebooks see the next frames' coarse ones)
    frame_of = entry_grid(variant, S, T, lambda s, k, t: t)
    newest = entry_grid(variant, S, T, lambda s, k, t: newest_frame(variant, S, hold_position(variant, S, s, k, t), T))
    first = newest == frame_of
    if variant in ("flatten", "parallel"):
        assert first.all()
    for t in range(T - 1):
        x = tokens.clone()
        x[..., t + 1 :] = torch.randint(0, V, x[..., t + 1 :].shape)
        out, _ = model(x, actions, sections)
        changed = (out - base).abs().amax(-1)[0] > 0
        assert not (changed & first & (frame_of <= t)).any()


def action_violations(model: DynamicsModel, variant: str, S: int = 2, T: int = 6) -> list[str]:
    """Checks of the LAM convention (a[t] explains t → t+1) on `model`; returns what is wrong."""
    tokens, actions, sections = data(1, S, T, seed=3)
    base, _ = model(tokens, actions, sections)
    frame_of = entry_grid(variant, S, T, lambda s, k, t: t)
    newest = entry_grid(variant, S, T, lambda s, k, t: newest_frame(variant, S, hold_position(variant, S, s, k, t), T))
    first = newest == frame_of  # entries sampled when their frame first appears (the min-delay slots)
    problems = []
    for t in range(T - 2):
        changed = {}
        for j in (t, t + 1):
            a = actions.clone()
            a[0, j] = (a[0, j] + 1) % A
            out, _ = model(tokens, a, sections)
            changed[j] = (out - base).abs().amax(-1)[0] > 0  # (S, K, T)
        # a[t] conditions exactly the predictions at positions whose newest frame is >= t+1
        if (changed[t] & (newest <= t)).any():
            problems.append(f"a[{t}] changed a prediction made before frame {t + 1} started")
        if not changed[t][first & (frame_of == t + 1)].all():
            problems.append(f"a[{t}] did not reach the first tokens of frame {t + 1}")
        if changed[t + 1][first & (frame_of <= t + 1)].any():
            problems.append(f"a[{t + 1}] reached the first tokens of frame {t + 1} or earlier")
        if variant in ("flatten", "parallel") and changed[t + 1][:, :, : t + 2].any():
            problems.append(f"a[{t + 1}] changed a token of frame <= {t + 1}")
    return problems


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_action_alignment(variant):
    assert action_violations(make(variant, 2), variant) == []


@pytest.mark.parametrize("shift", [1, -1])
@pytest.mark.parametrize("variant", ["flatten", "multistream"])
def test_action_alignment_catches_a_one_frame_shift(variant, shift):
    """The alignment check fails on a model whose actions are one frame early or late (it can fail)."""
    model = make(variant, 2)
    tables = model._tables

    def shifted(T, device):
        tab = tables(T, device)
        return tab._replace(cond=(tab.cond + shift).clamp(0, T - 1))

    model._tables = shifted
    assert action_violations(model, variant) != []


def test_masking_and_action_dropout_in_training_mode():
    model = make("multistream", 2)
    tokens, actions, sections = data(2, 2, 5)
    model.train()
    model.cfg.frame_mask_prob, model.cfg.action_dropout = 1.0, 0.0
    a, _ = model(tokens, actions, sections)
    b, _ = model(torch.randint(0, V, tokens.shape), actions, sections)
    assert torch.equal(a, b), "with every frame masked the tokens must not matter"
    c, _ = model(tokens, (actions + 1) % A, sections)
    assert not torch.equal(a, c), "with no action dropout the actions must matter"
    model.cfg.frame_mask_prob, model.cfg.action_dropout = 0.0, 1.0
    d, _ = model(tokens, actions, sections)
    e, _ = model(tokens, (actions + 1) % A, sections)
    model.eval()
    f, _ = model(tokens, torch.full_like(actions, model.null_action), sections)
    assert torch.equal(d, e) and torch.equal(d, f), "dropped actions must read as the null action"


def test_expand_actions_follows_the_lam_convention():
    a = torch.tensor([[3, 1, 4, 2]])
    assert expand_actions(a, 1, 5, 9).tolist() == [[3, 1, 4, 2, 9]]  # out[:, f] = a[f] (conditions frame f+1)
    # stride 2: action j explains patch j → j+1 and conditions frames 2(j+1) and 2(j+1)+1
    assert expand_actions(a, 2, 8, 9).tolist() == [[9, 3, 3, 1, 1, 4, 4, 2]]


# ---- generation -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flatten", "delay", "multistream-offsets"])
def test_cached_logits_match_full_forward(variant):
    S, T0, N = 2, 3, 5
    model = make(variant, S)
    tokens, actions, sections = data(2, S, T0 + N)
    session = model.new_session(tokens[..., :T0], actions, sections, total_frames=T0 + N, temperature=0, keep_logits=True)
    session.step(num_frames=N)
    out = session.tokens
    full, _ = model(out, actions, sections)
    torch.testing.assert_close(session.logits[..., T0:, :], full[..., T0:, :], atol=2e-5, rtol=1e-4)
    assert torch.equal(out, full.argmax(-1).where(torch.arange(T0 + N) >= T0, out))  # greedy = argmax of those


@pytest.mark.parametrize("variant", ["flatten", "delay", "multistream", "multistream-offsets"])
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_cache_and_no_cache_generate_the_same(variant, guidance):
    model = make(variant, 2)
    tokens, actions, sections = data(2, 2, 9)
    kw = dict(temperature=0, guidance_scale=guidance)
    a = model.generate(tokens[..., :4], 5, actions, sections, **kw)
    b = model.generate(tokens[..., :4], 5, actions, sections, use_cache=False, **kw)
    assert torch.equal(a, b)


def test_seeded_sampling_is_reproducible():
    model = make("multistream", 2)
    tokens, actions, sections = data(2, 2, 10)
    kw = dict(temperature=[1.0, 0.8, 1.2], top_k=[0, 8, 4], top_p=[0.9, 1.0, 0.95])

    def run(seed):
        return model.generate(tokens[..., :2], 8, actions, sections, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_top_k_one_is_greedy():
    model = make("delay", 1)
    tokens, actions, sections = data(2, 1, 8)
    greedy = model.generate(tokens[..., :2], 6, actions, sections, temperature=0)
    top1 = model.generate(tokens[..., :2], 6, actions, sections, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)


@pytest.mark.parametrize("guidance", [None, 1.5])
def test_batched_generation_equals_single(guidance):
    model = make("multistream-offsets", 2)
    tokens, actions, sections = data(3, 2, 10)
    seeds = [11, 22, 33]
    kw = dict(temperature=1.0, top_p=[0.9, 0.95, 1.0], guidance_scale=guidance)
    batched = model.generate(tokens[..., :3], 7, actions, sections,
                             generator=[torch.Generator().manual_seed(s) for s in seeds], **kw)
    for b, seed in enumerate(seeds):
        single = model.generate(tokens[b : b + 1, ..., :3], 7, actions[b : b + 1], sections[b : b + 1],
                                generator=[torch.Generator().manual_seed(seed)], **kw)
        assert torch.equal(batched[b : b + 1], single), f"element {b} differs"


def test_guidance():
    model = make("multistream", 2)
    tokens, actions, sections = data(2, 2, 9)

    def run(actions, scale, keep=False):
        s = model.new_session(tokens[..., :3], actions, sections, total_frames=9, guidance_scale=scale,
                              generator=torch.Generator().manual_seed(5), keep_logits=keep)
        s.step(num_frames=6)
        return s

    plain = run(actions, None, keep=True)
    assert torch.equal(run(actions, 1.0).tokens, plain.tokens)  # scale 1 = conditional, bit for bit
    null = torch.full_like(actions, model.null_action)
    assert torch.equal(run(actions, 0.0).tokens, run(null, None).tokens)  # scale 0 = unconditional
    strong = run(actions, 3.0, keep=True)
    assert not torch.allclose(strong.logits[..., 3:, :], plain.logits[..., 3:, :])


def test_policy_drives_generation():
    model = make("multistream", 2)
    tokens, _, sections = data(2, 2, 8)
    calls = []

    def policy(session):
        calls.append((session.frames, session.next_frame))
        return torch.full((2,), len(calls) % A)

    out = model.generate(tokens[..., :3], 5, policy, sections, temperature=0)
    assert out.shape == (2, 2, K, 8) and len(calls) == 5
    assert calls[0] == (3, 3)  # first call: 3 prompt frames, its action goes to frame 3 (and the lookahead)
    # a session driven by hand records, per frame, the action of the step that first touched that frame
    session = model.new_session(tokens[..., :3], None, sections, total_frames=8, temperature=0)
    owner = {}
    for i in range(1, 6):
        first = session.next_frame
        session.step(torch.full((2,), i % A))
        owner.update({f: i % A for f in range(first, session.next_frame)})
    assert torch.equal(session.tokens, out)
    for f in range(3, 8):
        assert (session.actions[:, f - 1] == owner[f]).all()  # actions[:, f-1] conditions frame f


# ---- sessions ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flatten", "multistream", "multistream-offsets"])
def test_session_steps_and_chunks_agree(variant):
    model = make(variant, 2)
    tokens, actions, sections = data(1, 2, 20)
    one = model.new_session(tokens[..., :4], actions, sections, temperature=0)
    frames = [one.step() for _ in range(9)]
    assert all(f.shape == (1, 2, K, 1) for f in frames)
    many = model.new_session(tokens[..., :4], actions, sections, temperature=0)
    chunk = torch.cat([many.step(num_frames=3) for _ in range(3)], -1)
    assert torch.equal(torch.cat(frames, -1), chunk) and torch.equal(one.tokens, many.tokens)
    assert one.frames == 13 and torch.equal(one.tokens[..., :4], tokens[..., :4])
    assert torch.equal(one.actions[:, : one.frames - 1], actions[:, : one.frames - 1])
    # the open-ended session agrees with generate() where the bounded sequence's end cannot be seen yet
    lag = 0 if variant == "flatten" else max(map(max, delays_of(variant, 2))) - min(map(min, delays_of(variant, 2)))
    bounded = model.generate(tokens[..., :4], 9, actions, sections, temperature=0)
    assert torch.equal(one.tokens[..., : 13 - lag], bounded[..., : 13 - lag])


@pytest.mark.parametrize("variant", ["delay", "multistream-offsets"])
def test_per_frame_actions_equal_one_step_per_frame(variant):
    # a step with (B, n) actions conditions the frames it starts in turn, as n one-frame steps would; the last
    # column covers any further frames; also across rollovers (small buffer)
    model = make(variant, 2)
    tokens, _, sections = data(2, 2, 4)
    plan = torch.randint(0, A, (2, 24), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=1.0, max_frames=16, context_frames=8)
    single = model.new_session(tokens, None, sections, generator=torch.Generator().manual_seed(5), **kw)
    single.step(num_frames=1)  # commits the lookahead frames (null actions)
    a = torch.cat([single.step(plan[:, f], num_frames=1) for f in range(24)], -1)
    batched = model.new_session(tokens, None, sections, generator=torch.Generator().manual_seed(5), **kw)
    batched.step(num_frames=1)
    b = torch.cat([batched.step(plan[:, f : f + 4], num_frames=4) for f in range(0, 24, 4)], -1)
    assert single.offset > 0 and torch.equal(a, b) and torch.equal(single.actions, batched.actions)
    held = model.new_session(tokens, None, sections, generator=torch.Generator().manual_seed(5), **kw)
    held.step(num_frames=1)
    c = torch.cat([held.step(torch.stack([plan[:, f], plan[:, f + 1]], 1), num_frames=4) for f in range(0, 24, 4)], -1)
    repeated = plan.view(2, 6, 4).clone()
    repeated[..., 2:] = repeated[..., 1:2]  # columns past the second: the second again
    again = model.new_session(tokens, None, sections, generator=torch.Generator().manual_seed(5), **kw)
    again.step(num_frames=1)
    d = torch.cat([again.step(repeated[:, i], num_frames=4) for i in range(6)], -1)
    assert torch.equal(c, d) and not torch.equal(c, b)
    with pytest.raises(DynamicsError, match="actions"):
        batched.step(torch.zeros(3, 2, dtype=torch.long))


def test_session_rolls_over_when_full():
    model = make("multistream", 2)
    tokens, actions, sections = data(1, 2, 4)
    long = model.new_session(tokens, temperature=0, max_frames=40)
    short = model.new_session(tokens, temperature=0, max_frames=16, context_frames=8)
    a = torch.cat([long.step(torch.tensor([f % A])) for f in range(30)], -1)
    b = torch.cat([short.step(torch.tensor([f % A])) for f in range(30)], -1)
    assert a.shape == b.shape == (1, 2, K, 30)
    assert short.absolute_frames == 34 and short.frames <= 16 and short.offset > 0
    first = 16 - 4 - 2 - 1  # frames generated before the first rollover (buffer 16, prompt 4, lookahead 2)
    assert torch.equal(a[..., :first], b[..., :first])
    assert torch.equal(short.tokens[..., -5:], b[..., -5:])


def test_session_sections_and_styles():
    model = make("multistream", 1, num_styles=3)
    tokens, actions, _ = data(2, 1, 4)
    plan = [("intro", 4), ("chorus", 3), ("outro", 2)]
    session = model.new_session(tokens, actions, plan, styles=torch.tensor([0, 2]), temperature=0)
    session.step(num_frames=3)
    assert session.next_frame == 9  # 7 frames complete, 2 more started (codebook delays 0, 1, 2)
    session.step(sections="bridge", num_frames=2)
    session.step(num_frames=4)
    expected = [0] * 4 + [2] * 3 + [4] * 2 + [3] * 2 + [4] * 2  # plan, then the step's override for frames 9-10
    assert session.sections.tolist() == [expected, expected]
    assert section_ids(plan, 1, 11)[0].tolist() == [0] * 4 + [2] * 3 + [4] * 4
    with pytest.raises(DynamicsError):
        section_ids([("coda", 2)], 1, 4)


def test_a_whole_song_plan_outlives_the_session_window():
    """An open-ended session whose buffer is shorter than the song still follows the song's plan after rollovers,
    and a new plan given mid-session replaces the rest of the schedule from `next_frame` on."""
    model = make("multistream", 2)
    tokens, _, _ = data(1, 2, 4)
    plan = [("intro", 10), ("verse", 12), ("chorus", 9), ("bridge", 7), ("outro", 6)]  # 44 frames
    session = model.new_session(tokens, sections=plan, max_frames=16, context_frames=8, temperature=0)
    seen = {}
    for _ in range(40):
        session.step()
        for i, s in enumerate(session.sections[0].tolist()):
            seen[session.offset + i] = s
    assert session.offset > 0  # rolled over, several times
    expected = section_ids(plan, 1, 44)[0].tolist()
    assert [seen[f] for f in range(44)] == expected
    session.plan_sections([("chorus", 3), ("bridge", 2)])
    start = session.offset + session.next_frame
    session.step(num_frames=8)
    newest = {session.offset + i: s for i, s in enumerate(session.sections[0].tolist())}
    assert [newest[f] for f in range(start, start + 6)] == [2, 2, 2, 3, 3, 3]  # the last planned section runs on


def test_actions_given_up_front_outlive_the_session_window():
    """Actions for a whole rollout given when the session opens carry over rollovers: the same frames as giving each
    step the actions of the frames it starts (from session.next_frame, counted from the session's start)."""
    model = make("multistream", 2)
    tokens, _, sections = data(1, 2, 4)
    script = torch.randint(0, A, (1, 40), generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=0, max_frames=16, context_frames=8)
    upfront = model.new_session(tokens, script, sections, **kw)
    a = upfront.step(num_frames=30)
    stepped = model.new_session(tokens, script[:, :4], sections, **kw)
    upcoming = lambda session: script[:, session.offset + session.next_frame - 1 :]  # column i: i-th frame started
    b = torch.cat([stepped.step(upcoming(stepped)) for _ in range(30)], -1)
    assert upfront.offset > 8 and torch.equal(a, b)
    assert torch.equal(upfront.actions, script[:, upfront.offset : upfront.offset + upfront.frames])


def test_generate_past_the_training_window_rolls_the_context_over():
    windowed = make("multistream", 2, window_frames=12)
    unlimited = make("multistream", 2)  # same weights (same seed), no window
    tokens, actions, sections = data(2, 2, 4, seed=6)
    script = torch.randint(0, A, (2, 34), generator=torch.Generator().manual_seed(2))
    out = windowed.generate(tokens, 30, script, sections, temperature=0)
    session = unlimited.new_session(tokens, script, sections, temperature=0, max_frames=12, context_frames=6)
    assert torch.equal(out, torch.cat([tokens, session.step(num_frames=30)], -1))
    full = unlimited.generate(tokens, 30, script, sections, temperature=0)  # attends to all 34 frames
    assert torch.equal(out[..., :10], full[..., :10]) and not torch.equal(out, full)
    padded = torch.cat([script, torch.full((2, 8), A)], 1)  # null past the script, as generate's tensor path has
    policy = lambda session: padded[:, session.offset + session.next_frame - 1 :]
    assert torch.equal(windowed.generate(tokens, 30, policy, sections, prompt_actions=script[:, :4], temperature=0), out)
    with pytest.raises(ConfigError, match="window_frames"):
        make("multistream", 2, window_frames=65)


def test_frames_given_no_section_get_the_default_section():
    model = make("multistream", 1, default_section=3)
    tokens, actions, _ = data(2, 1, 6)
    given = model(tokens, actions, torch.full((2, 6), 3))[0]
    assert torch.equal(model(tokens, actions)[0], given) and not torch.equal(model(tokens, actions, torch.zeros(2, 6, dtype=torch.long))[0], given)
    session = model.new_session(tokens[..., :2], actions, temperature=0)
    session.step(num_frames=3)
    assert session.sections.unique().tolist() == [3]
    with pytest.raises(ConfigError, match="default_section"):
        make("multistream", 1, default_section=5)


# ---- growing the model ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("delays", [None, [1, 3, 5]])
def test_add_stream_keeps_old_streams_exactly(delays):
    base = make("multistream-offsets", 2)
    grown = copy.deepcopy(base).add_stream("bass", delays)
    assert grown.cfg.streams == ["s0", "s1", "bass"] and grown.num_streams == 3
    tokens, actions, sections = data(2, 3, 8)
    old, _ = base(tokens[:, :2], actions, sections)
    new, _ = grown(tokens, actions, sections)
    assert torch.equal(new[:, :2], old), "old streams' logits must be bit-identical"
    assert new.shape == (2, 3, K, 8, V)
    head = grown.streams["bass"].head
    assert head.shape == (K, V, 32) and not torch.equal(head, grown.streams["s0"].head)
    # generation of the old streams is unchanged too (the new stream's tokens add exactly zero)
    g_old = base.generate(tokens[:, :2, :, :3], 5, actions, sections, temperature=0)
    g_new = grown.generate(tokens[..., :3], 5, actions, sections, temperature=0)
    assert torch.equal(g_new[:, :2], g_old)


def test_freeze_backbone_trains_only_the_new_stream():
    model = copy.deepcopy(make("multistream", 2)).add_stream("lead")
    trainable = model.freeze_backbone(["lead"])
    assert trainable == ["streams.lead.embed", "streams.lead.head"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tokens, actions, sections = data(2, 3, 6)
    model.train()
    _, loss = model(tokens, actions, sections, targets=tokens)
    loss.backward()
    opt.step()
    changed = sorted(k for k, v in model.state_dict().items() if not torch.equal(v, before[k]))
    assert changed == ["streams.lead.embed", "streams.lead.head"]
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())


def test_add_stream_like_an_existing_stream_starts_from_its_embeddings_and_heads():
    base = make("multistream", 2)
    grown = copy.deepcopy(base).add_stream("lead", like="s1")
    assert torch.equal(grown.streams["lead"].embed, base.streams["s1"].embed)
    assert torch.equal(grown.streams["lead"].head, base.streams["s1"].head)
    assert grown.streams["lead"].embed.data_ptr() != grown.streams["s1"].embed.data_ptr()  # copies, not shared
    with pytest.raises(ConfigError, match="like='bass' is not a stream"):
        copy.deepcopy(base).add_stream("lead", like="bass")


def test_add_stream_refusals():
    with pytest.raises(ConfigError):
        make("flatten", 2).add_stream("x")
    with pytest.raises(ConfigError):  # below the smallest existing delay: would move the action alignment
        _offset_model().add_stream("x", [0, 1, 2])
    with pytest.raises(ConfigError):
        make("multistream", 2).add_stream("s0")


def _offset_model() -> DynamicsModel:
    cfg = DynamicsConfig(streams=["a"], num_codebooks=K, codebook_size=V, dim=32, layers=1, heads=2, max_frames=32,
                         arrangement_options={"stream_offsets": [1]})
    return DynamicsModel(cfg)


# ---- learning ------------------------------------------------------------------------------------------------------------


def test_learns_to_use_actions():
    """Next frame = f(action): after a few dozen steps, true actions predict it and shuffled ones do not."""
    torch.manual_seed(0)
    cfg = DynamicsConfig(streams=["mix"], num_codebooks=2, codebook_size=8, dim=32, layers=2, heads=2, num_actions=4,
                         max_frames=32, frame_mask_prob=0.1, action_dropout=0.1)
    model = DynamicsModel(cfg)
    g = torch.Generator().manual_seed(0)

    def batch(B=32, T=12):
        a = torch.randint(0, 4, (B, T), generator=g)
        x = torch.randint(0, 8, (B, 1, 2, T), generator=g)
        x[:, 0, 0, 1:] = 2 * a[:, :-1]  # frame t+1 is set by a[t]
        x[:, 0, 1, 1:] = 2 * a[:, :-1] + 1
        return x, a

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        x, a = batch()
        _, loss = model(x, a, targets=x, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    x, a = batch(64)
    with torch.no_grad():
        true = (model(x, a)[0].argmax(-1) == x)[..., 1:].float().mean()
        shuffled = a[torch.randperm(64, generator=g)]
        wrong = (model(x, shuffled)[0].argmax(-1) == x)[..., 1:].float().mean()
    assert true > 0.9 and wrong < 0.6, (float(true), float(wrong))


# ---- save / load ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flatten", "multistream-offsets"])
def test_save_load_round_trip(tmp_path, variant):
    model = make(variant, 2, num_styles=2)
    if variant != "flatten":
        model.add_stream("extra", [2, 3, 4])
        with torch.no_grad():
            model.streams["extra"].embed.normal_()
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config_dict()))
    loaded = DynamicsModel.from_config_dict(json.loads((tmp_path / "config.json").read_text()))
    loaded.load_weights(load_file(tmp_path / "model.safetensors"))
    loaded.eval()
    tokens, actions, sections = data(2, model.num_streams, 6)
    styles = torch.tensor([1, 0])
    assert torch.equal(model(tokens, actions, sections, styles)[0], loaded(tokens, actions, sections, styles)[0])
    kw = dict(temperature=0.9, generator=torch.Generator().manual_seed(3))
    a = model.generate(tokens[..., :2], 4, actions, sections, styles, **kw)
    kw["generator"] = torch.Generator().manual_seed(3)
    assert torch.equal(a, loaded.generate(tokens[..., :2], 4, actions, sections, styles, **kw))


def test_checkpoint_mismatch_is_named():
    model = make("multistream", 2)
    other = make("multistream", 3)
    with pytest.raises(CheckpointError, match="streams.s2"):
        other.load_weights(model.state_dict())


def test_bad_inputs_raise_clear_errors():
    model = make("multistream", 2)
    tokens, actions, sections = data(1, 2, 5)
    with pytest.raises(DynamicsError, match="actions"):
        model(tokens, actions + A + 1, sections)
    with pytest.raises(DynamicsError, match="S=1"):
        model(tokens[:, :1], actions, sections)
    with pytest.raises(DynamicsError, match="top_p"):
        model.generate(tokens, 2, None, top_p=0.0)
    with pytest.raises(DynamicsError, match="per codebook"):
        model.generate(tokens, 2, None, temperature=[1.0, 1.0])
    with pytest.raises(ConfigError, match="heads"):
        DynamicsModel(DynamicsConfig(dim=30, heads=4))
    with pytest.raises(ConfigError, match="bogus"):
        DynamicsModel.from_config_dict({"bogus": 1})


# ---- the fast decoding step ------------------------------------------------------------------------------------------------


def test_step_decoder_matches_the_module():
    torch.manual_seed(0)
    net = Transformer(TransformerConfig(dim=32, layers=2, heads=4, max_positions=64)).eval()
    x = torch.randn(3, 20, 32)
    full = net(x)
    with torch.no_grad():
        cache = net.new_cache(3)
        net(x[:, :8], cache)
        decoder = net.decoder()
        steps = torch.stack([decoder.step(x[:, i], cache) for i in range(8, 20)], 1)
        cache2 = net.new_cache(3)
        chunked = torch.cat([net(x[:, :5], cache2), net(x[:, 5:12], cache2), net(x[:, 12:13], cache2)], 1)
    torch.testing.assert_close(steps, full[:, 8:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, full[:, :13], atol=1e-5, rtol=1e-4)


# ---- speed (printed, not asserted) --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_print_generation_speed():
    rows = []
    for arrangement in ("multistream", "flatten"):
        model = DynamicsModel(DynamicsConfig(streams=["mix"], num_codebooks=4, arrangement=arrangement))
        for use_cache in (True, False):
            frames = 100 if use_cache else 3
            r = time_generation(model, 1000, frames, use_cache=use_cache)
            rows.append(r)
            print(f"{arrangement:12s} cache={use_cache!s:5s} {r['seconds_per_frame'] * 1e3:8.3f} ms/frame wall, "
                  f"{r['cpu_seconds_per_frame'] * 1e3:8.3f} ms CPU (real-time x{r['realtime_factor']:.1f}, "
                  f"prefill {r['prefill_s']:.2f}s, threads {r['threads']})")
    assert rows
