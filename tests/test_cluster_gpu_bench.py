"""bench/gpu_step.py: honest output without a GPU, a FLOP model checked against torch's FLOP counter,
and (only where CUDA exists) the real 7B-architecture measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_step as G  # noqa: E402


def test_bf16_peaks_by_device_name():
    assert G.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert G.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert G.bf16_peak("NVIDIA H200") == 989e12
    assert G.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert G.bf16_peak("NVIDIA GeForce RTX 4090") is None  # unknown: no MFU rather than a guess


def test_without_cuda_nothing_is_measured(tmp_path, capsys):
    out = tmp_path / "gpu_step.json"
    assert G.main(["--cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gpu_measured"] is False and result["runs"] == [] and result["ratio_minmaxgap_over_erm"] == {}
    assert "GPU figures not measured" in result["note"]
    assert "GPU figures not measured" in capsys.readouterr().out


@pytest.mark.slow
def test_flop_model_matches_torch_flop_counter(tiny_model, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    # Eager attention: the FLOP counter sees its matmuls (CPU SDPA kernels are not counted).
    model, cfg = G.build_model(True, "cpu", "eager", tmp_path, tiny_model)
    batch = G.synthetic_batch(cfg, 2, 8, 2, "cpu", torch.float32)
    with FlopCounterMode(display=False) as counter:
        G.per_sample_loss(model, batch).mean().backward()
    measured = counter.get_total_flops()
    estimate = G.step_flops(model, cfg, batch)["total"]
    # The model skips the first layer's unneeded input gradients and ignores norms/biases: a few % high.
    assert 1.0 <= estimate / measured < 1.05, (estimate, measured)


def test_7b_flops_equal_a_hand_count_from_the_published_architecture():
    """The 7B model is built on the meta device (no memory): the bench's batch and FLOP count for it."""
    from ermgap.config import LoraConfig
    from ermgap.model import apply_lora, build_random

    model = apply_lora(build_random("qwen2-audio-7b", device="meta"), LoraConfig())
    cfg = model.base_model.model.config
    batch = G.synthetic_batch(cfg, 4, 48, 2, "cpu", torch.bfloat16)
    b, t = batch["input_ids"].shape
    assert (b, t) == (4, 48 + 750 + 2)  # 30 s of audio = 3000 mel frames -> 750 audio tokens
    # Qwen-7B decoder: 32 layers, hidden 4096, MLP 11008, MHA with q/k/v biases, vocab 156032 (head on the 2 answer tokens).
    per_layer = 3 * (4096 * 4096 + 4096) + 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    lm = b * (4 * (32 * per_layer + 4096) * t + 12 * 32 * 4096 * t**2 + 4 * 156032 * 4096 * 2)
    assert G.step_flops(model, cfg, batch)["language_model"] == pytest.approx(lm, rel=1e-6)


@pytest.mark.slow
def test_tiny_cpu_smoke_run_writes_honest_json(tiny_model, tmp_path, capsys):
    out = tmp_path / "gpu_step.json"
    args = ["--tiny", "--cpu", "--tiny-model", str(tiny_model), "--batch-size", "3", "--prompt-tokens", "8",
            "--rounds", "1", "--steps", "1", "--warmup", "0", "--out", str(out)]
    assert G.main(args) == 0
    result = json.loads(out.read_text())
    assert result["gpu_measured"] is False and "GPU figures not measured" in result["note"]
    runs = result["runs"]
    assert {(r["gradient_checkpointing"], r["objective"]) for r in runs} == {
        (gc, o) for gc in (False, True) for o in ("erm", "erm_minmaxgap")}
    for r in runs:
        assert r["mfu"] is None and r["peak_memory_gib"] is None  # no GPU peak, no CUDA memory stats
        assert r["step_s"] > 0 and r["tokens_per_s"] == pytest.approx(3 * r["seq_len"] / r["step_s"])
    assert set(result["ratio_minmaxgap_over_erm"]) == {"gc_off", "gc_on"}
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("ERM-MinMaxGAP / ERM step time (gc_on)")  # the ratio last, then the path


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_7b_architecture_on_the_gpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    assert G.main(["--rounds", "1", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["gpu_measured"] is True
    for r in result["runs"]:
        assert r["peak_memory_gib"] > 15  # 8B bf16 weights alone are ~16 GiB
        if r["mfu"] is not None:
            assert 0 < r["mfu"] < 1
