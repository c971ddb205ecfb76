"""Every tutorial runs, top to bottom, in its fast mode (MINIFT_FAST=1): the lessons cannot silently rot.

The cheap checks come first: each lesson opens with its prerequisites, the index lists every lesson in order,
every recorded report belongs to a lesson, and the shared report header (tutorials/_results.py) says what
produced the figures.
"""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
TUTORIALS = sorted(TUTORIALS_DIR.glob("[0-9][0-9]_*.py"))


def load_results_module():
    spec = importlib.util.spec_from_file_location("_results", TUTORIALS_DIR / "_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lessons_are_numbered_one_to_n_and_open_with_their_prerequisites():
    assert [path.name[:2] for path in TUTORIALS] == [f"{i:02d}" for i in range(1, len(TUTORIALS) + 1)]
    for path in TUTORIALS:
        head = path.read_text().splitlines()[:8]
        assert head[1] == f"# # Lesson {path.name[:2]} — " + head[1].split(" — ", 1)[1], path.name
        assert any(line.startswith("# Prerequisites: ") for line in head), f"{path.name}: no Prerequisites line"


def test_lora_comes_before_qlora_and_nf4_before_both_nf4_users():
    order = [path.stem for path in TUTORIALS]
    position = {name.split("_", 1)[1]: i for i, name in enumerate(order)}
    assert position["lora_smollm2"] < position["qlora_smollm2"]
    assert position["nf4_from_scratch"] < position["triton_nf4_matmul"] < position["qlora_smollm2"]


def test_index_lists_every_lesson_and_every_report_belongs_to_one():
    index = (TUTORIALS_DIR / "README.md").read_text()
    linked = re.findall(r"^\| (\d\d) \| \[[^\]]+\]\(([^)]+\.py)\)", index, flags=re.MULTILINE)
    assert linked == [(path.name[:2], path.name) for path in TUTORIALS]
    stems = {path.stem for path in TUTORIALS}
    for report in (TUTORIALS_DIR / "results").glob("*.md"):
        assert report.stem in stems, f"{report.name} is named after no lesson"
        lines = report.read_text().splitlines()
        assert lines[0].startswith(f"# Lesson {report.name[:2]} results: ")
        assert lines[2].startswith(f"Produced by `python tutorials/{report.stem}.py` in ")
        assert lines[3].startswith("Machine: ")
        assert f"(results/{report.name})" in index, f"the index does not link {report.name}"


def test_results_header_and_where_reports_go(tmp_path, monkeypatch):
    results = load_results_module()
    monkeypatch.setenv("MINIFT_TUTORIAL_OUT", str(tmp_path))
    lesson = str(TUTORIALS_DIR / "06_lora_smollm2.py")

    monkeypatch.setenv("MINIFT_FAST", "1")
    header = results.results_header(lesson, "LoRA on SmolLM2-135M", time.perf_counter()).splitlines()
    assert header[0] == "# Lesson 06 results: LoRA on SmolLM2-135M"
    assert header[1] == ""
    assert re.fullmatch(r"Produced by `MINIFT_FAST=1 python tutorials/06_lora_smollm2\.py` in \d+ s\.", header[2])
    assert header[3].startswith("Machine: ") and "logical cores" in header[3]
    written = results.write_results(lesson, "report\n", time.perf_counter())
    assert written == tmp_path / "06_lora_smollm2.md" and written.read_text() == "report\n"
    assert results.scratch_dir(lesson) == tmp_path / "06_lora_smollm2" and (tmp_path / "06_lora_smollm2").is_dir()

    monkeypatch.setenv("MINIFT_FAST", "0")  # a full run records beside the lessons (path only: nothing is written)
    assert results.results_path(lesson) == TUTORIALS_DIR / "results" / "06_lora_smollm2.md"
    assert "`python tutorials/06_lora_smollm2.py`" in results.results_header(lesson, "x", time.perf_counter())


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_fast_mode(path, tmp_path):
    env = {**os.environ, "MINIFT_FAST": "1", "MINIFT_TUTORIAL_OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    if (TUTORIALS_DIR / "results" / f"{path.stem}.md").exists():  # a lesson with a recorded report writes it here too
        assert (tmp_path / f"{path.stem}.md").read_text().startswith(f"# Lesson {path.name[:2]} results: ")
