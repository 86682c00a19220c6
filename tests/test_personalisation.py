"""DPO personalisation of the action prior, and its win rate under the listener's hidden preference.

The learning test is the point: DPO on a simulated snare lover's 128 answers must make the drum prior win against
the base under that listener's hidden utility on fresh contexts, and the same pairs with chosen and rejected swapped
must not — so a pipeline that learns nothing, or learns backwards, fails.
"""

import json
from dataclasses import replace

import pytest
import torch

from melodjinn.agents.prior import ActionPrior, PriorModelConfig, load_prior
from melodjinn.cli.main import main, run
from melodjinn.feedback.dpo import DPORecipe, dpo_trainer, personalise_prior, tune
from melodjinn.feedback.evaluation import evaluation_contexts, ratings_curve, win_rate
from melodjinn.feedback.listeners import SimulatedListener
from melodjinn.feedback.sessions import listening_session, prior_policy
from melodjinn.feedback.store import PreferencePair, PreferenceStore, listener_pairs
from melodjinn.world_model.errors import ConfigError, DataError

RECIPE = replace(DPORecipe(), eval_share=0.0)  # the shipped recipe, every pair trained on
QUICK = replace(RECIPE, steps=2, warmup_steps=0, batch_size=4)  # for tests of plumbing, not of learning


@pytest.fixture(scope="module")
def base():
    return load_prior("drums")


@pytest.fixture(scope="module")
def pairs(snare_store):
    return listener_pairs(snare_store, None, None)[1]


def swapped(pairs):
    return [PreferencePair(p.rejected, p.chosen, p.listener, p.context, p.answer_id) for p in pairs]


def test_dpo_token_ids_are_the_priors_own(base, pairs, tmp_path):
    """TRL tokenises the text to exactly `ActionPrior.encode`'s ids plus its <eos> (no second <bos>), and the loss
    counts exactly the step actions: every frames_per_step-th action token of the completion."""
    trainer = dpo_trainer(base, pairs[:4], QUICK, seed=0, output_dir=str(tmp_path), device=torch.device("cpu"))
    eos = base.tokenizer.eos_token_id
    for row, pair in zip(trainer.train_dataset, pairs[:4]):
        for ids, clip in ((row["chosen_ids"], pair.chosen), (row["rejected_ids"], pair.rejected)):
            expected = base.encode(clip.actions[None], clip.sections[None])[0].tolist()  # (1 + 2J,)
            assert row["prompt_ids"] + ids == expected + [eos]
            assert row["prompt_ids"] == expected[:2]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    frames = 4  # the drum env's frames_per_step: one step action, then three rest codes
    J = len(pairs[0].chosen.actions)
    step_positions = [2 + 2 * j for j in range(0, J, frames)]  # ids of a_0, a_4, a_8, ... in <bos> s0 a0 s1 a1 ...
    for mask in batch["completion_mask"]:  # (2B, L): chosen rows, then rejected rows
        assert mask.nonzero()[:, 0].tolist() == step_positions


@pytest.fixture(scope="module")
def tuned(base, pairs):
    return personalise_prior(base, pairs, RECIPE, seed=0)


def test_dpo_learns_the_listeners_preference_and_swapped_labels_do_not(base, pairs, tuned, drum_sampler, snare):
    """Measured on these 128 answers (DPO seeds 0, 1, 2; 64 evaluation contexts): the tuned prior wins 0.95, 0.95,
    1.0 against the base, the swapped control 0.05, 0.13, 0.05; a prior that learned nothing sits near 0.5."""
    tuned_prior, metrics = tuned
    assert metrics["train_pairs"] == len(pairs) == 127 and metrics["train_accuracy"] > 0.6  # one answer was a tie
    control, _ = personalise_prior(base, swapped(pairs), RECIPE, seed=0)
    baseline = prior_policy(base, drum_sampler)
    learned = win_rate(drum_sampler, prior_policy(tuned_prior, drum_sampler), baseline, snare, contexts=32, seed=0)
    backwards = win_rate(drum_sampler, prior_policy(control, drum_sampler), baseline, snare, contexts=32, seed=0)
    assert learned["wins"] + learned["ties"] + learned["losses"] == 32
    assert learned["win_rate"] >= 0.8, learned
    assert backwards["win_rate"] <= 0.3, backwards
    assert learned["policy_utility"] > learned["baseline_utility"] > backwards["policy_utility"]


def test_the_same_seed_gives_the_same_tuned_prior(base, pairs):
    first, second = (tune(base, pairs[:16], QUICK, seed=3) for _ in range(2))
    other = tune(base, pairs[:16], QUICK, seed=4)
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, second.model.state_dict()[name]), name
    assert any(not torch.equal(w, other.model.state_dict()[n]) for n, w in first.model.state_dict().items())
    assert any(not torch.equal(w, base.model.state_dict()[n]) for n, w in first.model.state_dict().items())


def test_personalise_saves_a_prior_that_loads_back_with_where_it_came_from(snare_store, tmp_path, capsys):
    out = tmp_path / "snare-prior"
    summary = run("personalise", f"store={snare_store}", f"out={out}", "ratings=32", "train.steps=2",
                  "train.batch_size=4", "train.warmup_steps=0")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    prior = load_prior(out)
    info = prior.info["personalisation"]
    assert info["base_prior"].endswith("drums/prior") and info["store"] == str(snare_store)
    assert info["listener"] == "simulated-drum:snare" and info["pairs"] == 32
    assert info["beta"] == 0.05 and info["steps"] == 2
    assert info["metrics"]["train_pairs"] == 24 and info["metrics"]["held_out_pairs"] == 8
    assert 0 <= info["metrics"]["held_out_accuracy"] <= 1
    assert prior.info["world_model"]["checkpoint"] == "drums"
    assert prior.num_actions == 16 and prior.context == 128


def test_eval_personal_prints_one_json_line(tuned, tmp_path, capsys):
    tuned[0].save(tmp_path / "tuned")
    summary = run("eval-personal", f"policy={tmp_path / 'tuned'}", "preference=drum:snare", "contexts=2", "steps=4")
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == summary and line["contexts"] == 2 and 0 <= line["win_rate"] <= 1


def test_ratings_curve_tunes_on_the_first_n_pairs(snare_store, base, drum_sampler, snare):
    curve = ratings_curve(snare_store, base, drum_sampler, snare, [16, 8], QUICK, contexts=2, seed=0)
    assert [point["ratings"] for point in curve] == [8, 16]
    assert all(point["subsets"] == 1 and point["runs"][0]["contexts"] == 2 and 0 <= point["win_rate"] <= 1
               for point in curve)


def test_ratings_curve_averages_disjoint_sets_of_answers(snare_store, base, drum_sampler, snare):
    curve = ratings_curve(snare_store, base, drum_sampler, snare, [8, 100], QUICK, contexts=2, seed=0, subsets=3)
    assert [point["subsets"] for point in curve] == [3, 1]  # 127 answers hold three sets of 8 but one of 100
    assert curve[0]["win_rate"] == pytest.approx(sum(curve[0]["win_rates"]) / 3)
    first_alone = ratings_curve(snare_store, base, drum_sampler, snare, [8], QUICK, contexts=2, seed=0)
    assert first_alone[0]["win_rate"] == curve[0]["win_rates"][0]  # set 1 is the first 8 answers
    with pytest.raises(ConfigError, match="subsets must be >= 1"):
        ratings_curve(snare_store, base, drum_sampler, snare, [8], QUICK, contexts=2, subsets=0)


def test_evaluation_never_draws_a_rating_sessions_context_seeds():
    import numpy as np

    session_seeds = {int(s) for seed in range(4) for s in np.random.default_rng(seed).integers(2**31 - 1, size=256)}
    assert not session_seeds & {s for seed in range(4) for s in evaluation_contexts(seed, 256)}


# ---- errors that say what to do ----------------------------------------------------------------------------------


def test_store_without_decided_pairs_is_an_error(tmp_path, drum_sampler, base):
    policy = prior_policy(base, drum_sampler)
    never_decides = SimulatedListener(lambda clip: 0.0, tie_margin=1.0, name="undecided")
    with PreferenceStore(tmp_path / "ties") as store:
        listening_session(drum_sampler, policy, policy, never_decides, store, comparisons=1, labels=("prior", "prior"))
    with pytest.raises(DataError, match="no decided pairs"):
        listener_pairs(tmp_path / "ties", None, None)
    with pytest.raises(DataError, match="holds no preference store"):
        listener_pairs(tmp_path / "nothing-here", None, None)
    assert not (tmp_path / "nothing-here").exists()
    with pytest.raises(DataError, match="no answers of listener 'someone'"):
        listener_pairs(tmp_path / "ties", "someone", None)


def test_too_few_pairs_is_an_error(snare_store, base, pairs):
    with pytest.raises(DataError, match="ratings=1000 asked"):
        listener_pairs(snare_store, None, 1000)
    with pytest.raises(DataError, match="min_train_pairs"):
        personalise_prior(base, pairs[:8], replace(QUICK, eval_share=0.25), seed=0)


def test_a_prior_of_another_action_count_is_an_error(pairs):
    other = ActionPrior.create(8, PriorModelConfig(dim=16, layers=1, heads=2, mlp_dim=32), seed=0)
    with pytest.raises(ConfigError, match="knows 8 actions"):
        personalise_prior(other, pairs, QUICK, seed=0)


def test_out_may_not_overwrite_the_base_prior(snare_store, base, tmp_path, capsys):
    base.save(tmp_path / "base")
    before = (tmp_path / "base" / "model.safetensors").read_bytes()
    assert main(["personalise", f"store={snare_store}", f"prior={tmp_path / 'base'}", f"out={tmp_path / 'base'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base prior's own directory" in err[0]
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == before
