"""Test-wide settings and shared fixtures.

One torch thread: tests run beside other work on small shared CPUs, where more threads are slower, and
single-threaded kernels keep seeded results identical run to run."""

import os

import numpy as np
import pytest
import torch

from melodjinn.world_model.codec import TinyCodec, TinyCodecConfig
from melodjinn.world_model.drum_world import DrumWorld

torch.set_num_threads(int(os.environ.get("MELODJINN_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def untrained_codec(tmp_path_factory):
    """A seeded, untrained tiny codec (2 codebooks of 16) saved to a directory: the cheapest real codec for
    recipe tests that train a world model for a few steps."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("codec")
    codec = TinyCodec(TinyCodecConfig(num_codebooks=2, codebook_size=16))
    with torch.no_grad():
        mixes = torch.from_numpy(np.stack([DrumWorld().clip(i).mix for i in range(4)]))
        codec.init_quantizer(codec.encoder(mixes[:, None]))
    codec.save(path)
    return str(path)


@pytest.fixture(scope="session")
def snare_store(tmp_path_factory):
    """A preference store of 64 answers by a simulated listener who likes the snare, comparing two samples of the
    shipped drum prior on fresh drum-world contexts (seeded): the data the personalisation tests learn from."""
    from melodjinn.agents.policies import PriorPolicy, PriorScorer
    from melodjinn.agents.prior import load_prior
    from melodjinn.feedback.listeners import SimulatedListener, make_utility
    from melodjinn.feedback.sessions import ContinuationSampler, listening_session
    from melodjinn.feedback.store import PreferenceStore
    from melodjinn.world_model.worlds import make_world

    sampler = ContinuationSampler("drums", steps=32)
    policy = PriorPolicy(PriorScorer.for_env(load_prior("drums"), sampler.env), 1.0)
    utility = make_utility("drum:snare", make_world(sampler.core.model.world))
    path = tmp_path_factory.mktemp("snare-store")
    with PreferenceStore(path) as store:
        listening_session(sampler, policy, policy, SimulatedListener(utility, temperature=0.3, seed=0), store,
                          comparisons=64, seed=0, labels=("prior", "prior"))
    return path
