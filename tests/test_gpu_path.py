"""The GPU training path, checked on a CPU: device selection, autocast choice (off on CPU unless forced), optional
torch.compile, SDPA attention, gradient accumulation, the model-size presets and `melodjinn bench train`."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from melodjinn.cli.main import compose, run
from melodjinn.world_model.benchmarks import peak_bf16_flops, preset_configs
from melodjinn.world_model.distributed import DistContext, GlobalBatchSampler
from melodjinn.world_model.dynamics import DynamicsModel
from melodjinn.world_model.errors import ConfigError
from melodjinn.world_model.lam import LatentActionModel
from melodjinn.world_model.runtime import autocast_dtype, maybe_compile, resolve_device
from melodjinn.world_model.training import train_world
from melodjinn.world_model.transformer import RMSNorm, Transformer, TransformerConfig
from melodjinn.world_model.world_model import WorldModel


def test_device_selection_and_autocast_choice():
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    assert autocast_dtype(cpu, "auto") is None  # fp32 on a CPU unless asked
    assert autocast_dtype(cpu, "fp32") is None
    assert autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="precision"):
        autocast_dtype(cpu, "fp16")


def test_compile_is_optional_and_lazy():
    module = torch.nn.Linear(2, 2)
    assert maybe_compile(module, False) is module
    compiled = maybe_compile(module, True)  # wraps without compiling until called
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is module


def test_training_attention_goes_through_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    model = Transformer(TransformerConfig(dim=16, layers=2, heads=2))
    model(torch.randn(2, 5, 16)).sum().backward()
    assert calls == [True, True]  # one fused causal attention per layer


def _tiny(untrained_codec, out, *extra):
    return [
        f"out={out}", f"codec.checkpoint={untrained_codec}", "train.steps=4", "train.batch_size=4", "train.train_clips=8",
        "train.eval_clips=4", "train.eval_every=2", "train.checkpoint_every=4", "train.warmup_steps=1",
        "train.restart_every=1", "train.restart_until=2", "train.freeze_lam_at=3", "world.clip_seconds=0.5",
        "model.lam.dim=16", "model.lam.heads=2", "model.dynamics.dim=16", "model.dynamics.layers=1", "model.dynamics.heads=2",
        *extra,
    ]


def test_gradient_accumulation_matches_the_whole_batch(untrained_codec, tmp_path):
    train_world(compose("train-world", _tiny(untrained_codec, tmp_path / "whole")))
    train_world(compose("train-world", _tiny(untrained_codec, tmp_path / "accumulated", "train.grad_accum=2")))
    a, b = WorldModel.load(tmp_path / "whole").state_dict(), WorldModel.load(tmp_path / "accumulated").state_dict()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < 1e-5
    with pytest.raises(ConfigError, match="grad_accum"):
        train_world(compose("train-world", _tiny(untrained_codec, tmp_path / "uneven", "train.grad_accum=3")))


def test_bf16_autocast_path_trains_on_cpu(untrained_codec, tmp_path, monkeypatch):
    """precision=bf16 forces autocast on the CPU: the code path a GPU takes, with fp32 losses and VQ."""
    dtypes = []
    real = LatentActionModel.forward

    def spy(self, waveform):
        out = real(self, waveform)
        dtypes.append((self.encoder_in(waveform.new_zeros(1, self.patch)).dtype, out["recon_loss"].dtype))
        return out

    norm_inputs = set()
    real_norm = RMSNorm.forward

    def norm_spy(self, x):
        norm_inputs.add(x.dtype)
        return real_norm(self, x)

    monkeypatch.setattr(LatentActionModel, "forward", spy)
    monkeypatch.setattr(RMSNorm, "forward", norm_spy)
    summary = train_world(compose("train-world", _tiny(untrained_codec, tmp_path, "train.precision=bf16")))
    assert dtypes and all(d == (torch.bfloat16, torch.float32) for d in dtypes), dtypes
    assert norm_inputs == {torch.float32}  # the residual streams stay fp32: only matmuls run in bf16
    assert np.isfinite(summary["token_ce"])


@pytest.mark.parametrize("name", ["drums", "base100m", "large300m"])
def test_model_presets_have_the_size_in_their_name(name):
    lam_cfg, dyn_cfg, _ = preset_configs(name)
    with torch.device("meta"):
        parameters = sum(p.numel() for m in (LatentActionModel(lam_cfg), DynamicsModel(dyn_cfg)) for p in m.parameters())
    size = re.search(r"(\d+)m$", name)
    if size:
        assert abs(parameters / (int(size.group(1)) * 1e6) - 1) <= 0.15, parameters
    else:
        assert parameters < 5e6  # the tiny CPU default


def test_peak_flops_table_matches_whole_model_names():
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA A10G") is None  # not in the table: MFU null rather than a neighbour's peak


def test_bench_train_on_cpu_reports_tokens_per_second_and_no_mfu():
    result = run("bench", "target=train", "train.batch_size=2", "train.steps=1", "train.warmup_steps=0")
    drums = result["presets"]["drums"]
    assert drums["tokens_per_second"] > 0 and drums["train_flops_per_step"] > 0
    assert drums["tokens_per_second"] == pytest.approx(2 * 1 * 4 * 150 / drums["seconds_per_step"])
    assert drums["mfu"] is None and "no CUDA" in drums["mfu_reason"]


def test_global_batch_sampler_shards_a_dataset_through_a_dataloader():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    loaders = [torch.utils.data.DataLoader(data, batch_sampler=GlobalBatchSampler(50, 4, torch.Generator().manual_seed(0), DistContext(rank=r, world_size=2)))
               for r in (0, 1)]
    whole = iter(GlobalBatchSampler(50, 4, torch.Generator().manual_seed(0)))
    for _, (a,), (b,) in zip(range(5), *loaders):
        assert len(a) == len(b) == 2 and torch.cat([a, b]).tolist() == next(whole)
