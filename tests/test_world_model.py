"""The world model learns and obeys: LAM action discovery, action/frame alignment, training resume."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from melodjinn.cli.main import compose
from melodjinn.world_model.drum_world import DrumWorld, DrumWorldConfig
from melodjinn.world_model.dynamics import DynamicsConfig, DynamicsModel
from melodjinn.world_model.errors import CheckpointError, ConfigError
from melodjinn.world_model.lam import LAMConfig, LatentActionModel
from melodjinn.world_model.worlds import make_world
from melodjinn.world_model.metrics import normalized_mutual_info
from melodjinn.world_model.runtime import to_dataclass
from melodjinn.world_model.training import Trainer, action_targets, train_world
from melodjinn.world_model.world_model import WorldModel


def _mixes(world, n):
    clips = [world.clip(i) for i in range(n)]
    return torch.tensor(np.stack([c.mix for c in clips])), np.stack([c.events for c in clips])


def test_lam_discovers_drum_actions_aligned_to_the_next_frame():
    """A short seeded LAM run on the 2-drum world: its actions must explain the event in the *next* patch
    (a[t] ↔ frame t+1) far better than chance, and far better than the same-frame event (a one-frame shift)."""
    torch.manual_seed(0)
    world = DrumWorld(DrumWorldConfig(num_drums=2, clip_seconds=1.0))
    train_mix, _ = _mixes(world, 256)
    held_mix, held_events = _mixes(DrumWorld(world.config, seed=1000), 48)
    lam = LatentActionModel(LAMConfig(num_actions=6))
    before = lam.infer_actions(held_mix).numpy()
    opt = torch.optim.Adam(lam.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 401):
        out = lam(train_mix[torch.randint(len(train_mix), (16,), generator=gen)])
        loss = 100 * out["recon_loss"] + out["vq_loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step < 200 and step % 50 == 0:
            lam.quantizer.restart_dead_codes(out["z"].detach(), 0.0005, out["onset_error"])
    lam.merge_redundant_codes(train_mix[:32])  # as train-world does when it freezes the LAM
    lam.eval()
    actions = lam.infer_actions(held_mix).numpy()  # (N, T-1)
    aligned = normalized_mutual_info(actions, action_targets(held_events, 1, actions.shape[1]))
    same_frame = normalized_mutual_info(actions, held_events[:, 0, :-1])
    untrained = normalized_mutual_info(before, action_targets(held_events, 1, before.shape[1]))
    assert aligned >= 0.5, aligned  # measured 0.57 at this seed; an untrained LAM scores ~0.1
    assert aligned > 3 * same_frame, (aligned, same_frame)
    assert untrained < 0.3, untrained


def test_action_targets_follow_the_lam_convention():
    events = np.zeros((1, 1, 8), dtype=np.int64)
    events[0, 0, 3] = 2  # drum 1 starts in frame 3
    labels = action_targets(events, stride=1, num_actions_steps=7)
    assert labels.tolist() == [[0, 0, 2, 0, 0, 0, 0]]  # a[2] explains frame 2 → 3
    labels = action_targets(events, stride=2, num_actions_steps=3)
    assert labels.tolist() == [[2, 0, 0]]  # patch 1 = frames 2-3; a[0] explains patch 0 → 1


def _tiny_overrides(untrained_codec, out, steps):
    return [
        f"out={out}", f"codec.checkpoint={untrained_codec}", f"train.steps={steps}", "train.batch_size=4",
        "train.train_clips=8", "train.eval_clips=4", "train.eval_every=2", "train.checkpoint_every=3",
        "train.freeze_lam_at=0", "train.restart_every=1", "train.restart_until=2", "train.warmup_steps=2",
        "train.freeze_when_settled=true", "train.settle_every=1", "train.settle_threshold=1.0", "train.settle_patience=1",  # settles at step 3
        "world.clip_seconds=0.5", "model.lam.dim=16", "model.lam.heads=2", "model.dynamics.dim=16",
        "model.dynamics.layers=1", "model.dynamics.heads=2",
    ]


def test_killed_run_resumes_to_the_same_weights(untrained_codec, tmp_path, monkeypatch):
    straight = train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path / "a", 6)))
    # the same run killed during step 5 (its last checkpoint is step 3), then resumed
    real_step = Trainer.train_step

    def dies_at_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path / "b", 6)))
    monkeypatch.setattr(Trainer, "train_step", real_step)
    resumed = train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path / "b", 6) + ["resume=true"]))
    a, b = WorldModel.load(tmp_path / "a"), WorldModel.load(tmp_path / "b")
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert straight["action_nmi"] == resumed["action_nmi"]
    assert straight["lam_frozen_at"] == resumed["lam_frozen_at"] == 3


def test_existing_run_is_never_overwritten(untrained_codec, tmp_path):
    train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path, 3)))
    before = (tmp_path / "dynamics.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="resume=true"):
        train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path, 3)))
    with pytest.raises(CheckpointError, match="model"):
        train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path, 6) + ["resume=true", "model.lam.num_actions=4"]))
    assert (tmp_path / "dynamics.safetensors").read_bytes() == before


def test_checkpoint_mismatch_is_named(untrained_codec, tmp_path):
    train_world(compose("train-world", _tiny_overrides(untrained_codec, tmp_path, 3)))
    import json

    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["dynamics"]["layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        WorldModel.load(tmp_path)


def _song_overrides(untrained_codec, out, steps, stems):
    return [o for o in _tiny_overrides(untrained_codec, out, steps) if not o.startswith("world.")] + [
        "world=songs", "world.clip_seconds=0.5", f"world.stems=[{','.join(stems)}]", "train.freeze_when_settled=false"]


def test_add_stream_grows_a_trained_model_and_fine_tunes_only_the_new_stream(untrained_codec, tmp_path):
    base_dir, grown_dir = tmp_path / "drums", tmp_path / "grown"
    train_world(compose("train-world", _song_overrides(untrained_codec, base_dir, 3, ["drums"])))
    summary = train_world(compose("train-world", _song_overrides(untrained_codec, grown_dir, 3, ["drums", "lead"]) + [
        f"init={base_dir}", "add_streams=[lead]", "train=grow", "train.new_streams_only=true"]))
    base, grown = WorldModel.load(base_dir), WorldModel.load(grown_dir)
    assert grown.stream_names == ["drums", "lead"] and "token_ce_lead" in summary and "token_ce_drums" in summary
    assert "token_ce_null_lead" in summary
    new_state, old_state = grown.state_dict(), base.state_dict()
    for name, tensor in old_state.items():  # backbone, LAM and the drum stream kept exactly
        assert torch.equal(new_state[name], tensor), name
    assert new_state["dynamics.streams.lead.embed"].abs().sum() > 0  # zero-initialised, then trained
    # the song-world block of eval-world runs on it: whole songs past the 0.5 s training window (rollovers)
    from melodjinn.world_model.song_eval import SongEvalConfig, evaluate_songs

    songs = evaluate_songs(grown, grown.world, SongEvalConfig(song_clips=2, song_seconds=3.0, song_prompt_frames=16), 1000)
    assert songs["songs"]["window_frames"] == 37 and set(songs["detector_f1"]) == {"drums", "lead"}
    assert all(set(row) == {"drums", "lead"} for row in songs["section_table"].values())
    assert songs["coupling"]["truth_labels"]["lead_on_beat"] > 0.5  # the world's lead starts on beats
    with pytest.raises(ConfigError, match=r"world.stems=\[drums,lead\]"):
        train_world(compose("train-world", _song_overrides(untrained_codec, tmp_path / "bad", 3, ["lead", "drums"]) + [
            f"init={base_dir}", "add_streams=[lead]"]))
    with pytest.raises(ConfigError, match="init"):
        train_world(compose("train-world", _song_overrides(untrained_codec, tmp_path / "bad2", 3, ["drums"]) + ["add_streams=[lead]"]))
    # add_streams_like: the new stream starts as a copy of an old one (same codec, so the same token meanings)
    from melodjinn.world_model.training import _grown_model

    world_cfg = dict(grown.world)
    like = _grown_model(str(base_dir), ["lead"], "drums", 1.0, 0.0, make_world(world_cfg, seed=0), world_cfg, "cpu")
    assert torch.equal(like.dynamics.streams["lead"].head, base.dynamics.streams["drums"].head)
    with pytest.raises(ConfigError, match="needs add_streams"):
        _grown_model(str(base_dir), [], "drums", 1.0, 0.0, make_world({**world_cfg, "stems": ["drums"]}, seed=0), world_cfg, "cpu")
    # shrink and perturb: the backbone starts as half the trained weights plus a fresh initialisation's
    torch.manual_seed(0)
    shrunk = _grown_model(str(base_dir), ["lead"], "drums", 0.5, 0.3, make_world(world_cfg, seed=0), world_cfg, "cpu")
    torch.manual_seed(0)
    WorldModel.load(base_dir)  # the same draws as _grown_model's load, so the next model is the fresh part above
    fresh = dict(DynamicsModel(base.dynamics.cfg).named_parameters())
    grown_params = dict(shrunk.dynamics.named_parameters())
    for name, tensor in base.dynamics.named_parameters():
        torch.testing.assert_close(grown_params[name], 0.5 * tensor + 0.3 * fresh[name], msg=name)
    torch.testing.assert_close(shrunk.dynamics.streams["lead"].head, shrunk.dynamics.streams["drums"].head)
    with pytest.raises(ConfigError, match="init_shrink and init_perturb need init"):
        train_world(compose("train-world", _song_overrides(untrained_codec, tmp_path / "bad3", 3, ["drums"]) + ["init_shrink=0.5"]))
    # a frozen backbone must be the trained one, and only streams being added can be trained alone
    with pytest.raises(ConfigError, match="damaged for good"):
        train_world(compose("train-world", _song_overrides(untrained_codec, tmp_path / "bad4", 3, ["drums", "lead"]) + [
            f"init={base_dir}", "add_streams=[lead]", "train.new_streams_only=true", "init_shrink=0.5"]))
    with pytest.raises(ConfigError, match="add_streams"):
        train_world(compose("train-world", _song_overrides(untrained_codec, tmp_path / "bad5", 3, ["drums"]) + [
            f"init={base_dir}", "train.new_streams_only=true"]))
    assert not (tmp_path / "bad4").exists() and not (tmp_path / "bad5").exists()
    with pytest.raises(ConfigError, match=r"shrink must be in \(0, 1\]"):
        base.dynamics.shrink_and_perturb(0.0, 0.5)


def test_swapping_two_actions_only_renames_them():
    """train-world makes 0 the commonest ("nothing new") code by exchanging ids in the LAM and the dynamics at
    once: the model must behave exactly as before with the two ids renamed."""
    cfg = compose("train-world", ["out=unused", "world.clip_seconds=0.5"])
    torch.manual_seed(0)
    lam_cfg = to_dataclass(LAMConfig, cfg.model.lam, "model.lam")
    dyn = OmegaConf.to_container(cfg.model.dynamics, resolve=True)
    dyn.update(streams=["drums"], num_codebooks=4, codebook_size=128, num_actions=lam_cfg.num_actions)
    model = WorldModel(lam_cfg, to_dataclass(DynamicsConfig, dyn, "model.dynamics"), codec=None).eval()
    model.lam.quantizer.code_map[5] = 2  # a merge, which the swap must carry along
    mix = torch.randn(2, 320 * 20) * 0.1
    tokens = torch.randint(0, 128, (2, 1, 4, 20))
    actions = torch.randint(0, 8, (2, 20))
    before_codes = model.infer_actions(mix)
    before_logits, _ = model.dynamics(tokens, actions, torch.zeros(2, 20, dtype=torch.long))
    model.swap_actions(0, 2)
    renamed = lambda x: torch.where(x == 0, 2, torch.where(x == 2, 0, x))  # noqa: E731
    assert torch.equal(model.infer_actions(mix), renamed(before_codes))
    after_logits, _ = model.dynamics(tokens, renamed(actions), torch.zeros(2, 20, dtype=torch.long))
    torch.testing.assert_close(after_logits, before_logits)
    assert int(model.lam.quantizer.code_map[5]) == 0
