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
