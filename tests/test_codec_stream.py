"""Streaming decoding equals one decode of the whole sequence, whatever the chunking."""

import torch

from melodjinn.envs.core import load_world_model
from melodjinn.world_model.codec_stream import StreamingDecoder


def test_chunked_decoding_equals_whole_decoding():
    codec = load_world_model("drums", "cpu").codec
    codes = torch.randint(0, codec.codebook_size, (3, codec.num_codebooks, 120), generator=torch.Generator().manual_seed(0))
    whole = codec.decode(codes)
    decoder = StreamingDecoder(codec)
    for sizes in ([7, 1, 4, 4, 13, 1, 1, 30, 59], [120], [60, 60]):
        decoder.reset()
        bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
        chunks = [decoder.decode(codes[..., a:b]) for a, b in zip(bounds, bounds[1:])]
        assert [c.shape[-1] for c in chunks] == [n * 320 for n in sizes]
        torch.testing.assert_close(torch.cat(chunks, -1), whole, atol=1e-5, rtol=0)
    decoder.reset()
    # without the carried state (each chunk a fresh start) the audio differs: the state is what makes it exact
    fresh = torch.cat([StreamingDecoder(codec).decode(codes[..., a : a + 10]) for a in range(0, 120, 10)], -1)
    assert (fresh - whole).abs().max() > 1e-2
