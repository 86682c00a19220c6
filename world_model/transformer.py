"""The LLaMA-style causal transformer shared by the dynamics backbone and the LAM.

RMSNorm → attention with rotary positions → RMSNorm → SwiGLU, pre-norm residuals. Attention goes through
`F.scaled_dot_product_attention` (fused/flash kernels where the device has them). Incremental decoding keeps a
preallocated key/value cache per layer, so one generation step costs one position, not the whole context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    dim: int = 128  # model width C
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * dim (LLaMA's 2/3 * 4)
    dropout: float = 0.0
    rope_base: float = 10_000.0
    max_positions: int = 4096  # longest sequence the rotary table and KV cache cover


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding tables; `rotate` turns (B, H, T, D) queries/keys at absolute `positions`."""

    def __init__(self, head_dim: int, max_positions: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, D/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"sequence of {start + T} positions exceeds max_positions={self.cos.shape[0]}; raise model.max_positions")
        cos = self.cos[start : start + T].to(x.dtype)  # (T, D/2)
        sin = self.sin[start : start + T].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class KVCache:
    """Preallocated keys/values for every layer: (B, H, max_T, D) each, filled left to right."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_positions: int, device, dtype):
        shape = (batch, heads, max_positions, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0  # positions already cached

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig, rotary: Rotary):
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"dim={cfg.dim} must be divisible by heads={cfg.heads}")
        self.heads = cfg.heads
        self.head_dim = cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout
        self.rotary = rotary

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, D)
        start = cache.length if cache is not None else 0
        q, k = self.rotary.rotate(q, start), self.rotary.rotate(k, start)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            end = start + T
            if end > cache.capacity:
                raise ValueError(f"KV cache full ({cache.capacity} positions); start a new cache or raise max_positions")
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            keys, values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            if T == 1:  # one new position sees every cached one: no mask needed
                y = F.scaled_dot_product_attention(q, keys, values)
            else:  # a chunk: causal within the chunk, full view of the past
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        hidden = 16 * math.ceil(hidden / 16)
        self.gate_up = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, rotary: Rotary):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg, rotary)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """A stack of causal blocks over (B, T, C) embeddings, returning normalised (B, T, C) states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        rotary = Rotary(cfg.dim // cfg.heads, cfg.max_positions, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, rotary) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.rotary = rotary
        self.apply(_init_weights)
        for block in self.blocks:  # scaled residual projections (GPT-2): keeps deep stacks stable at init
            for out in (block.attn.proj, block.mlp.down):
                nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * cfg.layers))

    def new_cache(self, batch: int, device=None, dtype=None, max_positions: int | None = None) -> KVCache:
        param = next(self.parameters())
        return KVCache(
            self.cfg.layers, batch, self.cfg.heads, self.cfg.dim // self.cfg.heads,
            max_positions or self.cfg.max_positions, device or param.device, dtype or param.dtype,
        )

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # x: (B, T, C) → (B, T, C). With a cache, x holds only the new positions and the cache advances.
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
