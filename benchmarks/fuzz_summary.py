"""Count what the fuzz table and the other hardening tests show: cases, clean errors, crashes, silent acceptances.

    .venv/bin/python benchmarks/fuzz_summary.py            # the fuzz table and the hardening tests
    .venv/bin/python benchmarks/fuzz_summary.py --fuzz-only

Runs tests/test_fuzz.py with pytest in this process and reads the `outcome` each case records (clean, crash,
silent, unclear; see the test's docstring), then runs the hardening tests (Ctrl-C, the run lock, a full disk,
divergence, corrupt files) and counts their passes. Prints markdown tables; writes them to
benchmarks/results/fuzz_summary.md with the machine they ran on. Exit status 0 only when every case is clean
and every hardening test passes.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARDENING = {  # what the README's reliability section names -> the tests that show it
    "Ctrl-C (SIGINT)": ["tests/test_interrupts.py"],
    "one run per folder (lock)": ["tests/test_run_lock.py"],
    "disk full": ["tests/test_config_validation.py", "-k", "full_disk"],
    "divergence": ["tests/test_divergence.py"],
    "corrupt files": ["tests/test_corrupt_files.py"],
}


class Collect:
    """A pytest plugin: the outcome of each test's call phase, and the `outcome` property the fuzz test records."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[str, str | None]] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and not report.passed):
            recorded = dict(report.user_properties).get("outcome")
            self.reports[report.nodeid] = (report.outcome, recorded)


def run(arguments: list[str]) -> tuple[Collect, float]:
    plugin = Collect()
    start = time.perf_counter()
    pytest.main([*arguments, "-q", "-p", "no:cacheprovider", "--no-header", "-o", "console_output_style=classic"],
                plugins=[plugin])
    return plugin, time.perf_counter() - start


def fuzz_table() -> tuple[list[str], bool]:
    plugin, seconds = run(["tests/test_fuzz.py::test_fuzz"])
    counts = collections.Counter()
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for nodeid, (outcome, recorded) in plugin.reports.items():
        if "::test_fuzz[" not in nodeid:
            continue
        kind = recorded or "crash"  # a case that failed before main() recorded nothing: count it as a crash
        group = nodeid.split("[", 1)[1].split("/", 1)[0]
        counts[kind] += 1
        counts["cases"] += 1
        groups[group][kind] += 1
        groups[group]["cases"] += 1
    lines = ["| fuzz cases | clean errors | crashes | silent acceptances | unclear errors | seconds |",
             "|---|---|---|---|---|---|",
             f"| {counts['cases']} | {counts['clean']} | {counts['crash']} | {counts['silent']} | {counts['unclear']} "
             f"| {seconds:.0f} |", "", "| group | cases | clean |", "|---|---|---|"]
    lines += [f"| {group} | {c['cases']} | {c['clean']} |" for group, c in sorted(groups.items())]
    return lines, counts["cases"] > 0 and counts["clean"] == counts["cases"]


def hardening_tests() -> tuple[list[str], bool]:
    lines = ["| hardening test | tests | passed | seconds |", "|---|---|---|---|"]
    ok = True
    for name, arguments in HARDENING.items():
        plugin, seconds = run(arguments)
        passed = sum(outcome == "passed" for outcome, _ in plugin.reports.values())
        ok &= bool(plugin.reports) and passed == len(plugin.reports)
        lines.append(f"| {name} | {len(plugin.reports)} | {passed} | {seconds:.0f} |")
    return lines, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-only", action="store_true", help="only the fuzz table")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import os

    os.chdir(ROOT)
    lines, ok = fuzz_table()
    if not args.fuzz_only:
        more, more_ok = hardening_tests()
        lines, ok = lines + [""] + more, ok and more_ok
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.system()}"
    text = "\n".join(["# minift reliability summary", "", f"machine: {machine}", "", *lines, ""])
    print("\n" + text)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "fuzz_summary.md").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
