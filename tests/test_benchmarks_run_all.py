"""benchmarks/run_all.py: runs each benchmark in its own process and assembles one report.

A real (tiny) benchmark run, and a benchmark that crashes: the report must show its exit status and error
tail while the others still run, and the command must exit non-zero. Speed itself is never asserted here.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run_all():
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("run_all", BENCHMARKS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))
    del sys.modules["run_all"]


def test_quick_run_writes_the_report_and_keeps_recorded_results(run_all, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")  # nf4_cpu compares against it
    recorded = (BENCHMARKS / "results" / "nf4_cpu.md").read_text()
    failing = tmp_path / "crash.py"
    failing.write_text("import sys\nprint('about to fail')\nsys.exit('bad shape: weight (3, 5)')\n")
    crash = run_all.Benchmark("crash", str(failing), "crash.md", "none", [])
    monkeypatch.setattr(run_all, "BENCHMARKS", [*run_all.BENCHMARKS, crash])

    status = run_all.main(["--quick", "--only", "nf4_cpu,crash,nf4_gpu,roofline", "--out", str(tmp_path / "out")])

    report = (tmp_path / "out" / "REPORT.md").read_text()
    assert status == 1  # one benchmark failed
    assert (tmp_path / "out" / "nf4_cpu.md").is_file()  # quick results go to --out ...
    assert (BENCHMARKS / "results" / "nf4_cpu.md").read_text() == recorded  # ... never over the recorded ones
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "| ok |" in rows["nf4_cpu"] and "quantize fp32 128x256" in rows["nf4_cpu"]
    assert "failed (exit 1)" in rows["crash"] and "bad shape: weight (3, 5)" in report
    assert "| ok |" in rows["roofline"] and "see its section" in rows["roofline"]  # a table, no ratio to pick
    assert (tmp_path / "out" / "roofline.md").is_file()
    import torch

    if not torch.cuda.is_available():
        assert "skipped" in rows["nf4_gpu"] and "no CUDA GPU" in report
    nf4_section = report.split("## nf4_cpu")[1].split("## crash")[0]
    assert "###" + recorded.splitlines()[0][1:] in nf4_section  # the result file, verbatim, nested one level


def test_unknown_benchmark_name_is_an_error(run_all, capsys):
    with pytest.raises(SystemExit):
        run_all.main(["--only", "modle"])
    assert "unknown benchmark(s) ['modle']" in capsys.readouterr().err
