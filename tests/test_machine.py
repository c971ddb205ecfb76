"""minift/machine.py: the line that names the machine beside every recorded figure."""

import os
import platform

import torch

from minift.machine import cpu_name, describe_machine


def test_description_names_cpu_cores_threads_and_versions():
    text = describe_machine()
    assert text.startswith(cpu_name() + ", ")
    assert f"{os.cpu_count()} logical cores" in text and f"torch threads {torch.get_num_threads()}" in text
    assert f"torch {torch.__version__}" in text and f"Python {platform.python_version()}" in text
    assert ("; GPU " in text) == torch.cuda.is_available()


def test_cpu_name_reads_proc_cpuinfo_when_present(monkeypatch, tmp_path):
    from minift import machine

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Example CPU 9000 @ 3.0GHz\nflags\t: fpu\n")
    monkeypatch.setattr(machine, "Path", lambda _: fake)
    assert cpu_name() == "Example CPU 9000 @ 3.0GHz"
    monkeypatch.setattr(machine, "Path", lambda _: tmp_path / "missing")
    assert cpu_name() == (platform.processor() or "unknown CPU")
