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
