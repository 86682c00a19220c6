"""The shipped drum world model obeys its actions, on time: the check that catches a one-frame shift between
actions and tokens anywhere in the LAM → dynamics → codec → detector chain."""

import json

import numpy as np
import pytest
import torch

from melodjinn.cli.main import run
from melodjinn.world_model.evaluation import EvalWorldConfig, _quiet_contexts, action_meanings, controllability, lam_actions
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.events import DrumHitDetector
from melodjinn.world_model.training import action_targets, heldout_token_ce
from melodjinn.world_model.world_data import build_world_tensors
from melodjinn.world_model.world_model import WorldModel
from melodjinn.world_model.worlds import make_world


@pytest.fixture(scope="module")
def shipped():
    model = WorldModel.load("drums")
    world = make_world(model.world, seed=1000)
    held = build_world_tensors(world, model.codec, 32, progress=False)
    actions = lam_actions(model, held, "cpu")
    meanings = action_meanings(actions, action_targets(held.events, 1, actions.shape[1]), model.num_actions, 0.002)
    return model, world, meanings


def _inject(model, world, action, noop, at_frame, contexts):
    P = 45
    actions = torch.full((len(contexts), P + 6), noop, dtype=torch.long)
    actions[:, :P] = model.frame_actions(model.infer_actions(contexts.mix[:, : P * 320]), P)
    actions[:, at_frame - 1] = action
    out = model.generate(contexts.tokens[..., :P], 6, actions, temperature=0.0, decode=True)
    return DrumHitDetector.for_world(world).detect(out["audio"].sum(1).numpy())  # (C, T)


def test_every_drum_has_an_action_and_it_lands_on_the_injected_frame(shipped):
    model, world, meanings = shipped
    noop = next(a for a, e in meanings.items() if e == 0)
    contexts = _quiet_contexts(world, model.codec, 12, 45)
    drums = {e: a for a, e in meanings.items() if e > 0}
    assert sorted(drums) == list(range(1, world.num_events)), meanings  # every drum is reachable
    for event, action in drums.items():
        on_time = _inject(model, world, action, noop, 45, contexts)
        late = _inject(model, world, action, noop, 46, contexts)
        # measured 0.92-1.0 per drum for the shipped model; a shifted or action-blind model scores ~0
        assert np.mean(on_time[:, 45] == event) >= 0.75, (event, on_time[:, 43:49])
        assert np.mean(late[:, 46] == event) >= 0.5, (event, late[:, 43:49])
        assert np.mean(late[:, 45] == event) <= 0.2  # injected one frame later → not on the earlier frame


def test_noop_action_adds_no_hit(shipped):
    model, world, meanings = shipped
    noop = next(a for a, e in meanings.items() if e == 0)
    contexts = _quiet_contexts(world, model.codec, 6, 45)
    detected = _inject(model, world, noop, noop, 45, contexts)
    assert (detected[:, 45:] == 0).mean() >= 0.9


def test_no_hit_is_played_that_no_action_asked_for(shipped):
    model, world, meanings = shipped
    result = controllability(model, world, meanings, EvalWorldConfig(contexts_per_action=8, noop_frames=40), "cpu")
    # 40 frames of NOOP after each injected action: a model that plays hits at the world's rate whatever the
    # action hears about 3 per second there
    assert result["unbidden_hits_per_second"] <= 0.3, result["per_action"]


def test_lam_actions_tell_the_dynamics_what_the_tokens_alone_cannot():
    model = WorldModel.load("drums")
    held = build_world_tensors(make_world(model.world, seed=1000), model.codec, 16, progress=False)
    given = heldout_token_ce(model, held, torch.from_numpy(lam_actions(model, held, "cpu")), "cpu")
    alone = heldout_token_ce(model, held, None, "cpu")
    assert set(alone) == {"token_ce_null", "token_ce_null_drums", "token_ce_null_drums_onsets"}
    # the next hit is announced only by the action (measured 0.61 vs 0.54 nats, averaged over every token, most of
    # them mid-silence or mid-decay; 3.46 vs 1.97 on the frames where a hit starts); an action-blind model scores
    # the same on both
    assert alone["token_ce_null"] > given["token_ce"] + 0.03, (alone, given)
    assert alone["token_ce_null_drums_onsets"] > given["token_ce_drums_onsets"] + 1.0, (alone, given)


def test_eval_world_command_scores_the_shipped_drum_model(capsys):
    """`melodjinn eval-world` end to end at small sizes: one JSON line whose figures a broken model fails (measured
    NMI 1.00, controllability 1.00, ΔPSNR 25 dB on 8 clips)."""
    result = run("eval-world", "checkpoint=drums", "eval.clips=8", "eval.contexts_per_action=2", "eval.psnr_clips=2",
                 "eval.noop_frames=8")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["action_nmi"] >= 0.9 and result["controllability"] >= 0.9 and result["delta_psnr"] > 10, result
    split = result["token_ce_by_frame"]["drums"]
    assert sum(k["frames"] for k in split.values()) == pytest.approx(1.0)
    assert np.mean(split["onsets"]["ce_per_codebook"]) == pytest.approx(result["token_ce_null_drums_onsets"], rel=1e-4)
    with pytest.raises(ConfigError, match="training seed"):
        run("eval-world", "checkpoint=drums", "eval.eval_seed=0")


def test_plot_actions_writes_the_image_and_refuses_what_it_cannot_draw(tmp_path):
    out = run("plot-actions", f"out={tmp_path / 'actions.png'}")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="suffixes"):
        run("plot-actions", f"out={tmp_path / 'actions.xyz'}")
    with pytest.raises(ConfigError, match="prompt_frames=150"):
        run("plot-actions", f"out={tmp_path / 'long.png'}", "prompt_frames=150")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["actions.png"]


def test_demo_runs_on_the_shipped_default(tmp_path):
    result = run("demo", f"out={tmp_path}", "seconds=2")
    assert (tmp_path / "steered.wav").exists()
    assert result["scripted_hits"] > 0
    # measured 0.94-1.0 over sampling seeds; an action-blind model plays no scripted hit (F1 ~0), and one that
    # attends past its 2 s training window or is conditioned on a section it never saw adds unbidden hits (0.5-0.7)
    assert result["scripted_hit_f1"] >= 0.85, result
    for bad, why in (("seconds=-1", "positive length"), ("prompt_frames=0", "give 1 to 150"), ("beat_frames=0", "1 or more"),
                     ("checkpoint=songs", "not a drum world model")):
        with pytest.raises(ConfigError, match=why):
            run("demo", f"out={tmp_path / 'bad'}", bad)
    assert not (tmp_path / "bad").exists()


def test_bench_generation_reports_every_figure_with_the_thread_count():
    result = run("bench", "target=generation", "repeats=1", "generation.context_frames=16", "generation.cache_context_frames=64",
                 "generation.frames=6", "generation.seconds_with_decoding=0.2")
    assert set(result["arrangements"]) == {"flatten", "delay", "multistream"}
    assert all(r["frames_per_second"] > 0 for r in result["arrangements"].values())
    assert result["kv_cache"]["context_frames"] == 64 and result["kv_cache"]["speedup"] > 0
    assert result["with_decoding"]["audio_seconds"] == pytest.approx(15 / 75)
    assert result["threads"] == torch.get_num_threads()
