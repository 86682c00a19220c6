"""The LLaMA-style causal transformer shared by the dynamics backbone and the LAM.

RMSNorm → attention with rotary positions → RMSNorm → SwiGLU, pre-norm residuals. Attention goes through
`F.scaled_dot_product_attention` (fused/flash kernels where the device has them). Incremental decoding keeps a
preallocated key/value cache per layer, so one generation step costs one position, not the whole context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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
    """Rotary position embedding tables; `rotate` turns (B, H, T, D) queries/keys at absolute `positions`.

    Pairs (x[2j], x[2j+1]) rotate by angle p·θ_j. They are read as complex numbers, so the rotation is one complex
    multiply instead of a slice/stack/flatten chain (the op count matters for one-position decoding on CPU).
    """

    def __init__(self, head_dim: int, max_positions: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, D/2)
        # (cos, sin) pairs, stored real so that `module.to(dtype)` never drops an imaginary part
        self.register_buffer("cis", torch.stack((angles.cos(), angles.sin()), dim=-1), persistent=False)  # (P, D/2, 2)

    @property
    def max_positions(self) -> int:
        return self.cis.shape[0]

    def factors(self, start: int, length: int) -> torch.Tensor:
        """Complex rotation factors (length, D/2) for positions start..start+length-1."""
        if start + length > self.cis.shape[0]:
            raise ValueError(
                f"sequence of {start + length} positions exceeds max_positions={self.cis.shape[0]}; raise model.max_positions"
            )
        return torch.view_as_complex(self.cis[start : start + length].float())

    def rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        # x (..., T, D) → same shape; also takes q and k stacked on a leading dim
        f = self.factors(start, x.shape[-2])
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


class KVCache:
    """Preallocated keys/values for every layer, filled left to right: values (B, H, max_T, D), keys stored
    transposed (B, H, D, max_T) so that one decoding query against them is a plain batched matrix-vector product
    (about twice as fast as scaled_dot_product_attention for a single query on CPU)."""

    def __init__(self, layers: int, batch: int, heads: int, head_dim: int, max_positions: int, device, dtype):
        self.keys = [torch.zeros(batch, heads, head_dim, max_positions, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(batch, heads, max_positions, head_dim, device=device, dtype=dtype) for _ in range(layers)]
        self.length = 0  # positions already cached

    @property
    def capacity(self) -> int:
        return self.values[0].shape[2]


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
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        start = cache.length if cache is not None else 0
        q, k = self.rotary.rotate(qkv[:2], start)  # queries and keys in one rotation
        v = qkv[2]
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            end = start + T
            if end > cache.capacity:
                raise ValueError(f"KV cache full ({cache.capacity} positions); start a new cache or raise max_positions")
            cache.keys[layer][..., start:end] = k.transpose(-2, -1)
            cache.values[layer][:, :, start:end] = v
            keys, values = cache.keys[layer][..., :end], cache.values[layer][:, :, :end]  # (B, H, D, end), (B, H, end, D)
            if T == 1:  # one new position sees every cached one: no mask needed
                scores = torch.matmul(q * self.head_dim**-0.5, keys)  # (B, H, 1, end)
                y = torch.matmul(scores.softmax(-1), values)
            elif start == 0:  # a prefill: nothing cached before it, so plain causal attention over the chunk
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # a chunk: causal within the chunk, full view of the past
                keys = keys.transpose(-2, -1).contiguous()
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

    def decoder(self) -> StepDecoder:
        """A snapshot of the weights laid out for fast one-position decoding (see StepDecoder)."""
        return StepDecoder(self)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        # x: (B, T, C) → (B, T, C). With a cache, x holds only the new positions and the cache advances.
        # The residual stream keeps the weights' dtype: under autocast an input made by a Linear (the LAM's patch
        # projection) arrives in bf16, and a bf16 residual stream rounds away the small updates it accumulates.
        x = x.to(self.norm.weight.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.norm(x)


class StepDecoder:
    """`Transformer.forward(x, cache)` for one new position per sequence, in few kernel launches.

    On CPU at batch 1 a decoding step is bound by per-op overhead and weight reads, not arithmetic, so the weights
    are prepared once: transposed for `mm`/`addmm` (F.linear re-packs them every call), each RMSNorm's weight folded
    into the matrix after it (the norm becomes one per-row scale applied after the matmul), the attention scale
    folded into the query columns, residual adds fused into `addmm`, attention as two `bmm`s over the cache's
    transposed keys. Matmuls write into buffers made once per cache, whose views (q, k, v, gate, up...) are made
    once too: at batch 1 each view call costs about as much as a small kernel. Same maths as the module path; it
    agrees to float rounding. A snapshot: build a new one after the weights change. Inference only (no dropout,
    no autograd).
    """

    def __init__(self, model: Transformer):
        cfg = model.cfg
        C, H = cfg.dim, cfg.heads
        D = C // H
        self.dim, self.heads, self.head_dim = C, H, D
        root = math.sqrt(C)  # rms(x) = ||x|| / sqrt(C): scale = sqrt(C) / sqrt(||x||² + C·eps), sqrt(C) folded in
        param = model.norm.weight
        self.eps_c = torch.tensor(C * model.norm.eps, dtype=param.dtype, device=param.device)  # a tensor: no scalar wrap per op
        self.layers = []
        with torch.no_grad():
            for block in model.blocks:
                wqkv = block.attn.qkv.weight.t() * (block.attn_norm.weight * root)[:, None]  # (C, 3C)
                wqkv[:, :C] *= D**-0.5
                wgu = block.mlp.gate_up.weight.t() * (block.mlp_norm.weight * root)[:, None]  # (C, 2F)
                self.layers.append((
                    wqkv.contiguous(), block.attn.proj.weight.t().contiguous(), wgu.contiguous(),
                    block.mlp.down.weight.t().contiguous(),
                ))
            self.final = (model.norm.weight * root).detach().clone()
            self.rotations = torch.view_as_complex(model.rotary.cis.float().contiguous())  # (P, D/2) per position
        self._buffers: _StepBuffers | None = None

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        # x: (B, C) embeddings of one new position per sequence → (B, C) normalised states; the cache advances.
        # Written flat (narrow/select, no helper calls): Python overhead is a large share of a step at this size.
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.step(x, cache)
        pos = cache.length
        if pos + 1 > cache.capacity:
            raise ValueError(f"KV cache full ({cache.capacity} positions); start a new cache or raise max_positions")
        if self._buffers is None or self._buffers.cache is not cache:
            self._buffers = _StepBuffers.make(cache, x, self.layers[0][2].shape[1])
        _, caches, qkv, qk, rotated, q, k, v, y, y_rows, gate_up, gate, up = self._buffers
        if pos >= self.rotations.shape[0]:
            raise ValueError(f"sequence of {pos + 1} positions exceeds max_positions={self.rotations.shape[0]}; "
                             "raise model.max_positions")
        f = self.rotations[pos]  # (D/2,) complex
        end, eps, norm = pos + 1, self.eps_c, torch.linalg.vector_norm
        for (wqkv, wo, wgu, wd), (k_cache, v_cache, keys, values) in zip(self.layers, caches):
            scale = norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_()  # (B, 1): the RMSNorm
            torch.mm(x, wqkv, out=qkv).mul_(scale)  # (B, 3C): q (pre-scaled for attention), k, v
            torch.mul(qk, f, out=rotated)  # q and k rotated
            k_cache.select(3, pos).copy_(k)
            v_cache.select(2, pos).copy_(v)
            scores = torch.bmm(q, keys.narrow(2, 0, end))  # (B·H, 1, end)
            torch.bmm(scores.softmax(-1), values.narrow(1, 0, end), out=y)  # (B·H, 1, D)
            x = torch.addmm(x, y_rows, wo)
            scale = norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_()
            torch.mm(x, wgu, out=gate_up).mul_(scale)
            x = torch.addmm(x, F.silu(gate).mul_(up), wd)
        cache.length = end
        return x.mul_(norm(x, dim=-1, keepdim=True).square_().add_(eps).rsqrt_()).mul_(self.final)


class _StepBuffers(NamedTuple):
    """StepDecoder's outputs for one cache's batch B, and every view a step takes of them and of the cache."""

    cache: KVCache
    caches: list  # per layer: keys (B, H, D, T), values (B, H, T, D), and both as (B·H) batches
    qkv: torch.Tensor  # (B, 3C)
    qk: torch.Tensor  # (B, 2, H, D/2) complex view of q and k in qkv
    rotated: torch.Tensor  # (B, 2, H, D/2) complex view of the rotated q and k, stored q first: (2, B, H, D)
    q: torch.Tensor  # (B·H, 1, D) rotated queries
    k: torch.Tensor  # (B, H, D) rotated keys
    v: torch.Tensor  # (B, H, D) values in qkv
    y: torch.Tensor  # (B·H, 1, D) attention output
    y_rows: torch.Tensor  # (B, C) the same
    gate_up: torch.Tensor  # (B, 2F)
    gate: torch.Tensor  # (B, F) views of gate_up
    up: torch.Tensor

    @staticmethod
    def make(cache: KVCache, x: torch.Tensor, hidden2: int) -> "_StepBuffers":
        (B, C), (_, H, D, _) = x.shape, cache.keys[0].shape
        caches = [(k, v, k.view(B * H, D, -1), v.view(B * H, -1, D)) for k, v in zip(cache.keys, cache.values)]
        qkv, rotated = x.new_empty(B, 3 * C), x.new_empty(2, B, H, D)
        y, gate_up = x.new_empty(B * H, 1, D), x.new_empty(B, hidden2)
        return _StepBuffers(
            cache, caches, qkv, torch.view_as_complex(qkv.narrow(1, 0, 2 * C).view(B, 2, H, D // 2, 2)),
            torch.view_as_complex(rotated.view(2, B, H, D // 2, 2)).transpose(0, 1), rotated[0].view(B * H, 1, D),
            rotated[1], qkv.narrow(1, 2 * C, C).view(B, H, D), y, y.view(B, C), gate_up, *gate_up.chunk(2, dim=-1),
        )


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
