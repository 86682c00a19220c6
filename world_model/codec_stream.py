"""Streaming decoding for the tiny codec: tokens in chunks → audio in chunks, equal to one decode of the whole.

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

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from melodjinn.world_model.codec import TinyCodec, _check_codes
from melodjinn.world_model.errors import CheckpointError


class StreamingDecoder:
    """Chunk-by-chunk decoding of a TinyCodec for a fixed batch of sequences (B, K, T) → (B, 1, T·HOP).

    A snapshot, like the dynamics' StepDecoder: the decoder is flattened once into a list of plain ops with their
    weights computed (weight norm applied), so a small chunk pays few kernel launches and no module dispatch.
    """

    def __init__(self, codec: TinyCodec):
        if not isinstance(codec, TinyCodec) or not codec.config.causal:
            raise CheckpointError("streaming decoding needs the causal tiny codec (TinyCodec with causal=true)")
        self.codec = codec
        with torch.no_grad():
            self.ops = _flatten(codec.decoder.model)
            # the residual VQ's codebooks (projected) as one table: a frame's latent is one embedding_bag sum
            layers = codec.quantizer.vq.layers
            self.codebooks = torch.cat([layer.project_out(layer._codebook.embed) for layer in layers])  # (K·V, D)
            self.offsets = (torch.arange(len(layers), device=codec.device) * codec.codebook_size).view(1, -1, 1)
        self.state: dict[int, object] = {}

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
        B, K, T = codes.shape
        rows = (codes + self.offsets).transpose(1, 2).reshape(B * T, K)
        emb = F.embedding_bag(rows, self.codebooks, mode="sum").view(B, T, -1).transpose(1, 2)  # (B, D, T)
        return self._run(self.ops, emb) / codec.config.input_gain

    def _run(self, ops: list, x: torch.Tensor) -> torch.Tensor:
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "conv":  # causal, stride 1: the last `pad` inputs are the next chunk's left context
                _, key, weight, bias, dilation, pad, pad_mode = op
                context = self.state.get(key)
                x = F.pad(x, (pad, 0), mode=pad_mode) if context is None else torch.cat([context, x], -1)
                if pad:
                    self.state[key] = x[..., -pad:]
                x = F.conv1d(x, weight, bias, dilation=dilation)
            elif kind == "convtr":  # the last k - s outputs still await the next input: carry them over
                _, key, weight, bias, stride = op
                y = F.conv_transpose1d(x, weight, bias, stride=stride)  # (B, C, (T-1)·s + k)
                done = x.shape[-1] * stride
                out, tail = y[..., :done], y[..., done:]
                carry = self.state.get(key)
                if carry is not None:
                    out = torch.cat([out[..., : carry.shape[-1]] + carry, out[..., carry.shape[-1] :]], -1)
                self.state[key] = tail - bias.view(1, -1, 1)  # the next chunk adds the bias to these samples
                x = out
            elif kind == "lstm":
                _, key, lstm, skip = op
                seq = x.permute(2, 0, 1)
                y, self.state[key] = lstm(seq, self.state.get(key))
                x = (y + seq if skip else y).permute(1, 2, 0)
            elif kind == "elu":
                x = F.elu(x, op[1])
            else:  # "residual": shortcut(x) + block(x)
                _, shortcut, block = op
                x = self._run(shortcut, x) + self._run(block, x)
        return x


def _flatten(module: nn.Module) -> list:
    from encodec.modules.conv import SConv1d, SConvTranspose1d
    from encodec.modules.lstm import SLSTM
    from encodec.modules.seanet import SEANetResnetBlock

    ops: list = []
    for layer in module if isinstance(module, nn.Sequential) else [module]:
        key = next(_KEYS)
        if isinstance(layer, SConv1d):
            conv = layer.conv.conv
            if conv.stride[0] != 1 or not layer.causal:
                raise CheckpointError("streaming decoding supports causal stride-1 convolutions only (the SEANet decoder's)")
            pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
            ops.append(("conv", key, _weight(conv), conv.bias, conv.dilation[0], pad, layer.pad_mode))
        elif isinstance(layer, SConvTranspose1d):
            conv = layer.convtr.convtr
            if not layer.causal or layer.trim_right_ratio != 1.0:
                raise CheckpointError("streaming decoding needs causal transposed convolutions trimmed on the right")
            ops.append(("convtr", key, _weight(conv), conv.bias, conv.stride[0]))
        elif isinstance(layer, SLSTM):
            ops.append(("lstm", key, layer.lstm, layer.skip))
        elif isinstance(layer, nn.ELU):
            ops.append(("elu", layer.alpha))
        elif isinstance(layer, SEANetResnetBlock):
            ops.append(("residual", _flatten(layer.shortcut), _flatten(layer.block)))
        else:
            raise CheckpointError(f"streaming decoding does not know the decoder layer {type(layer).__name__}")
    return ops


_KEYS = itertools.count()  # a unique state key per stateful layer


def _weight(conv: nn.Module) -> torch.Tensor:
    # nn.utils.weight_norm keeps (g, v) and recomputes `weight` in a forward pre-hook: compute it once here
    if hasattr(conv, "weight_g"):
        return torch._weight_norm(conv.weight_v, conv.weight_g, 0).detach().clone()
    return conv.weight.detach().clone()
