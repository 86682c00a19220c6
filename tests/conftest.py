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
def drum_sampler():
    """Pairs of 32-step continuations (1.7 s) of one context from the shipped drum world model."""
    from melodjinn.feedback.sessions import ContinuationSampler

    return ContinuationSampler("drums", steps=32)


@pytest.fixture(scope="session")
def snare(drum_sampler):
    """The hidden preference of the simulated listener the personalisation tests learn from: snare hits per second."""
    from melodjinn.feedback.listeners import make_utility
    from melodjinn.world_model.worlds import make_world

    return make_utility("drum:snare", make_world(drum_sampler.core.model.world))


@pytest.fixture(scope="session")
def snare_store(tmp_path_factory, drum_sampler, snare):
    """A preference store of 128 answers by a simulated listener who likes the snare, comparing two samples of the
    shipped drum prior on fresh drum-world contexts (seeded). Two continuations of one context differ by ~0.1 snare
    hits/s (median), so the listener answers sharply (Bradley-Terry temperature 0.05: ~90 % of its answers follow
    its utility; at 0.3 only 56 % did, too few for 48 training pairs to carry the preference)."""
    from melodjinn.agents.prior import load_prior
    from melodjinn.feedback.listeners import SimulatedListener
    from melodjinn.feedback.sessions import listening_session, prior_policy
    from melodjinn.feedback.store import PreferenceStore

    policy = prior_policy(load_prior("drums"), drum_sampler)
    path = tmp_path_factory.mktemp("snare-store")
    with PreferenceStore(path) as store:
        listening_session(drum_sampler, policy, policy, SimulatedListener(snare, temperature=0.05, seed=0), store,
                          comparisons=128, seed=0, labels=("prior", "prior"))
    return path
