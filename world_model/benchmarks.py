"""`melodjinn bench generation`: how fast the dynamics generates, per arrangement, with and without the KV cache,
and end to end with codec decoding. `melodjinn bench train`: training tokens/s of the model presets and, on a
GPU, model FLOP utilisation. Figures are wall seconds on this process; the thread count comes with them."""

from __future__ import annotations

import re
import time
from importlib import resources

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from melodjinn.world_model.dynamics import DynamicsConfig, DynamicsModel, time_generation
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.lam import LAMConfig
from melodjinn.world_model.runtime import autocast, autocast_dtype, maybe_compile, resolve_device, to_dataclass
from melodjinn.world_model.transformer import Transformer
from melodjinn.world_model.world_model import HOP, WorldModel
from melodjinn.world_model.worlds import FRAME_RATE


def _model(base: DynamicsConfig, arrangement: str) -> DynamicsModel:
    cfg = DynamicsConfig(**{**base.__dict__, "arrangement": arrangement, "arrangement_options": {}})
    torch.manual_seed(0)
    return DynamicsModel(cfg).eval()


@torch.inference_mode()
def bench_generation(cfg: DictConfig) -> dict:
    b = cfg.generation
    world_model = WorldModel.load(b.checkpoint)
    base = world_model.dynamics.cfg
    result: dict = {"model": {"dim": base.dim, "layers": base.layers, "streams": len(base.streams), "codebooks": base.num_codebooks,
                              "codebook_size": base.codebook_size, "checkpoint": str(b.checkpoint)}}
    per_arrangement = {}
    for name in ("flatten", "delay", "multistream"):
        timing = time_generation(_model(base, name), context_frames=int(b.context_frames), frames=int(b.frames))
        per_arrangement[name] = {"frames_per_second": 1.0 / timing["seconds_per_frame"], "realtime_factor": timing["realtime_factor"]}
    result["arrangements"] = per_arrangement
    result["flatten_slowdown"] = per_arrangement["multistream"]["frames_per_second"] / per_arrangement["flatten"]["frames_per_second"]
    result["flatten_slowdown_target"] = 0.7 * base.num_codebooks * len(base.streams)
    multistream = _model(base, "multistream")
    cached = time_generation(multistream, context_frames=int(b.cache_context_frames), frames=int(b.frames))
    uncached = time_generation(multistream, context_frames=int(b.cache_context_frames), frames=max(4, int(b.frames) // 10), use_cache=False)
    result["kv_cache"] = {"context_frames": int(b.cache_context_frames), "cached_frames_per_second": 1 / cached["seconds_per_frame"],
                          "uncached_frames_per_second": 1 / uncached["seconds_per_frame"],
                          "speedup": uncached["seconds_per_frame"] / cached["seconds_per_frame"]}
    frames = int(float(b.seconds_with_decoding) * FRAME_RATE)
    prompt = torch.zeros(1, len(base.streams), base.num_codebooks, 1, dtype=torch.long)
    actions = torch.zeros(1, frames + 1, dtype=torch.long)
    # the first call at full length sizes the codec's buffers; it is not timed (as in `bench codec`, best of repeats)
    world_model.generate(prompt, frames, actions, temperature=1.0, decode=True)
    runs = []
    for repeat in range(max(int(cfg.repeats), 1)):
        start = time.perf_counter()
        world_model.generate(prompt, frames, actions, temperature=1.0, generator=torch.Generator().manual_seed(repeat), decode=True)
        runs.append(time.perf_counter() - start)
    audio_seconds = frames / FRAME_RATE
    result["with_decoding"] = {"audio_seconds": audio_seconds, "wall_seconds": min(runs), "realtime_factor": audio_seconds / min(runs),
                               "realtime_factor_per_repeat": [audio_seconds / s for s in runs]}
    return result


# ---- `melodjinn bench train` ----------------------------------------------------------------------------------

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s, keyed by the GPU's model name as
# torch.cuda.get_device_name spells it (matched on whole words: "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB").
# Most specific first. A GPU not listed gets MFU null, with the reason.
PEAK_BF16_FLOPS = (
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)
FLOP_FORMULA = ("training FLOPs per step = 3 x forward (backward ~ 2 x forward); forward = 2*rows*in*out per nn.Linear "
                "+ 4*B*L^2*C per attention layer (L positions, causal not halved) + 2*B*S*K*T*V*C for the dynamics heads; "
                "embedding lookups, norms and rotary ignored. MFU = FLOPs per step / seconds per step / the GPU's dense bf16 peak "
                "(also for fp32 runs).")


def peak_bf16_flops(gpu_name: str) -> float | None:
    words = re.split(r"[\s\-_]+", gpu_name)
    for name, flops in PEAK_BF16_FLOPS:
        key = name.split()
        if any(words[i : i + len(key)] == key for i in range(len(words))):
            return flops
    return None


def preset_configs(name: str) -> tuple[LAMConfig, DynamicsConfig, dict]:
    """A model preset (configs/model/<name>.yaml) filled in for its `reference` data: (LAM, dynamics, reference)."""
    path = resources.files("melodjinn.configs") / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.name[:-5] for p in (resources.files("melodjinn.configs") / "model").iterdir() if p.name.endswith(".yaml"))
        raise ConfigError(f"model preset {name!r} not found; choose from {', '.join(known)}")
    node = OmegaConf.load(str(path))
    ref = OmegaConf.to_container(node.reference)
    lam = to_dataclass(LAMConfig, node.lam, f"{name}.lam")
    dyn = OmegaConf.to_container(node.dynamics)
    dyn.update(streams=[f"stem{i}" for i in range(ref["streams"])], num_codebooks=ref["num_codebooks"],
               codebook_size=ref["codebook_size"], num_actions=lam.num_actions)
    return lam, to_dataclass(DynamicsConfig, dyn, f"{name}.dynamics"), ref


def _forward_flops(model: WorldModel, run_step) -> float:
    """Forward matmul FLOPs of one training step, counted from the shapes it actually runs (see FLOP_FORMULA)."""
    total = [0.0]

    def linear(module, inputs, _output):
        total[0] += 2.0 * inputs[0].numel() * module.out_features  # rows · in · out

    def attention(module, inputs):
        B, L, C = inputs[0].shape
        total[0] += 4.0 * B * L * L * C * len(module.blocks)

    handles = [m.register_forward_hook(linear) for m in model.modules() if isinstance(m, nn.Linear)]
    handles += [m.register_forward_pre_hook(attention) for m in model.modules() if isinstance(m, Transformer)]
    try:
        tokens = run_step()
    finally:
        for h in handles:
            h.remove()
    B, S, K, T = tokens.shape
    return total[0] + 2.0 * B * S * K * T * model.dynamics.cfg.codebook_size * model.dynamics.cfg.dim


def _time_preset(name: str, b: DictConfig, device: torch.device) -> dict:
    from melodjinn.world_model.training import WorldLoss

    lam_cfg, dyn_cfg, ref = preset_configs(name)
    torch.manual_seed(0)
    model = WorldModel(lam_cfg, dyn_cfg, codec=None).to(device).train()
    loss_module = maybe_compile(WorldLoss(model), bool(b.compile))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = autocast_dtype(device, str(b.precision))
    B, T = int(b.batch_size), int(ref["clip_seconds"] * FRAME_RATE)
    S, K, V = ref["streams"], ref["num_codebooks"], ref["codebook_size"]
    mix = 0.1 * torch.randn(B, T * HOP, device=device)
    tokens = torch.randint(V, (B, S, K, T), device=device)
    sections = torch.zeros(B, T, dtype=torch.long, device=device)

    def step():
        noise = [None if x is None else x.to(device) for x in model.dynamics.training_noise(B, T)]
        with autocast(device, dtype):
            out = loss_module(mix, tokens, sections, *noise)
        (100.0 * out["recon_loss"] + out["vq_loss"] + out["dynamics_ce"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return tokens

    forward_flops = _forward_flops(model, step)  # the first step doubles as warm-up
    for _ in range(int(b.warmup_steps)):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(int(b.steps)):
        step()
    sync()
    seconds = (time.perf_counter() - start) / int(b.steps)
    result = {"parameters": sum(p.numel() for p in model.parameters()), "batch": B, "frames": T, "streams": S, "codebooks": K,
              "seconds_per_step": seconds, "tokens_per_second": B * S * K * T / seconds, "frames_per_second": B * T / seconds,
              "train_flops_per_step": 3 * forward_flops}
    if device.type != "cuda":
        result.update(mfu=None, mfu_reason="no CUDA device: MFU is measured against a GPU's tensor-core peak")
        return result
    gpu = torch.cuda.get_device_name(device)
    peak = peak_bf16_flops(gpu)
    result.update(gpu=gpu, peak_bf16_flops=peak, mfu=None if peak is None else 3 * forward_flops / seconds / peak)
    if peak is None:
        result["mfu_reason"] = f"no peak-FLOPs entry for {gpu!r} in melodjinn.world_model.benchmarks.PEAK_BF16_FLOPS"
    return result


def bench_train(cfg: DictConfig) -> dict:
    """Training throughput of the model presets on random data of their reference shape: codec tokens per second
    (batch · streams · codebooks · frames per step) for the joint LAM + dynamics step, and on a GPU the model
    FLOP utilisation. One process; `presets: auto` times the tiny default on a CPU and every preset on a GPU."""
    b = cfg.train
    device = resolve_device(str(cfg.device))
    presets = list(b.presets) if b.presets != "auto" else (["drums"] if device.type == "cpu" else ["drums", "base100m", "large300m"])
    results = {}
    for name in presets:
        try:
            results[name] = _time_preset(name, b, device)
        except torch.cuda.OutOfMemoryError:
            results[name] = {"error": f"out of GPU memory at batch_size={b.batch_size}; lower bench train.batch_size"}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": str(device), "precision": str(b.precision), "compile": bool(b.compile), "presets": results,
            "flop_formula": FLOP_FORMULA}
