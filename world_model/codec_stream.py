"""Streaming decoding: tokens in chunks → audio in chunks, equal to one decode of the whole.

`streaming_decoder(codec)` picks the decoder for a codec: `StreamingDecoder` for the tiny codec (below), or
`AdditiveStreamingDecoder` for the additive codec (it carries its causal convolutions' last inputs).

The tiny codec:

Every layer of the causal SEANet decoder is either stateless (ELU), a causal convolution (keeps its last
(k-1)·d input samples as the next chunk's left context), a transposed convolution (the last k - s samples of a
chunk's output still await the next input frame: they are carried over and added), or the LSTM (keeps (h, c)).
So decoding frame by frame costs only the new frames, where re-decoding a window would redo its context every
step and still differ from the whole-sequence decode (the LSTM never forgets).

    decoder = StreamingDecoder(codec)
    audio = torch.cat([decoder.decode(codes[..., a:b]) for a, b in chunks], -1)   # == codec.decode(codes)

The first chunk is padded as the whole decode pads its start (reflection), so the equality is exact (to float
rounding) when the first chunk has at least 7 frames (the first convolution's context); shorter first chunks
give valid audio that differs slightly near the start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from melodjinn.world_model.additive_codec import AdditiveCodec
from melodjinn.world_model.codec import TinyCodec, _check_codes
from melodjinn.world_model.errors import CheckpointError, ConfigError


class StreamingDecoder:
    """Chunk-by-chunk decoding of a TinyCodec for a fixed batch of sequences (B, K, T) → (B, 1, T·HOP).

    A snapshot, like the dynamics' StepDecoder: the decoder is flattened once into a list of plain ops with their
    weights laid out for matmuls (weight norm applied). At an env step's 4 frames the module path pays more for
    per-call setup than for arithmetic (mkldnn's LSTM ~0.1-0.2 ms, the transposed-convolution kernel ~50 us, a
    no-op reflect pad before every kernel-1 convolution), so here a convolution is one batched matmul over its
    unfolded input, a transposed convolution one matmul and a shifted add, the LSTM a few small ops per frame.
    """

    def __init__(self, codec: TinyCodec):
        if not isinstance(codec, TinyCodec) or not codec.config.causal:
            raise CheckpointError("StreamingDecoder needs the causal tiny codec (TinyCodec with causal=true); "
                                  "streaming_decoder(codec) picks the decoder for an additive codec")
        self.codec = codec
        with torch.no_grad():
            self.ops = _flatten(codec.decoder.model)
            # the residual VQ's codebooks (projected) as one table: a frame's latent is the sum of K rows
            layers = codec.quantizer.vq.layers
            self.codebooks = torch.cat([layer.project_out(layer._codebook.embed) for layer in layers])  # (K·V, D)
            self.offsets = (torch.arange(len(layers), device=codec.device) * codec.codebook_size).view(1, -1, 1)
        self.state: dict[object, object] = {}  # op → what it carries to the next chunk

    def reset(self) -> None:
        """Start new sequences (the next chunk is a first chunk)."""
        self.state = {}

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, T) the next T frames of every sequence → (B, 1, T·HOP) their audio."""
        codec = self.codec
        codes = _check_codes(codes, codec.num_codebooks, codec.codebook_size, codec.device)
        if codes.shape[-1] == 0:
            return torch.zeros(codes.shape[0], 1, 0, device=codec.device)
        x = self.codebooks[codes + self.offsets].sum(1).transpose(1, 2)  # (B, K, T, D) → (B, D, T)
        return _run(self.ops, x, self.state) / codec.config.input_gain


class AdditiveStreamingDecoder:
    """Chunk-by-chunk decoding of an AdditiveCodec: each chunk is decoded in absolute time with the decoder's state
    carried from the previous one (its causal convolutions' last inputs; the last frame's levels and pitch, which
    the next frame fades from), so a chunk costs only its own frames. Equal to one decode of the whole, to float
    rounding."""

    def __init__(self, codec: AdditiveCodec):
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        """Start new sequences (the next chunk is a first chunk)."""
        self.carry: dict = {}
        self.next_frame = 0

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, K, T) the next T frames of every sequence → (B, 1, T·HOP) their audio."""
        codec = self.codec
        codes = _check_codes(codes, codec.num_codebooks, codec.codebook_size, codec.device)
        T = codes.shape[-1]
        if T == 0:
            return torch.zeros(codes.shape[0], 1, 0, device=codec.device)
        if self.carry and self.carry["pitch"].shape[0] != codes.shape[0]:
            raise ConfigError(f"AdditiveStreamingDecoder: {codes.shape[0]} sequences follow {self.carry['pitch'].shape[0]}; "
                              "call reset() before decoding a different batch")
        audio = codec.decode(codes, start_frame=self.next_frame, carry=self.carry)
        self.next_frame += T
        return audio


def streaming_decoder(codec) -> "StreamingDecoder | AdditiveStreamingDecoder":
    """The streaming decoder for `codec` (a trained tiny or additive codec)."""
    if isinstance(codec, AdditiveCodec):
        return AdditiveStreamingDecoder(codec)
    return StreamingDecoder(codec)


def _run(ops: list, x: torch.Tensor, state: dict) -> torch.Tensor:
    for op in ops:
        x = op(x, state)
    return x


class _CausalConv:
    """A causal stride-1 convolution (B, Cin, T) → (B, Cout, T) as one batched matmul over its unfolded inputs.
    The last (k-1)·d inputs are the next chunk's left context; kernel-1 convolutions have none (they never pad)."""

    def __init__(self, layer: nn.Module):
        conv = layer.conv.conv
        if conv.stride[0] != 1 or not layer.causal:
            raise CheckpointError("streaming decoding supports causal stride-1 convolutions only (the SEANet decoder's)")
        weight = _weight(conv)  # (Cout, Cin, k)
        self.dilation, self.pad_mode = conv.dilation[0], layer.pad_mode
        self.context = (weight.shape[-1] - 1) * self.dilation
        self.weight = weight.flatten(1)  # (Cout, Cin·k), column c·k + j: input channel c at tap j
        self.bias = _bias(conv)[:, None]  # (Cout, 1)

    def __call__(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        T = x.shape[-1]
        if self.context:
            past = state.get(self)
            x = _pad_start(x, self.context, self.pad_mode) if past is None else torch.cat([past, x], -1)
            state[self] = x[..., -self.context :]
            windows = x.unfold(-1, self.context + 1, 1)[..., :: self.dilation]  # (B, Cin, T, k)
            x = windows.transpose(2, 3).reshape(x.shape[0], -1, T)  # (B, Cin·k, T)
        return torch.baddbmm(self.bias, self.weight.expand(x.shape[0], -1, -1), x)


class _CausalConvTranspose:
    """A causal transposed convolution with kernel 2·stride, (B, Cin, T) → (B, Cout, T·s), trimmed on the right
    as the whole decode trims it. Input frame t writes 2·s samples: the first s are output block t, the last s add
    to block t+1. So the layer is one matmul and one shifted add; the chunk's last frame's overlap is carried to
    the next chunk."""

    def __init__(self, layer: nn.Module):
        conv = layer.convtr.convtr
        if not layer.causal or layer.trim_right_ratio != 1.0:
            raise CheckpointError("streaming decoding needs causal transposed convolutions trimmed on the right")
        weight = _weight(conv)  # (Cin, Cout, k)
        _, Cout, k = weight.shape
        self.stride = s = conv.stride[0]
        if k != 2 * s:
            raise CheckpointError(f"streaming decoding needs transposed convolutions with kernel = 2·stride (SEANet's), "
                                  f"got kernel {k}, stride {s}")
        self.weight = weight.permute(0, 2, 1).flatten(1).contiguous()  # (Cin, k·Cout), column j·Cout + c
        # the bias goes on the first half only: every output sample is one frame's first half plus one's second
        self.bias = torch.cat([_bias(conv).repeat(s), weight.new_zeros(s * Cout)])

    def __call__(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        B, _, T = x.shape
        s = self.stride
        # time-major product (T rows): at few frames and many output columns it is the faster orientation
        y = torch.baddbmm(self.bias, x.transpose(1, 2), self.weight.expand(B, -1, -1)).view(B, T, 2, s, -1)
        own, overlap = y[:, :, 0], y[:, :, 1]  # (B, T, s, Cout): frame t's block, and its part of block t + 1
        carry = state.get(self)
        if carry is not None:
            own[:, 0] += carry
        own[:, 1:] += overlap[:, :-1]
        state[self] = overlap[:, -1]
        return own.permute(0, 3, 1, 2).reshape(B, -1, T * s)  # (B, Cout, T·s)


class _LSTM:
    """SLSTM over (B, C, T), (h, c) carried per layer. Written out: at a few frames and width 128, mkldnn's LSTM
    kernel costs more than these ops (one matmul projects every frame's input, then one addmm and the gates per frame)."""

    def __init__(self, layer: nn.Module):
        lstm = layer.lstm
        self.skip, self.hidden = layer.skip, lstm.hidden_size
        self.layers = [
            (getattr(lstm, f"weight_ih_l{i}").t().contiguous(), getattr(lstm, f"weight_hh_l{i}").t().contiguous(),
             getattr(lstm, f"bias_ih_l{i}") + getattr(lstm, f"bias_hh_l{i}"))
            for i in range(lstm.num_layers)
        ]  # (C, 4H), (H, 4H), (4H,); gates in PyTorch's order i, f, g, o

    def __call__(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        B, _, T = x.shape
        H = self.hidden
        carried = state.get(self) or [(x.new_zeros(B, H), x.new_zeros(B, H))] * len(self.layers)
        y, final = x.transpose(1, 2), []  # (B, T, C)
        for (w_ih, w_hh, bias), (h, c) in zip(self.layers, carried):
            inputs = torch.baddbmm(bias, y, w_ih.expand(B, -1, -1))  # (B, T, 4H)
            y = x.new_empty(B, T, H)
            for t in range(T):
                gates = torch.addmm(inputs[:, t], h, w_hh)
                i, f, _, o = gates.sigmoid().chunk(4, 1)
                c = torch.addcmul(f * c, i, gates[:, 2 * H : 3 * H].tanh())
                h = torch.mul(o, c.tanh(), out=y[:, t])
            final.append((h.clone(), c))  # h views y: without the skip, y is returned and the next ELU edits it in place
        state[self] = final
        y = y.transpose(1, 2)
        return y + x if self.skip else y


class _ELU:
    """In place: every op returns a fresh tensor and keeps no view of its input, and a residual block's shortcut
    has read the block's input before the block's first ELU runs (fewer allocations matter at this size)."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return F.elu_(x, self.alpha)


class _Residual:
    """SEANetResnetBlock: shortcut(x) + block(x)."""

    def __init__(self, layer: nn.Module):
        self.shortcut, self.block = _flatten(layer.shortcut), _flatten(layer.block)

    def __call__(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return _run(self.shortcut, x, state).add_(_run(self.block, x, state))


def _flatten(module: nn.Module) -> list:
    from encodec.modules.conv import SConv1d, SConvTranspose1d
    from encodec.modules.lstm import SLSTM
    from encodec.modules.seanet import SEANetResnetBlock

    kinds = {SConv1d: _CausalConv, SConvTranspose1d: _CausalConvTranspose, SLSTM: _LSTM, SEANetResnetBlock: _Residual}
    ops: list = []
    for layer in module if isinstance(module, nn.Sequential) else [module]:
        if isinstance(layer, nn.ELU):
            ops.append(_ELU(layer.alpha))
        elif type(layer) in kinds:
            ops.append(kinds[type(layer)](layer))
        else:
            raise CheckpointError(f"streaming decoding does not know the decoder layer {type(layer).__name__}")
    return ops


def _pad_start(x: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    # the whole decode's left padding of a sequence's start (encodec's pad1d also takes inputs shorter than n)
    from encodec.modules.conv import pad1d

    return pad1d(x, (n, 0), mode)


def _weight(conv: nn.Module) -> torch.Tensor:
    # nn.utils.weight_norm keeps (g, v) and recomputes `weight` in a forward pre-hook: compute it once here
    if hasattr(conv, "weight_g"):
        return torch._weight_norm(conv.weight_v, conv.weight_g, 0).detach().clone()
    return conv.weight.detach().clone()


def _bias(conv: nn.Module) -> torch.Tensor:
    if conv.bias is None:
        return torch.zeros(conv.out_channels, device=next(conv.parameters()).device)
    return conv.bias.detach().clone()
