"""benchmarks/gpu_check.py in its dry mode: every step of the GPU check runs, on tiny shapes on the CPU with
the Triton interpreter, and writes the pass/fail table (marked dry: its ratios mean nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check

    return gpu_check


def test_dry_run_runs_every_step_and_writes_the_table(gpu_check, tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    assert gpu_check.main(["--dry", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check_dry.md").read_text()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and not line.startswith("| -")]
    steps = {row[0].lstrip("| ") for row in rows[1:]}
    assert steps == {"1 GPU tests", "2 NF4 GEMV", "2 NF4 GEMM", "3 fused loss", "4 QLoRA step"}, steps
    assert "crashed" not in text and "FAIL" not in text
    verdicts = {row[0].lstrip("| "): row[4] for row in rows[1:]}
    assert verdicts["1 GPU tests"] == verdicts["2 NF4 GEMV"] == verdicts["4 QLoRA step"] == "dry"
    assert "vs bitsandbytes" in text and "vs cuBLAS bf16" in text and "tokens/s" in text
    fused_present = gpu_check.fused_loss_function() is not None
    assert ("not present" in text) != fused_present
    assert "dry run" in text.splitlines()[0]


def test_gpu_tests_are_found_and_verdicts(gpu_check):
    files = gpu_check.gpu_test_files()
    assert "tests/test_kernels_nf4.py" in files and "tests/test_gpu_check.py" not in files
    check = gpu_check.Check(dry=False)
    check.add("2 NF4 GEMM", "x", "0.95x", ">= 0.9x", True)
    assert not check.failed()
    check.add("2 NF4 GEMV", "x", "1.2x", ">= 1.5x", False)
    assert check.failed() and check.rows[-1][4] == "FAIL"
    dry = gpu_check.Check(dry=True)
    dry.add("2 NF4 GEMV", "x", "1.2x", ">= 1.5x", False)
    assert dry.rows[-1][4] == "dry" and not dry.failed()


def test_without_a_gpu_the_full_run_says_so(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out and not list(tmp_path.iterdir())
