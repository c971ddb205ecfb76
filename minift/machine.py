"""Which machine a measured figure came from: one line to print beside every recorded result.

Lesson
------
A time or a memory figure means nothing without its machine: the same step takes seconds on a 2-core CPU
and milliseconds on a GPU, and the ratio between two libraries can move with the thread count or the torch
build. So every recorded result in minift (tutorials/results/, benchmarks/results/) begins with a line like

    AMD EPYC 7B13, 2 logical cores, torch threads 1; torch 2.13.0+cpu; Python 3.11.7; GPU NVIDIA H100 (80 GB)

built here from /proc/cpuinfo (Linux; platform.processor() elsewhere), os.cpu_count(), torch's own thread
count and version, and the CUDA device when one is in use.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), or what the platform module knows when /proc is absent."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_machine() -> str:
    """CPU, cores, torch threads, torch and Python versions, and the GPU when CUDA is available."""
    text = (f"{cpu_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
            f"torch {torch.__version__}; Python {platform.python_version()}")
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        text += f"; GPU {properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    return text
