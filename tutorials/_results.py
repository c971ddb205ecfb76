"""The report every measuring lesson writes: where it goes, the lines it opens with, and how it is saved.

A lesson that measures a claim ends by writing its figures as a markdown report named after the lesson:

    full run                 tutorials/results/06_lora_smollm2.md     the recorded figures the index quotes
    fast run (MINIFT_FAST=1) $MINIFT_TUTORIAL_OUT/06_lora_smollm2.md  (default runs/): never over a recorded one

and keeps whatever else it produces (training runs, checkpoints, exported models) in its scratch folder,
$MINIFT_TUTORIAL_OUT/06_lora_smollm2/. Every report opens with the same three lines, built here once, so that a
reader can always tell what produced a figure and on which machine:

    # Lesson 06 results: LoRA on SmolLM2-135M

    Produced by `python tutorials/06_lora_smollm2.py` in 407 s.
    Machine: AMD EPYC, 2 logical cores, torch threads 1; torch 2.13.0+cpu; Python 3.11.7. Seconds are ...

A lesson imports this file as `_results` (it sits beside the lessons, which Python puts first on the path when
it runs `python tutorials/NN_name.py`; cell by cell, start the kernel in tutorials/).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from minift.machine import describe_machine

RECORDED = Path(__file__).resolve().parent / "results"  # the figures of full runs, kept in git


def fast_mode() -> bool:
    """MINIFT_FAST=1: tiny sizes, every code path, numbers that mean nothing (the test suite runs this)."""
    return os.environ.get("MINIFT_FAST") == "1"


def output_root() -> Path:
    """$MINIFT_TUTORIAL_OUT, or runs/ below the working directory: where lessons write what is not recorded."""
    return Path(os.environ.get("MINIFT_TUTORIAL_OUT", "runs"))


def scratch_dir(lesson_file: str) -> Path:
    """The lesson's own folder for runs, checkpoints and exports: <output root>/<lesson name>/, created."""
    folder = output_root() / Path(lesson_file).stem
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def results_path(lesson_file: str, suffix: str = ".md") -> Path:
    """Where the lesson's report (or its chart, suffix=".png") goes: recorded after a full run, scratch in fast mode."""
    folder = output_root() if fast_mode() else RECORDED
    folder.mkdir(parents=True, exist_ok=True)
    return folder / (Path(lesson_file).stem + suffix)


def results_header(lesson_file: str, title: str, started: float) -> str:
    """The report's first lines: "Lesson NN results: <title>", the exact command and its run time, the machine.

    `started` is the lesson's time.perf_counter() at its first cell, so the seconds cover the whole run.
    """
    name = Path(lesson_file).name
    command = f"{'MINIFT_FAST=1 ' if fast_mode() else ''}python tutorials/{name}"
    return (f"# Lesson {name[:2]} results: {title}\n"
            f"\n"
            f"Produced by `{command}` in {time.perf_counter() - started:.0f} s.\n"
            f"Machine: {describe_machine()}. Seconds are indicative only (the CPU may be shared with other "
            f"jobs): compare them within this file.\n")


def write_results(lesson_file: str, report: str, started: float) -> Path:
    """Save the report where results_path says, and print where it went and how long the lesson took."""
    path = results_path(lesson_file)
    path.write_text(report)
    print("wrote", path)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return path
