"""Streaming decoding equals one decode of the whole sequence, whatever the chunking."""

import pytest
import torch

from melodjinn.envs.core import load_world_model
from melodjinn.world_model.codec import HOP, TinyCodec, TinyCodecConfig
from melodjinn.world_model.codec_stream import StreamingDecoder


def decode_in_chunks(decoder: StreamingDecoder, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    decoder.reset()
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    chunks = [decoder.decode(codes[..., a:b]) for a, b in zip(bounds, bounds[1:])]
    assert [c.shape[-1] for c in chunks] == [n * HOP for n in sizes]
    return torch.cat(chunks, -1)


def test_chunked_decoding_equals_whole_decoding():
    codec = load_world_model("drums", "cpu").codec
    codes = torch.randint(0, codec.codebook_size, (3, codec.num_codebooks, 120), generator=torch.Generator().manual_seed(0))
    whole = codec.decode(codes)
    decoder = StreamingDecoder(codec)
    # after a first chunk of >= 7 frames: single frames, the env's 4-frame steps, odd sizes, one long chunk
    for sizes in ([7, 1, 4, 4, 13, 1, 1, 30, 59], [7] + [1] * 113, [8] + [4] * 28, [120], [60, 60]):
        torch.testing.assert_close(decode_in_chunks(decoder, codes, sizes), whole, atol=1e-5, rtol=0)
    # a first chunk shorter than the first convolution's context still decodes: its start differs (padded
    # differently) and the difference fades as the LSTM forgets it
    short = decode_in_chunks(decoder, codes, [1, 2, 117])
    assert (short - whole)[..., : 7 * HOP].abs().max() > 1e-2
    torch.testing.assert_close(short[..., 80 * HOP :], whole[..., 80 * HOP :], atol=1e-5, rtol=0)
    # without the carried state (each chunk a fresh start) the audio differs: the state is what makes it exact
    fresh = torch.cat([StreamingDecoder(codec).decode(codes[..., a : a + 10]) for a in range(0, 120, 10)], -1)
    assert (fresh - whole).abs().max() > 1e-2


def test_streaming_covers_deeper_decoders():
    # two LSTM layers and two residual blocks per stage (dilations 1 and 2), untrained: the general code paths
    torch.manual_seed(0)
    codec = TinyCodec(TinyCodecConfig(ratios=[4, 2, 5, 8], lstm_layers=2, n_residual_layers=2, num_codebooks=2, codebook_size=16))
    for layer in codec.quantizer.vq.layers:
        layer._codebook.embed.normal_()
    codes = torch.randint(0, 16, (2, 2, 40), generator=torch.Generator().manual_seed(1))
    whole = codec.decode(codes)
    assert whole.abs().max() > 1e-3  # the comparison below is not between silences
    decoder = StreamingDecoder(codec)
    for sizes in ([7] + [1] * 33, [9, 4, 4, 4, 4, 4, 4, 4, 3], [40]):
        torch.testing.assert_close(decode_in_chunks(decoder, codes, sizes), whole, atol=1e-5, rtol=0)
    # an LSTM without its skip connection returns its own buffer, which the next ELU edits in place: the carried
    # state must not be part of it (weights scaled so the state saturates and such an edit shows: 2e-5 off if shared)
    from encodec.modules.lstm import SLSTM

    for layer in codec.decoder.model:
        if isinstance(layer, SLSTM):
            layer.skip = False
            with torch.no_grad():
                for p in layer.lstm.parameters():
                    p.mul_(8)
    whole = codec.decode(codes)
    decoder = StreamingDecoder(codec)
    torch.testing.assert_close(decode_in_chunks(decoder, codes, [9, 4, 4, 4, 4, 4, 4, 4, 3]), whole, atol=1e-6, rtol=0)


def test_streaming_refuses_a_non_causal_codec():
    from melodjinn.world_model.errors import CheckpointError

    with pytest.raises(CheckpointError, match="causal"):
        StreamingDecoder(TinyCodec(TinyCodecConfig(causal=False)))
