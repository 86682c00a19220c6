"""Long recipes: full training to the acceptance metrics (`make test-slow`; tens of minutes on 2 cores)."""

import pytest

from melodjinn.cli.main import compose, run
from melodjinn.world_model.evaluation import EvalWorldConfig, evaluate
from melodjinn.world_model.training import train_world
from melodjinn.world_model.world_model import WorldModel

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed, drums", [(0, 3), (1, 3), (2, 3), (0, 2)])
def test_drum_world_recipe_discovers_and_obeys_actions(seed, drums, tmp_path):
    """The default recipe on 3 seeds and on 2 drums (5 drums does not reach the targets yet: see the README)."""
    train_world(compose("train-world", [f"out={tmp_path}", f"seed={seed}", f"world.num_drums={drums}"]))
    model = WorldModel.load(tmp_path)
    metrics = evaluate(model, model.world, EvalWorldConfig())
    assert metrics["action_nmi"] >= 0.8, metrics
    assert metrics["controllability"] >= 0.9, metrics


def test_shipped_codec_meets_event_f1():
    metrics = run("eval-codec", "checkpoint=codec-drums")
    assert metrics["event_f1"] >= 0.95, metrics


def test_shipped_world_model_meets_acceptance():
    model = WorldModel.load("drums")
    metrics = evaluate(model, model.world, EvalWorldConfig())
    assert metrics["action_nmi"] >= 0.8, metrics
    assert metrics["controllability"] >= 0.9, metrics


def test_shipped_song_model_meets_acceptance():
    """`eval-world checkpoint=songs` at its defaults (16 held-out songs, temperature 0.7): bass-on-kick within 0.1
    of the truth in one pass and clearly below it without the other stems; per-section density r >= 0.8 on every
    stem and energy r >= 0.8 on drums and lead. The bass's energy r measured 0.80, on the edge, so it is held to
    0.75 here (README, "Song world")."""
    from melodjinn.world_model.song_eval import SongEvalConfig, evaluate_songs

    model = WorldModel.load("songs")
    result = evaluate_songs(model, model.world, SongEvalConfig(), 1000)
    share = {k: v["bass_on_kick"] for k, v in result["coupling"].items()}
    assert abs(share["joint"] - share["truth"]) <= 0.1 and share["independent"] <= share["truth"] - 0.2, share
    r = result["section_correlation"]
    assert min(r["onsets_per_second"][f"r_{s}"] for s in ("drums", "bass", "lead")) >= 0.8, r
    assert r["rms"]["r_drums"] >= 0.8 and r["rms"]["r_lead"] >= 0.8 and r["rms"]["r_bass"] >= 0.75, r


def test_a_grown_lead_starts_ahead_of_scratch_at_a_short_budget(tmp_path):
    """README "Adding a stream", shorter budgets: a drum-only song model trained by the default recipe, grown by the
    lead and fine-tuned by `train=grow` for 500 steps, ends at lead CE 0.214 (seed 1: 0.211); `[drums, lead]` from
    scratch by the same 500 steps at 0.227 (0.224), and an untrained backbone grown the same way at 0.230. So the
    margin asked here fails if growing loses what the drum backbone learned. (At 1 000 steps the two are level, which
    is why the issue's "half the steps" is not met.)"""
    common = ["world=songs", "codec.name=additive", "codec.checkpoint=checkpoints/songs/codec", "train.merge_tolerance=0"]
    short = ["world.stems=[drums,lead]", "train=grow", "train.steps=500"]
    train_world(compose("train-world", common + ["world.stems=[drums]", f"out={tmp_path / 'drums'}"]))
    grown = train_world(compose("train-world", common + short + [
        f"init={tmp_path / 'drums'}", "add_streams=[lead]", "add_streams_like=drums", "init_shrink=0.5",
        "init_perturb=0.5", f"out={tmp_path / 'grown'}"]))
    scratch = train_world(compose("train-world", common + short + [f"out={tmp_path / 'scratch'}"]))
    assert grown["token_ce_null_lead"] <= scratch["token_ce_null_lead"] - 0.007, (grown, scratch)
