"""benchmarks/roofline.py: the byte and FLOP counts behind the H100/H200 lower bounds, checked on a small case
worked out by hand, and bench_nf4.py printing the bound table on a machine without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import roofline  # noqa: E402

sys.path.remove(str(BENCHMARKS))


def test_nf4_weight_bytes_by_hand_and_as_stored():
    # W (4, 128), blocksize 64: 512 weights -> 256 bytes of codes; 8 blocks -> 8 uint8 scale codes;
    # ceil(8 / 256) = 1 nested float32 scale (4 bytes); one float32 offset (4 bytes): 272 bytes.
    assert roofline.nf4_weight_bytes(4, 128) == 256 + 8 + 4 + 4 == 272
    # without double quantization: 256 bytes of codes + 8 float32 scales
    assert roofline.nf4_weight_bytes(4, 128, double_quant=False) == 256 + 32
    from minift.quant import quantize_nf4

    for shape, double_quant in [((4, 128), True), ((4, 128), False), ((576, 192), True), ((33, 64), True)]:
        q = quantize_nf4(torch.randn(*shape), blocksize=64, double_quant=double_quant)
        assert roofline.nf4_weight_bytes(*shape, double_quant=double_quant) == q.nbytes


def test_gemv_bytes_flops_and_bound_by_hand():
    w = roofline.work("gemv", N=4, K=128, M=2)
    # NF4 weight 272 B + x (2 x 128 bf16) 512 B + y (2 x 4 bf16) 16 B; 2 * M * N * K multiply-add FLOPs
    assert (w.bytes, w.flops) == (272 + 512 + 16, 2048)
    assert w.bound_seconds("H100 SXM") == pytest.approx(800 / 3.35e12)  # memory: 2048 / 989.5e12 is smaller
    assert w.bound_seconds("H200") == pytest.approx(800 / 4.8e12)
    assert w.bound_by("H100 SXM") == "memory"
    cublas = roofline.work("cublas bf16", N=4, K=128, M=2)
    assert cublas.bytes == 4 * 128 * 2 + 512 + 16 and cublas.flops == 2048
    dequantize = roofline.work("dequantize", N=4, K=128, M=0)
    assert (dequantize.bytes, dequantize.flops) == (272 + 4 * 128 * 2, 0)
    both = roofline.work("dequantize+cublas", N=4, K=128, M=2)
    assert both.bytes == dequantize.bytes + cublas.bytes
    backward = roofline.work("backward", N=4, K=128, M=2)  # grad_y (2 x 4) in, grad_x (2 x 128) out
    assert (backward.bytes, backward.flops) == (272 + 16 + 512, 2048)


def test_large_gemm_is_compute_bound():
    w = roofline.work("fused gemm", N=4096, K=4096, M=4096)
    assert w.flops == 2 * 4096 ** 3 and w.bound_by("H100 SXM") == "compute"
    assert w.bound_seconds("H100 SXM") == pytest.approx(2 * 4096 ** 3 / 989.5e12)
    assert roofline.gpu_for("NVIDIA H100 80GB HBM3") == "H100 SXM" and roofline.gpu_for("NVIDIA H200") == "H200"
    assert roofline.gpu_for("NVIDIA A100-SXM4-80GB") is None


def test_bench_nf4_prints_the_bound_table_without_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on a GPU machine too: no measuring here
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setattr(sys, "argv", ["bench_nf4.py", "--shapes", "smollm2", "--rows", "1,256"])
    import bench_nf4

    assert bench_nf4.main() == 0
    out = capsys.readouterr().out
    assert "nothing was measured" in out and "| gemv | 576 x 576 | 1 |" in out
    assert "| backward | 1536 x 576 | 256 |" in out and "| fused gemm | 576 x 1536 | 256 |" in out
